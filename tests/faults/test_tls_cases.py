"""TLS as a scored case of the suite (``@case``: the short form here, the long form in ``python -m bench.faults``):
a producer and a ``fabric worker`` process over ``rediss://``, with certificates the case makes (``certs.py``) and
a TLS port it opens on the run's redis-server (CONFIG SET; the plain port stays for the bookkeeping), scored by the
checker like every other case. ``test_security.py`` keeps what the checker cannot score: ``fabric publish`` over
TLS, and the one line a CA that did not sign the server gets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.client import connect
from tests.faults.certs import make_certs
from tests.faults.checker import Score
from tests.faults.harness import World, case, free_port, joined, rate

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

EVENTS = 240
"""The short form's events per case (the long form passes more)."""


async def _tls_url(w: World) -> str:
    """Open a TLS port on the run's server with a certificate signed by a CA made now; a URL trusting that CA."""
    certs = make_certs(w.tmp / "certs")
    port = free_port()
    for name, value in (("tls-cert-file", certs.server_cert), ("tls-key-file", certs.server_key),
                        ("tls-ca-cert-file", certs.ca), ("tls-auth-clients", "no"), ("tls-port", port)):
        await w.client.config_set(name, str(value))
    return f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}"


@case("TLS end to end (producer and worker over rediss://)", "no loss, no duplicates")
async def case_tls(w: World, events: int) -> Score:
    # Given a worker process reading over TLS
    url = await _tls_url(w)
    await w.create_streams()
    (worker,) = await joined(w.spawn("w", redis_url=url))

    # When a producer publishes over TLS too
    client = connect(url)
    try:
        published = await w.publish(events, rate=rate(events), client=client)
    finally:
        await client.aclose()
    w.notes["failed"] = published.failed

    # Then every event is handled once, and the worker stops cleanly
    await w.settle()
    await worker.stopped_cleanly()
    w.notes["handled by the worker"] = w.handled_by(worker.pid)
    return await w.score()


# ---- the short form ------------------------------------------------------------------------------------


async def test_a_producer_and_a_worker_over_tls_handle_every_event_once(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_tls(w, EVENTS)
    assert w.notes == {"failed": 0, "handled by the worker": EVENTS}, w.notes
    assert (s.lost, s.duplicated, s.unexpected) == (0, 0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()
