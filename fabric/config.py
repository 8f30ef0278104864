"""Settings as frozen Structs: defaults are named constants, unknown fields are refused, and rules that tie
fields together are checked once, at construction (``ConfigError`` names the field and the reason).

They are decoded from ``config/*.toml`` by ``load_config`` or built in code.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from fabric.codec import DEFAULT_MAX_PAYLOAD_BYTES
from fabric.errors import ConfigError
from fabric.keys import Priority, check_name
from fabric.lanes import DEFAULT_WEIGHTS

__all__ = ["FabricConfig", "PublisherConfig", "Retention", "WorkerConfig", "load_config"]

DEFAULT_NAMESPACE = "fabric"
DEFAULT_MAX_BATCH = 512
DEFAULT_MAX_BUFFER = 10_000
DEFAULT_DEDUP_WINDOW_MS = 0
DEFAULT_CONCURRENCY = 32
DEFAULT_PREFETCH = 1024
DEFAULT_BLOCK_MS = 1_000
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_BACKOFF_BASE_MS = 200
DEFAULT_BACKOFF_MAX_MS = 30_000
DEFAULT_RECLAIM_IDLE_MS = 5_000
DEFAULT_RECLAIM_INTERVAL_MS = 1_000
DEFAULT_DISCOVER_INTERVAL_MS = 1_000
DEFAULT_TRIM_INTERVAL_MS = 10_000
DEFAULT_GRACE_S = 10.0
DEFAULT_HANDLER_TIMEOUT_S = 60.0
MAX_BLOCK_MS = 10_000


class _Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    def _fail(self, field: str, reason: str) -> None:
        raise ConfigError(f"{type(self).__name__}.{field}: {reason}")


class Retention(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How much of a topic's streams to keep; 0 means no limit of that kind.

    ``max_len`` and ``max_age_ms`` never remove entries some group has not acknowledged. ``hard_max_len``
    does, when a backlog outgrows it, and counts each entry it drops (``ns:counters``)."""

    max_len: int = 0
    max_age_ms: int = 0
    hard_max_len: int = 0

    def __post_init__(self) -> None:
        for name in ("max_len", "max_age_ms", "hard_max_len"):
            if getattr(self, name) < 0:
                self._fail(name, "retention limits must be 0 (none) or positive")
        if self.hard_max_len and self.max_len and self.hard_max_len < self.max_len:
            self._fail("hard_max_len", f"{self.hard_max_len} is below max_len {self.max_len}: raise it")


class PublisherConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a publisher batches, bounds and deduplicates."""

    max_batch: int = DEFAULT_MAX_BATCH
    """Most events sent in one round trip."""
    linger_ms: float = 0.0
    """How long a batch waits to fill before it is sent; 0 sends as soon as the previous batch returns."""
    max_buffer: int = DEFAULT_MAX_BUFFER
    """Events waiting to be sent; ``publish`` waits (backpressure) while the buffer is full."""
    dedup_window_ms: int = DEFAULT_DEDUP_WINDOW_MS
    """Opt-in: re-publishing an ``event_id`` within this window creates no second entry (one key per event);
    0, the default, leaves it off. Resends after a lost connection are deduplicated without it."""
    encoding: Literal["msgpack", "json"] = "msgpack"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    retries: int = 3
    """Resends of a batch after a connection error (safe: the session's sequence numbers make a resend
    write only what had not landed)."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            self._fail("max_batch", "must be at least 1")
        if self.max_buffer < self.max_batch:
            self._fail("max_buffer", f"{self.max_buffer} is below max_batch {self.max_batch}: raise it")
        if self.linger_ms < 0 or self.dedup_window_ms < 0 or self.retries < 0:
            self._fail("linger_ms", "linger_ms, dedup_window_ms and retries cannot be negative")


class WorkerConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One consumer group's worker: what it reads, how hard it works, how it fails."""

    group: str
    topics: list[str]
    consumer: str = ""
    """Consumer name, unique in the group; empty picks ``host-pid-random``."""
    concurrency: int = DEFAULT_CONCURRENCY
    """Handler calls in flight at once."""
    prefetch: int = DEFAULT_PREFETCH
    """Entries read ahead per priority lane."""
    block_ms: int = DEFAULT_BLOCK_MS
    commit_batch: int = DEFAULT_MAX_BATCH
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    backoff_base_ms: int = DEFAULT_BACKOFF_BASE_MS
    backoff_max_ms: int = DEFAULT_BACKOFF_MAX_MS
    reclaim_idle_ms: int = DEFAULT_RECLAIM_IDLE_MS
    """An entry pending this long without a heartbeat belongs to a dead consumer and is taken over."""
    reclaim_interval_ms: int = DEFAULT_RECLAIM_INTERVAL_MS
    discover_interval_ms: int = DEFAULT_DISCOVER_INTERVAL_MS
    trim_interval_ms: int = DEFAULT_TRIM_INTERVAL_MS
    grace_s: float = DEFAULT_GRACE_S
    """On SIGTERM, how long in-flight handlers may take to finish."""
    handler_timeout_s: float | None = DEFAULT_HANDLER_TIMEOUT_S
    """A handler call running longer fails (and is retried); None: no limit, a hung handler holds its entry."""
    priority_weights: tuple[int, int, int, int] = DEFAULT_WEIGHTS
    """Lane weights: low, normal, high, critical (see ``lanes.py``)."""
    output_topic: str | None = None
    """Topic for returned events; default: each event type's ``default_topic``."""
    output_priority: Priority | None = None
    retention: dict[str, Retention] = {}
    """Per topic; applied by this worker every ``trim_interval_ms``."""
    encoding: Literal["msgpack", "json"] = "msgpack"

    @property
    def heartbeat_ms(self) -> int:
        """How often held entries are refreshed: a third of the reclaim idle time."""
        return max(1, self.reclaim_idle_ms // 3)

    def __post_init__(self) -> None:
        self._check_names()
        self._check_limits()

    def _check_names(self) -> None:
        try:
            check_name("group", self.group)
            for t in self.topics:
                check_name("topic", t)
            if self.consumer:
                check_name("consumer", self.consumer)
        except ValueError as exc:
            raise ConfigError(f"WorkerConfig: {exc}") from None
        if not self.topics:
            self._fail("topics", "name at least one topic to read")

    def _check_limits(self) -> None:
        for name in ("concurrency", "prefetch", "commit_batch", "max_deliveries", "block_ms", "reclaim_interval_ms",
                     "discover_interval_ms", "trim_interval_ms"):
            if getattr(self, name) < 1:
                self._fail(name, "must be at least 1")
        if self.backoff_max_ms < self.backoff_base_ms:
            self._fail("backoff_max_ms", "is below backoff_base_ms")
        if len(self.priority_weights) != len(Priority) or min(self.priority_weights) < 1:
            self._fail("priority_weights", "give one positive integer per priority (low, normal, high, critical)")
        if self.block_ms > MAX_BLOCK_MS:
            self._fail("block_ms", f"{self.block_ms} is over {MAX_BLOCK_MS}: longer looks like a dead connection")
        if self.handler_timeout_s is not None and self.handler_timeout_s <= 0:
            self._fail("handler_timeout_s", "must be positive, or unset for no limit")
        if self.reclaim_idle_ms < 30:
            self._fail("reclaim_idle_ms", "too small to refresh held entries in time: use at least 30")


class FabricConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole ``config/*.toml`` file."""

    redis_url: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    publisher: PublisherConfig = PublisherConfig()
    retention: dict[str, Retention] = {}

    def __post_init__(self) -> None:
        try:
            check_name("namespace", self.namespace)
        except ValueError as exc:
            raise ConfigError(f"FabricConfig.namespace: {exc}") from None


def load_config(path: str | Path) -> FabricConfig:
    """Read and validate a TOML config; raise ``ConfigError`` naming the file, field and reason."""
    try:
        raw = tomllib.loads(Path(path).read_text())
        return msgspec.convert(raw, FabricConfig)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
