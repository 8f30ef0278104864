"""Settings as frozen Structs: defaults are named constants, unknown fields are refused, and rules that tie
fields together are checked once, at construction (``ConfigError`` names the field and the reason).

They are decoded from ``config/*.toml`` by ``load_config`` or built in code. A file's ``[workers.NAME]`` tables
are ``WorkerSpec``s: a handler, a number of processes, and the ``WorkerConfig`` every one of them runs with.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from fabric.codec import DEFAULT_MAX_PAYLOAD_BYTES
from fabric.errors import ConfigError
from fabric.keys import Priority, check_name
from fabric.lanes import DEFAULT_WEIGHTS

__all__ = ["BreakerConfig", "FabricConfig", "PublisherConfig", "Retention", "WorkerConfig", "WorkerSpec", "load_config"]

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
DEFAULT_RETIRE_IDLE_MS = 600_000
DEFAULT_RETIRE_INTERVAL_MS = 60_000
DEFAULT_GRACE_S = 10.0
DEFAULT_HANDLER_TIMEOUT_S = 60.0
DEFAULT_LEASE_MS = 3_000
MAX_BLOCK_MS = 10_000


class FieldError(ConfigError):
    """A ConfigError about one field, which keeps the field's name and the reason apart (a config file's
    loader puts them behind the table they came from)."""

    def __init__(self, message: str, field: str, reason: str) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


class _Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    def _fail(self, field: str, reason: str) -> None:
        raise FieldError(f"{type(self).__name__}.{field}: {reason}", field, reason)


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


class BreakerConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A circuit breaker shared by every process of the fleet (``breaker.py``): when it trips, how long it stays
    open, how it tries again. Processes using one breaker name should give it the same settings."""

    name: str
    failure_threshold: int = 5
    """Trip after this many consecutive failures across the fleet; 0: no such rule."""
    failure_rate: float = 0.0
    """Trip when at least this fraction of the calls in ``window_ms`` failed; 0: no such rule."""
    window_ms: int = 10_000
    """The failure-rate window, counted in whole seconds."""
    min_calls: int = 20
    """The failure-rate rule needs at least this many calls in the window."""
    recovery_ms: int = 10_000
    """How long the breaker stays OPEN before it admits trial calls (HALF_OPEN)."""
    half_open_trials: int = 1
    """Trial calls admitted across the whole fleet in HALF_OPEN."""
    close_after: int = 1
    """Successful trials that close the breaker; one failed trial opens it again."""
    trial_timeout_ms: int = 120_000
    """Admitted trials that have not reported back by then count as failed (their process died)."""
    failures: list[str] = []
    """Names of the exception classes that count as failures (a class or any base); empty: every exception."""
    ignore: list[str] = msgspec.field(default_factory=lambda: ["Reject"])
    """Exception classes that never count: a ``Reject`` of bad input is not the downstream's fault."""

    def __post_init__(self) -> None:
        try:
            check_name("breaker", self.name)
        except ValueError as exc:
            raise FieldError(f"BreakerConfig: {exc}", "name", str(exc)) from None
        for field in ("failure_threshold", "window_ms", "min_calls", "recovery_ms", "trial_timeout_ms"):
            if getattr(self, field) < 0:
                self._fail(field, "cannot be negative")
        if not 0 <= self.failure_rate <= 1:
            self._fail("failure_rate", "is a fraction: between 0 (off) and 1")
        if not self.failure_threshold and not self.failure_rate:
            self._fail("failure_threshold", "give failure_threshold or failure_rate, or the breaker never trips")
        if self.failure_rate and self.window_ms < 1000:
            self._fail("window_ms", "the window is counted in whole seconds: use at least 1000")
        for field in ("half_open_trials", "close_after"):
            if getattr(self, field) < 1:
                self._fail(field, "must be at least 1")


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
    wait_replicas: int = 0
    """Opt-in: confirm a batch only after this many replicas of its node have it (Redis ``WAIT``, pipelined right
    behind the batch), so a failover that promotes one of them cannot lose it; 0, the default, confirms on the
    primary's reply. A batch not replicated within ``wait_timeout_ms`` is still written: it is counted in
    ``Publisher.under_replicated`` and logged."""
    wait_timeout_ms: int = 1000
    """How long ``WAIT`` waits for ``wait_replicas`` replicas."""

    def __post_init__(self) -> None:
        if self.wait_replicas < 0 or self.wait_timeout_ms < 1:
            self._fail("wait_replicas", "wait_replicas cannot be negative and wait_timeout_ms must be at least 1")
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
    retire_idle_ms: int = DEFAULT_RETIRE_IDLE_MS
    """A consumer of the group idle this long with nothing pending (a dead process's) is removed; 0: never."""
    retire_interval_ms: int = DEFAULT_RETIRE_INTERVAL_MS
    trim_interval_ms: int = DEFAULT_TRIM_INTERVAL_MS
    grace_s: float = DEFAULT_GRACE_S
    """On SIGTERM, how long in-flight handlers may take to finish."""
    handler_timeout_s: float | None = DEFAULT_HANDLER_TIMEOUT_S
    """A handler call running longer fails with ``TimeoutError`` (at most a tenth of it, or a second, late) and is
    retried; None: no limit, a hung handler holds its entry."""
    priority_weights: tuple[int, int, int, int] = DEFAULT_WEIGHTS
    """Lane weights: low, normal, high, critical (see ``lanes.py``)."""
    output_topic: str | None = None
    """Topic for returned events; default: each event type's ``default_topic``."""
    output_priority: Priority | None = None
    retention: dict[str, Retention] = {}
    """Per topic; applied by this worker every ``trim_interval_ms``."""
    encoding: Literal["msgpack", "json"] = "msgpack"
    ordered: bool = False
    """Ordered mode: each stream (topic × priority × symbol) has one owner in the group at a time, which handles
    its entries one after another, committing them in order, an entry with outputs before the next starts
    (``ownership.py``); False: any consumer takes any entry, and a symbol's entries may be handled concurrently
    and out of order."""
    lease_ms: int = DEFAULT_LEASE_MS
    """Ordered mode: how long a stream's lease lasts unless renewed (every third of it); a dead owner's streams
    move after this long."""
    commit_ahead: int = 0
    """Ordered mode: how many entries of a stream may be handled while the commit of the ones before is in flight
    (they are committed together once it is back, so a stream's commits still reach Redis in order). 0: an entry
    with outputs is committed before the next starts, so a handler that reads back the outputs of the entry before
    sees them (an entry without outputs never holds the next: its ack is nothing to read back; up to
    ``ordered.ACKS_AHEAD`` of them). More: faster with outputs (a stream does not wait a round trip per entry), for
    handlers whose state is their own."""
    breakers: list[BreakerConfig] = []
    """Circuit breakers guarding the handler (a config file names ``[breakers.NAME]`` tables): while one is open,
    the worker stops reading and calling (or calls its fallback)."""

    @property
    def heartbeat_ms(self) -> int:
        """How often held entries are refreshed: a third of the reclaim idle time."""
        return max(1, self.reclaim_idle_ms // 3)

    def __post_init__(self) -> None:
        self._check_names()
        self._check_limits()
        self._check_times()

    def _check_names(self) -> None:
        names = [("group", "group", self.group), *(("topics", "topic", t) for t in self.topics)]
        if self.consumer:
            names.append(("consumer", "consumer", self.consumer))
        for field, kind, value in names:
            try:
                check_name(kind, value)
            except ValueError as exc:
                raise FieldError(f"WorkerConfig: {exc}", field, str(exc)) from None
        if not self.topics:
            self._fail("topics", "name at least one topic to read")

    def _check_limits(self) -> None:
        for name in ("concurrency", "prefetch", "commit_batch", "max_deliveries", "block_ms", "reclaim_interval_ms",
                     "discover_interval_ms", "trim_interval_ms", "retire_interval_ms"):
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

    def _check_times(self) -> None:
        if self.reclaim_idle_ms < 30:
            self._fail("reclaim_idle_ms", "too small to refresh held entries in time: use at least 30")
        if self.lease_ms < 30:
            self._fail("lease_ms", "too small to renew the lease in time: use at least 30")
        for name, zero in (("retire_idle_ms", "never retire"), ("commit_ahead", "commit each entry before the next")):
            if getattr(self, name) < 0:
                self._fail(name, f"must be 0 ({zero}) or positive")


HANDLER_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
MAX_WORKER_NAME = 40
"""A worker's name is part of each of its processes' consumer names, which Redis keys keep to 100 characters."""


class WorkerSpec(WorkerConfig, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A ``[workers.NAME]`` table: ``processes`` workers of ``handler``, each with these settings and a consumer
    name of its own."""

    handler: str
    """``MODULE:FUNCTION`` of an async handler."""
    processes: int = 1
    """How many worker processes ``fabric worker --config`` runs for it, on each host that runs the file."""
    fallback: str | None = None
    """``MODULE:FUNCTION`` called instead of the handler while one of its breakers is open."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not HANDLER_REF.match(self.handler):
            self._fail("handler", f"{self.handler!r} is not MODULE:FUNCTION (for example handlers.quotes:mid_price)")
        if self.fallback is not None and not HANDLER_REF.match(self.fallback):
            self._fail("fallback", f"{self.fallback!r} is not MODULE:FUNCTION")
        if self.fallback is not None and not self.breakers:
            self._fail("fallback", "a fallback answers while a breaker is open: name the breakers too")
        if self.processes < 1:
            self._fail("processes", "must be at least 1")
        if self.consumer:
            self._fail("consumer", "each process gets a name of its own (host-pid-worker-slot-generation): remove it")
        if self.retention:
            self._fail("retention", "retention is per topic: set it in a top-level [retention.TOPIC] table")

    def worker_config(self, **changes: Any) -> WorkerConfig:
        """The settings of one of its processes: this table's, with ``changes`` (a consumer, the topics'
        retention, command-line overrides) applied and checked."""
        fields = {name: getattr(self, name) for name in WorkerConfig.__struct_fields__}
        return WorkerConfig(**{**fields, **changes})


class FabricConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole ``config/*.toml`` file."""

    redis_url: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    publisher: PublisherConfig = PublisherConfig()
    retention: dict[str, Retention] = {}
    breakers: dict[str, BreakerConfig] = {}
    """``[breakers.NAME]`` tables, named by workers' ``breakers = ["NAME", ...]``."""
    workers: dict[str, WorkerSpec] = {}
    """``[workers.NAME]`` tables: what ``fabric worker --config FILE`` runs, in the file's order."""

    def __post_init__(self) -> None:
        try:
            check_name("namespace", self.namespace)
        except ValueError as exc:
            raise ConfigError(f"FabricConfig.namespace: {exc}") from None
        for name in self.workers:
            _check_worker_name(name)

    def select_workers(self, only: Sequence[str] = ()) -> dict[str, WorkerSpec]:
        """The ``[workers.NAME]`` tables named in ``only``, in the file's order (every one if ``only`` is empty)."""
        if not self.workers:
            raise ConfigError("no [workers.NAME] tables to run: add one (config/example.toml shows how)")
        unknown = [name for name in only if name not in self.workers]
        if unknown:
            raise ConfigError(f"no [workers.{unknown[0]}] table: the file has {', '.join(self.workers)}")
        return {name: spec for name, spec in self.workers.items() if not only or name in only}


def _check_worker_name(name: str) -> None:
    try:
        check_name("worker name", name)
    except ValueError as exc:
        raise ConfigError(f"workers.{name}: {exc}") from None
    if len(name) > MAX_WORKER_NAME:
        raise ConfigError(f"workers.{name}: name longer than {MAX_WORKER_NAME} characters: shorten it "
                          "(it is part of each process's consumer name)")


def load_config(path: str | Path) -> FabricConfig:
    """Read and validate a TOML config; raise ``ConfigError`` naming the file, field and reason."""
    try:
        raw = tomllib.loads(Path(path).read_text())
        breakers = _breakers(raw.pop("breakers", {}))
        workers = _worker_specs(raw.pop("workers", {}), breakers)
        return msgspec.convert({**raw, "breakers": breakers, "workers": workers}, FabricConfig)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _breakers(tables: Any) -> dict[str, BreakerConfig]:
    """The ``[breakers.NAME]`` tables; an error names ``breakers.NAME.FIELD`` and the reason."""
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError("breakers: give each breaker a table of its own, [breakers.NAME]")
    out = {}
    for name, table in tables.items():
        try:
            out[name] = msgspec.convert({**table, "name": name}, BreakerConfig)
        except FieldError as exc:
            raise ConfigError(f"breakers.{name}.{exc.field}: {exc.reason}") from None
        except msgspec.ValidationError as exc:
            field, reason = _field_and_reason(str(exc))
            raise ConfigError(f"breakers.{name}{field}: {reason}") from None
    return out


def _worker_specs(tables: Any, breakers: dict[str, BreakerConfig]) -> dict[str, WorkerSpec]:
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError("workers: give each worker a table of its own, [workers.NAME]")
    return {name: _worker_spec(name, table, breakers) for name, table in tables.items()}


def _guards(name: str, table: dict[str, Any], breakers: dict[str, BreakerConfig]) -> dict[str, Any]:
    """The table with its ``breakers = ["NAME", ...]`` replaced by the ``[breakers.NAME]`` settings."""
    names = table.get("breakers", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f'workers.{name}.breakers: a list of [breakers.NAME] names, e.g. ["exchange"]')
    unknown = [n for n in names if n not in breakers]
    if unknown:
        known = ", ".join(breakers) or "none"
        raise ConfigError(f"workers.{name}.breakers: no [breakers.{unknown[0]}] table (the file has: {known})")
    return {**table, "breakers": [breakers[n] for n in names]} if names else table


def _worker_spec(name: str, table: dict[str, Any], breakers: dict[str, BreakerConfig]) -> WorkerSpec:
    """One ``[workers.NAME]`` table; an error names ``workers.NAME.FIELD`` and the reason."""
    _check_worker_name(name)
    table = _guards(name, table, breakers)
    try:
        if isinstance(table.get("output_priority"), str):  # a file names it ("high"); the field is an IntEnum
            table = {**table, "output_priority": Priority.parse(table["output_priority"])}
    except ValueError as exc:
        raise ConfigError(f"workers.{name}.output_priority: {exc}") from None
    try:
        return msgspec.convert(table, WorkerSpec)
    except FieldError as exc:
        raise ConfigError(f"workers.{name}.{exc.field}: {exc.reason}") from None
    except msgspec.ValidationError as exc:
        field, reason = _field_and_reason(str(exc))
        raise ConfigError(f"workers.{name}{field}: {reason}") from None


_AT = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_NAMED = re.compile(r"^Object (?P<kind>contains unknown|missing required) field `(?P<field>[^`]+)`$")


def _field_and_reason(message: str) -> tuple[str, str]:
    """msgspec's ``REASON - at `$.PATH` `` as (``.PATH``, reason), with the field a reason names moved into the
    path (an unknown field gets the nearest known names as a hint)."""
    match = _AT.match(message)
    if match is None:  # pragma: no cover - the pattern matches any string
        return "", message
    path, reason = match["path"] or "", match["reason"]
    named = _NAMED.match(reason)
    if named is None:
        return path, reason[:1].lower() + reason[1:]
    field = named["field"]
    if named["kind"] == "missing required":
        return f"{path}.{field}", "required"
    close = difflib.get_close_matches(field, WorkerSpec.__struct_fields__, n=2)
    hint = f": did you mean {' or '.join(close)}?" if close else " (the fields are WorkerSpec's, fabric/config.py)"
    return f"{path}.{field}", f"unknown field{hint}"
