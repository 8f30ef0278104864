"""A first run needs no Redis of its own: a private redis-server for one command, and ``fabric dev`` to share."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

import msgspec
import pytest
import redis
from typer.testing import CliRunner

import fabric.embedded
from fabric.cli import app
from fabric.cli.options import Exit
from fabric.embedded import STREAM_NODE_SETTINGS, answers, free_port
from fabric.events import Tick
from tests.conftest import ROOT, fabric_cmd
from tests.fixtures.handlers import subprocess_env

pytestmark = pytest.mark.real_only

DEADLINE_S = 30.0
"""How long a server may take to answer or to stop; a deadline, not a timing threshold under test."""


@pytest.fixture
def nothing_on_default_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make localhost:6379 look empty whatever this machine runs there, and drop inherited URLs."""
    real = fabric.embedded.answers
    monkeypatch.setattr(fabric.embedded, "answers", lambda host, port: port != 6379 and real(host, port))
    monkeypatch.delenv("FABRIC_REDIS_URL", raising=False)


def test_a_command_without_a_url_starts_a_private_redis_and_says_so(nothing_on_default_port, keys) -> None:
    # Given no URL anywhere and no Redis on the default address
    line = msgspec.json.encode(Tick(symbol="A", bid=1.0, ask=2.0)).decode()

    # When an event is published
    result = CliRunner().invoke(app, ["publish", "--topic", "tick", "--namespace", keys.ns], input=line + "\n")

    # Then a private redis-server served the command, announced in one line on stderr
    assert result.exit_code == 0, result.stderr
    assert "published 1 events" in result.stdout
    announced = [s for s in result.stderr.splitlines() if "private redis-server" in s]
    assert len(announced) == 1, result.stderr


def test_an_explicit_url_that_does_not_answer_is_an_error_not_a_private_redis(nothing_on_default_port, keys) -> None:
    # When a URL is given and nothing answers there
    result = CliRunner().invoke(app, ["publish", "--topic", "tick", "--namespace", keys.ns,
                                      "--redis-url", f"redis://127.0.0.1:{free_port()}/0"], input="")

    # Then the command fails as unreachable instead of quietly using another server
    assert result.exit_code == Exit.UNREACHABLE
    assert "private redis-server" not in result.stderr


def _wait(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_fabric_dev_serves_other_processes_until_ctrl_c(redis_url, keys) -> None:
    # Given `fabric dev` running on a free port
    port = free_port()
    proc = subprocess.Popen(fabric_cmd("dev", "--port", str(port)), cwd=ROOT, env=subprocess_env(redis_url, keys.ns),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: answers("127.0.0.1", port), "fabric dev to answer")

        # When another process publishes to it
        line = msgspec.json.encode(Tick(symbol="A", bid=1.0, ask=2.0)).decode()
        published = subprocess.run(fabric_cmd("publish", "--topic", "tick", "--namespace", keys.ns, "--redis-url",
                                               f"redis://127.0.0.1:{port}/0"),
                                   cwd=ROOT, env=subprocess_env(redis_url, keys.ns), input=line + "\n",
                                   capture_output=True, text=True, timeout=DEADLINE_S)
        assert published.returncode == 0, published.stderr

        # And Ctrl-C reaches it
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Then it stopped cleanly, taking its server with it
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not answers("127.0.0.1", port)


def test_fabric_dev_refuses_a_port_a_redis_already_answers_on(redis_url) -> None:
    # Given the session's redis-server on its port
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])

    # When `fabric dev` is asked for that port
    result = CliRunner().invoke(app, ["dev", "--port", str(port)])

    # Then it says so and exits 2
    assert result.exit_code == Exit.USAGE
    assert "already answers" in result.stderr


def test_a_private_redis_server_dies_with_the_command_that_started_it(redis_url, keys) -> None:
    # Given `fabric dev` serving on a free port
    port = free_port()
    proc = subprocess.Popen(fabric_cmd("dev", "--port", str(port)), cwd=ROOT, env=subprocess_env(redis_url, keys.ns),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: answers("127.0.0.1", port), "fabric dev to answer")

        # When fabric is killed outright (no chance to stop its server)
        proc.kill()
        proc.wait()

        # Then the server goes too (Linux's parent-death signal), instead of running on orphaned
        _wait(lambda: not answers("127.0.0.1", port), "the orphaned redis-server to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_private_redis_server_runs_with_fabrics_stream_node_settings(redis_url) -> None:
    # redis_url: skips without redis-server (fails under CI), like the shared one
    port = free_port()
    with fabric.embedded.redis_server(port):
        client = redis.Redis(port=port, decode_responses=True)
        try:
            found = {name: client.config_get(name)[name] for name in STREAM_NODE_SETTINGS}
        finally:
            client.close()
    assert found == STREAM_NODE_SETTINGS
