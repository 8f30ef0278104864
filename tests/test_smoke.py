from fabric import Publisher, Worker, WorkerConfig
from fabric.events import Tick
from fabric.handler import as_handler
from tests.waiting import eventually
from tests.workers import running


async def test_publish_then_handle(redis, keys):
    seen: list[str] = []

    async def handle(event: Tick) -> None:
        seen.append(event.event_id)

    worker = Worker(redis, as_handler(handle), WorkerConfig(group="g", topics=["tick"], block_ms=50), keys=keys)
    async with Publisher(redis, keys=keys) as pub:
        events = [Tick(symbol="A", bid=1, ask=2) for _ in range(10)]
        await pub.publish_many(events)

    async def all_seen() -> bool:
        return len(seen) == 10

    async with running(worker):
        await eventually(all_seen, what="10 handled")
    assert sorted(seen) == sorted(e.event_id for e in events)
