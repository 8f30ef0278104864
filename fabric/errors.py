"""fabric's one error tree.

Every message says what happened, the likely cause and the fix, in one line::

    FabricError
    ├── ConfigError             a setting is missing, malformed or contradicts another
    ├── EventError              an event cannot be encoded, decoded or routed
    │   ├── DecodeError         an entry's bytes are not a valid event (reason + raw fields kept)
    │   ├── UnknownEventType    the entry names a type no imported module defines
    │   └── EventTooLarge       the encoded payload exceeds ``max_payload_bytes``
    ├── RedisError              Redis refused or could not be reached (translated in ``client.py``)
    │   ├── RedisUnavailable    connection refused, reset or timed out
    │   ├── AuthenticationFailed wrong password or user
    │   ├── PermissionDenied    the ACL user lacks a command or key
    │   ├── RedisOutOfMemory    ``maxmemory`` reached: writes are refused
    │   └── RedisMisconfigured  a server setting fabric cannot run safely under (an evicting maxmemory-policy)
    ├── PublishError            a publish did not complete; the events named were not confirmed
    ├── NotFound                a stream, group, consumer, dead letter or breaker named does not exist
    ├── HandlerLoadError        ``MODULE:FUNCTION`` cannot be imported or is not a handler
    └── HandlerSignal           raised by handlers to say what to do with the entry
        ├── Retry(after_ms)     redeliver after ``after_ms`` (counts a delivery)
        └── Reject(reason)      dead-letter now: the input itself is bad, retrying will not help
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ConfigError",
    "DecodeError",
    "EventError",
    "EventTooLarge",
    "FabricError",
    "HandlerLoadError",
    "HandlerSignal",
    "NotFound",
    "PermissionDenied",
    "PublishError",
    "RedisError",
    "RedisMisconfigured",
    "RedisOutOfMemory",
    "RedisUnavailable",
    "Reject",
    "Retry",
    "UnknownEventType",
]


class FabricError(Exception):
    """Root of every error fabric raises on purpose."""


class ConfigError(FabricError):
    """A setting is missing, malformed, or contradicts another."""


class EventError(FabricError):
    """An event cannot be encoded, decoded or routed."""


class DecodeError(EventError):
    """An entry's fields are not a valid event; ``fields`` keeps the raw bytes."""

    def __init__(self, reason: str, fields: dict[bytes, bytes] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields or {}


class UnknownEventType(DecodeError):
    """The entry's ``type`` names no event class imported in this process."""


class EventTooLarge(EventError):
    """The encoded payload is larger than the configured limit."""


class RedisError(FabricError):
    """Redis refused a command or could not be reached."""


class RedisUnavailable(RedisError):
    """Redis cannot be reached (refused, reset, timed out, DNS)."""


class AuthenticationFailed(RedisError):
    """Redis rejected the password or user name."""


class PermissionDenied(RedisError):
    """The Redis ACL user may not run a command or touch a key."""


class RedisOutOfMemory(RedisError):
    """Redis hit ``maxmemory`` and refuses writes."""


class RedisMisconfigured(RedisError):
    """Redis runs with a setting that would lose events silently (an evicting ``maxmemory-policy``)."""


class PublishError(FabricError):
    """A publish was not confirmed by Redis; the caller must treat the events as not published."""


class NotFound(FabricError):
    """A stream, group, consumer, dead letter or breaker that a command names does not exist."""


class HandlerLoadError(FabricError):
    """A ``MODULE:FUNCTION`` handler reference cannot be loaded."""


class HandlerSignal(FabricError):
    """Base of the exceptions a handler raises to direct what happens to its entry."""


class Retry(HandlerSignal):
    """Ask for redelivery after ``after_ms`` milliseconds; counts against ``max_deliveries``."""

    def __init__(self, after_ms: int = 0, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.after_ms = max(0, int(after_ms))
        self.reason = reason


class Reject(HandlerSignal):
    """Dead-letter the entry at once: the input is bad and retrying cannot help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
