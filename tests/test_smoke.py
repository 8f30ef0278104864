from fabric import Publisher, Worker, WorkerConfig
from fabric.events import Tick
from tests.waiting import eventually


async def test_publish_then_handle(redis, keys):
    seen = []

    async def handle(event):
        seen.append(event.event_id)

    from fabric.handler import as_handler
    worker = Worker(redis, as_handler(handle), WorkerConfig(group="g", topics=["tick"], block_ms=50), keys=keys)
    async with Publisher(redis, keys=keys) as pub:
        ids = [e.event_id for e in [Tick(symbol="A", bid=1, ask=2) for _ in range(10)]]
        events = [Tick(symbol="A", bid=1, ask=2, event_id=i) for i in ids]
        await pub.publish_many(events)
    import asyncio
    task = asyncio.create_task(worker.run())
    await eventually(lambda: _n(seen, 10), what="10 handled")
    worker.stop()
    await task
    assert sorted(seen) == sorted(ids)


async def _n(seen, n):
    return len(seen) >= n
