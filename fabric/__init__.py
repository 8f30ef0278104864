"""fabric: typed events on Redis Streams, for event-driven trading systems."""

from fabric.client import connect
from fabric.config import FabricConfig, PublisherConfig, Retention, WorkerConfig, load_config
from fabric.errors import FabricError, Reject, Retry
from fabric.events import Event
from fabric.handler import Context
from fabric.keys import Keys, Priority
from fabric.publisher import Publisher
from fabric.worker import Worker

__all__ = [
    "Context",
    "Event",
    "FabricConfig",
    "FabricError",
    "Keys",
    "Priority",
    "Publisher",
    "PublisherConfig",
    "Reject",
    "Retention",
    "Retry",
    "Worker",
    "WorkerConfig",
    "connect",
    "load_config",
]
__version__ = "0.1.0"
