"""The topic registries: which streams a topic has (``Keys.topic_registry``), and the news of a new one.

Whatever writes a stream first adds it to its topic's registry, where workers discover it. A stream new to the
registry is also announced: its topic is published on ``Keys.new_streams_channel``, and the workers of that
topic discover at once instead of at their next ``discover_interval_ms``. The announcement is best effort; a
worker that misses it (not yet subscribed, a dropped subscription) joins the stream at its next discovery, and
its group starts at the stream's first entry either way, so nothing is lost, only later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis.exceptions as rex
from redis.asyncio import Redis

from fabric.keys import Keys

__all__ = ["announce", "register"]

log = logging.getLogger("fabric.registry")


async def register(client: Redis, keys: Keys, streams: Iterable[str]) -> set[str]:
    """Add the streams to their topics' registries (one pipelined round trip); return the topics that gained a
    stream (to ``announce``)."""
    ordered = sorted(streams)
    topics = [keys.parse_stream(s).topic for s in ordered]
    async with client.pipeline(transaction=False) as pipe:
        for topic, stream in zip(topics, ordered, strict=True):
            pipe.sadd(keys.topic_registry(topic), stream)
        added = await pipe.execute()
    return {topic for topic, a in zip(topics, added, strict=True) if a}


async def announce(client: Redis, keys: Keys, topics: Iterable[str]) -> bool:
    """Publish each topic on the new-streams channel. Return False when Redis refuses this user PUBLISH there
    (logged once here: the caller stops announcing); other error replies are logged and the rest goes on."""
    channel = keys.new_streams_channel()
    for topic in sorted(topics):
        try:
            await client.publish(channel, topic)
        except rex.NoPermissionError as exc:
            log.warning("cannot announce new streams on %s (%s): workers join them at their next discovery; grant "
                        "this Redis user +publish &%s (deploy/acl/users.acl)", channel, exc, channel)
            return False
        except rex.ResponseError as exc:
            log.warning("could not announce a new stream of %s: workers join it at their next discovery (%s)",
                        topic, exc)
    return True
