"""Security: ACL users (least privilege, and a clear start-up error naming what is missing), a wrong password
(fails fast, no retry storm), TLS (end to end, and a clear error for a CA that did not sign the server), and a
worker's refusal of an evicting Redis.

Each test runs against a redis-server of this module's own (ACL users on the session's server would outlive the
test), in the namespace ``fabric`` that ``deploy/acl/users.acl`` is written for; the default user stays the
unrestricted one the test itself uses. Workers and producers run as ``fabric worker`` / ``fabric publish``
processes; their handlers record through the default user (``tests/fixtures/handlers.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from fabric import preflight
from fabric.client import connect, translated
from fabric.config import WorkerConfig
from fabric.errors import AuthenticationFailed, PermissionDenied, RedisUnavailable
from fabric.events import Tick
from fabric.keys import Keys, Priority
from fabric.publisher import Publisher
from tests.conftest import ROOT, fabric_cmd
from tests.faults.certs import Certs, make_certs
from tests.faults.proxy import Proxy
from tests.fixtures.handlers import handled_key, subprocess_env
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)

ACL_FILE = ROOT / "deploy" / "acl" / "users.acl"
NS = "fabric"
TOPIC = "tick"
PASSWORD = "s3cret-pw"
EXIT_DEADLINE_S = 30.0
"""For a process to exit: far above what it takes, not a timing threshold under test."""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(workdir: Path, *args: str, url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server with ``args`` until the block ends; waits until ``url`` answers PING."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), *args], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        probe = sync_redis.Redis.from_url(url, socket_timeout=1)
        while True:
            try:
                if probe.ping():
                    break
            except sync_redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(workdir / 'redis.log').read_text()}") from None
                time.sleep(0.05)
        probe.close()
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _acl_rules() -> dict[str, list[str]]:
    """The users of deploy/acl/users.acl: name -> rules."""
    rules = {}
    for line in ACL_FILE.read_text().splitlines():
        word, name, *rest = line.split()
        assert word == "user", line
        rules[name] = rest
    return rules


class AclRedis:
    """The module's server, with deploy/acl's users switched on (password ``PASSWORD``)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"

    def user_url(self, user: str, password: str = PASSWORD, port: int | None = None) -> str:
        return f"redis://{user}:{password}@127.0.0.1:{port or self.port}/0"

    def set_user(self, name: str, *rules: str) -> None:
        with sync_redis.Redis.from_url(self.url) as admin:
            admin.execute_command("ACL", "SETUSER", name, "reset", *rules, "on", f">{PASSWORD}")


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    port = _free_port()
    server = AclRedis(port)
    with redis_server(tmp_path_factory.mktemp("acl-redis"), "--port", str(port), url=server.url):
        for name, rules in _acl_rules().items():
            server.set_user(name, *rules)
        yield server


@pytest.fixture
async def admin(acl_redis: AclRedis) -> AsyncIterator[Redis]:
    client = connect(acl_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
def topic() -> str:
    """A topic of the test's own (the namespace is shared: the ACL file names it)."""
    return f"t{uuid.uuid4().hex[:8]}"


# ---- processes ---------------------------------------------------------------------------------------------


class Proc:
    """A fabric subprocess with its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, stdin: bytes | None = None) -> None:
        self.log = log
        self.record_ns = env["FABRIC_TEST_NS"]
        """Where its handler records (``handled_key``)."""
        self._out = log.open("wb")
        self.proc = subprocess.Popen(fabric_cmd(*args), cwd=ROOT, env=env, stdout=self._out, stderr=self._out,
                                     stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()

    async def exit_code(self) -> int:
        try:
            return await asyncio.to_thread(self.proc.wait, EXIT_DEADLINE_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {EXIT_DEADLINE_S}s:\n{self.output()}") from None

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture
def run(tmp_path: Path, acl_redis: AclRedis) -> Iterator[object]:
    """Start fabric subprocesses (``worker ...`` or ``publish ...``); each is killed at teardown."""
    started: list[Proc] = []

    def start(*args: str, record_url: str | None = None, stdin: bytes | None = None) -> Proc:
        env = subprocess_env(record_url or acl_redis.url, f"rec{uuid.uuid4().hex[:6]}")
        p = Proc(list(args), env, tmp_path / f"proc{len(started)}.log", stdin)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.close()


def _worker_args(url: str, topic: str, handler: str = "record") -> list[str]:
    return ["worker", f"tests.fixtures.handlers:{handler}", "--topic", topic, "--group", "g", "--namespace", NS,
            "--redis-url", url, "--block-ms", "100", "--reclaim-idle-ms", "1000"]


def _ticks(n: int) -> tuple[bytes, list[str]]:
    """``n`` JSON lines for ``fabric publish``, and their event ids."""
    events = [Tick(symbol=f"S{i % 3}", bid=1.0, ask=2.0) for i in range(n)]
    lines = b"".join(msgspec.json.encode({"type": "Tick", **msgspec.structs.asdict(e)}) + b"\n" for e in events)
    return lines, [e.event_id for e in events]


def _error_line(output: str) -> str:
    """The one ``error: ...`` line a failed command printed (and assert it printed exactly one, no traceback)."""
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# ---- ACL: least privilege, and what is missing named at start ---------------------------------------------


async def test_the_deploy_users_pass_their_own_roles_check_and_the_producer_not_a_workers(acl_redis: AclRedis) -> None:
    config = WorkerConfig(group="g", topics=[TOPIC])
    producer = connect(acl_redis.user_url("fabric-producer"))
    worker = connect(acl_redis.user_url("fabric-worker"))
    try:
        await preflight.check_publisher(producer, Keys(NS), (TOPIC,), dedup=True)
        await preflight.check_worker(worker, Keys(NS), config, "c")
        with pytest.raises(PermissionDenied) as denied:
            await preflight.check_worker(producer, Keys(NS), config, "c")
        assert "+xreadgroup" in str(denied.value) and "'fabric-producer'" in str(denied.value)
        with pytest.raises(PermissionDenied) as denied:
            await preflight.check_publisher(producer, Keys("other"), (TOPIC,))
        assert "keys other:s:tick:normal:{~tick}" in str(denied.value), "another namespace is out of reach"
    finally:
        await producer.aclose()
        await worker.aclose()


async def test_the_check_runs_nothing(acl_redis: AclRedis, admin: Redis) -> None:
    config = WorkerConfig(group="g", topics=["untouched"], retention={}, retire_idle_ms=1)
    before = await admin.dbsize()
    assert await preflight.refused(admin, preflight.worker_needs(Keys(NS), config, "c")) == []
    assert await preflight.refused(admin, preflight.publisher_needs(Keys(NS), ("untouched",), dedup=True)) == []
    assert await admin.dbsize() == before


async def test_at_maxmemory_the_check_still_tells_permissions_from_oom(acl_redis: AclRedis, admin: Redis) -> None:
    # Given a Redis at its limit: every command queued in a MULTI is refused OOM, after its ACL check
    config = WorkerConfig(group="g", topics=[TOPIC])
    worker = connect(acl_redis.user_url("fabric-worker"))
    producer = connect(acl_redis.user_url("fabric-producer"))
    await admin.config_set("maxmemory", 1)
    try:
        # Then the worker user lacks nothing, and the producer user still lacks a worker's commands
        assert await preflight.refused(worker, preflight.worker_needs(Keys(NS), config, "c")) == []
        assert "+xreadgroup" in (await preflight.refused(producer, preflight.worker_needs(Keys(NS), config, "c")) or [])
    finally:
        await admin.config_set("maxmemory", 0)
        await worker.aclose()
        await producer.aclose()


async def test_a_worker_lacking_a_command_and_a_key_exits_4_naming_both(acl_redis: AclRedis, admin: Redis, run,
                                                                       topic: str) -> None:
    # Given the deploy worker user without XAUTOCLAIM, and without the dead-letter streams among its keys
    rules = _acl_rules()["fabric-worker"]
    acl_redis.set_user("crippled", *rules, "-xautoclaim", "resetkeys", "~fabric:s:*", "~fabric:f:*", "~fabric:topic:*",
                       "~fabric:counters", "~fabric:dlqs")

    # When a worker starts as that user
    worker = run(*_worker_args(acl_redis.user_url("crippled"), topic))

    # Then it exits 4 at once with one line naming both, and it wrote nothing (it never joined its group)
    assert await worker.exit_code() == 4, worker.output()
    line = _error_line(worker.output())
    assert "'crippled'" in line and "+xautoclaim" in line and "fabric:dlq:{~" + topic + "}" in line, line
    assert "deploy/acl/users.acl" in line
    assert not await admin.exists(Keys(NS).stream(topic, Priority.NORMAL, None))


async def test_a_producer_and_a_worker_run_end_to_end_as_the_deploy_users(acl_redis: AclRedis, admin: Redis, run,
                                                                         topic: str) -> None:
    # Given a worker running as fabric-worker
    worker = run(*_worker_args(acl_redis.user_url("fabric-worker"), topic))
    lines, ids = _ticks(30)

    # When fabric publish, as fabric-producer, publishes events to its topic
    producer = run("publish", "--topic", topic, "--namespace", NS, "--redis-url",
                   acl_redis.user_url("fabric-producer"), stdin=lines)
    assert await producer.exit_code() == 0, producer.output()

    # Then the worker handles every one, and drains and exits 0 without a refused command on the way
    await eventually(lambda: _handled(admin, worker.record_ns, len(ids)), what="every event handled")
    handled = {raw.decode().split("|")[0] for raw in await admin.lrange(handled_key(worker.record_ns), 0, -1)}
    assert handled == set(ids)
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.exit_code() == 0, worker.output()
    out = worker.output()
    assert "NOPERM" not in out and "retrying" not in out and "Traceback" not in out, out
    assert "NOPERM" not in producer.output(), "the producer may announce its new streams"


async def test_a_producer_that_may_not_announce_new_streams_warns_once_and_publishes(acl_redis: AclRedis,
                                                                                     admin: Redis, run,
                                                                                     topic: str) -> None:
    # Given the deploy producer user without PUBLISH
    acl_redis.set_user("mute", *_acl_rules()["fabric-producer"], "-publish")
    lines, ids = _ticks(30)

    # When it publishes to three new streams
    producer = run("publish", "--topic", topic, "--namespace", NS, "--redis-url", acl_redis.user_url("mute"),
                   stdin=lines)

    # Then every event lands, and it said once what it could not do and how to allow it
    assert await producer.exit_code() == 0, producer.output()
    out = producer.output()
    assert out.count("cannot announce new streams") == 1 and "+publish &fabric:streams:new" in out, out
    assert "Traceback" not in out, out
    streams = [Keys(NS).stream(topic, Priority.NORMAL, f"S{i}") for i in range(3)]
    assert sum([await admin.xlen(s) for s in streams]) == len(ids)


async def test_a_worker_that_may_not_follow_new_streams_nor_unblock_warns_once_and_loses_nothing(
        acl_redis: AclRedis, admin: Redis, run, topic: str) -> None:
    # Given a worker as the deploy worker user without SUBSCRIBE, nor CLIENT ID and UNBLOCK
    acl_redis.set_user("deaf", *_acl_rules()["fabric-worker"], "-subscribe", "-client|id", "-client|unblock")
    worker = run(*_worker_args(acl_redis.user_url("deaf"), topic))

    # When events are published to new streams of its topic
    lines, ids = _ticks(30)
    producer = run("publish", "--topic", topic, "--namespace", NS, "--redis-url",
                   acl_redis.user_url("fabric-producer"), stdin=lines)
    assert await producer.exit_code() == 0, producer.output()

    # Then it handles every one (its periodic discovery joined the streams), and stops (its blocked reads run to
    # their end), having warned once of each
    await eventually(lambda: _handled(admin, worker.record_ns, len(ids)), what="every event handled")
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.exit_code() == 0, worker.output()
    out = worker.output()
    assert out.count("cannot follow new streams") == 1 and "+subscribe &fabric:streams:new" in out, out
    assert out.count("refused CLIENT ID or CLIENT UNBLOCK") == 1 and "+client|id +client|unblock" in out, out
    assert "Traceback" not in out, out


async def _handled(client: Redis, ns: str, n: int) -> bool:
    return bool(await client.llen(handled_key(ns)) >= n)


async def test_the_producer_user_may_not_read_the_streams(acl_redis: AclRedis, run, topic: str) -> None:
    worker = run(*_worker_args(acl_redis.user_url("fabric-producer"), topic))
    assert await worker.exit_code() == 4
    assert "+xreadgroup" in _error_line(worker.output())


# ---- a wrong password ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["worker", "publish"])
async def test_a_wrong_password_exits_4_at_once_after_one_connection(acl_redis: AclRedis, run, topic: str,
                                                                      command: str) -> None:
    with Proxy("127.0.0.1", acl_redis.port) as proxy:
        url = proxy.url(user="fabric-worker", password="wrong")
        if command == "worker":
            p = run(*_worker_args(url, topic))
        else:
            p = run("publish", "--topic", topic, "--namespace", NS, "--redis-url", url, stdin=_ticks(5)[0])
        assert await p.exit_code() == 4, p.output()
        line = _error_line(p.output())
        assert "rejected the credentials" in line and "wrong" not in line, "the password is never printed"
        assert proxy.accepted == 1, f"{proxy.accepted} connections for one refused password"


async def test_a_publisher_with_a_wrong_password_fails_every_call_without_reconnecting(acl_redis: AclRedis) -> None:
    with Proxy("127.0.0.1", acl_redis.port) as proxy:
        client = connect(proxy.url(user="fabric-producer", password="wrong"))
        try:
            async with Publisher(client, keys=Keys(NS)) as pub:
                for _ in range(3):
                    with pytest.raises(AuthenticationFailed):
                        await pub.publish(Tick(symbol="S", bid=1.0, ask=2.0))
        finally:
            await client.aclose()
        assert proxy.accepted == 3, "one connection attempt per call, no retries of a refused password"


# ---- TLS ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[int]:
    port = _free_port()
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}"
    with redis_server(tmp_path_factory.mktemp("tls-redis"), "--port", "0", "--tls-port", str(port),
                      "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
                      "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no", url=url):
        yield port


async def test_a_worker_and_a_producer_work_end_to_end_over_tls(tls_port: int, certs: Certs, run,
                                                               topic: str) -> None:
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={certs.ca}"
    worker = run(*_worker_args(url, topic), record_url=url)
    lines, ids = _ticks(30)
    producer = run("publish", "--topic", topic, "--namespace", NS, "--redis-url", url, stdin=lines)
    assert await producer.exit_code() == 0, producer.output()
    client = connect(url)
    try:
        ns = worker.record_ns
        await eventually(lambda: _handled(client, ns, len(ids)), what="every event handled over TLS")
        assert {raw.decode().split("|")[0] for raw in await client.lrange(handled_key(ns), 0, -1)} == set(ids)
    finally:
        await client.aclose()
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.exit_code() == 0, worker.output()


@pytest.mark.parametrize("command", ["worker", "publish"])
async def test_a_ca_that_did_not_sign_the_server_exits_3_saying_so(tls_port: int, certs: Certs, run, topic: str,
                                                                  command: str) -> None:
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={certs.other_ca}"
    if command == "worker":
        p = run(*_worker_args(url, topic))
    else:
        p = run("publish", "--topic", topic, "--namespace", NS, "--redis-url", url, stdin=_ticks(5)[0])
    assert await p.exit_code() == 3, p.output()
    line = _error_line(p.output())
    assert "TLS handshake" in line and "CERTIFICATE_VERIFY_FAILED" in line and "ssl_ca_certs" in line, line


async def test_a_plain_url_to_a_tls_port_says_to_use_rediss(tls_port: int) -> None:
    url = f"redis://127.0.0.1:{tls_port}/0"
    client = connect(url)
    try:
        with pytest.raises(RedisUnavailable) as err, translated(url):
            await client.ping()
    finally:
        await client.aclose()
    assert "use rediss://" in str(err.value)


# ---- an evicting Redis ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
async def test_a_worker_refuses_an_evicting_redis_in_one_line(acl_redis: AclRedis, admin: Redis, run, topic: str,
                                                             policy: str) -> None:
    await admin.config_set("maxmemory-policy", policy)
    try:
        worker = run(*_worker_args(acl_redis.url, topic))
        assert await worker.exit_code() == 1, worker.output()
    finally:
        await admin.config_set("maxmemory-policy", "noeviction")
    line = _error_line(worker.output())
    assert f"maxmemory-policy {policy}" in line and "noeviction" in line, line


async def test_a_user_that_may_not_read_the_policy_is_warned_not_refused(acl_redis: AclRedis,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    client = connect(acl_redis.user_url("fabric-producer"))  # neither INFO nor CONFIG
    try:
        with caplog.at_level(logging.WARNING, "fabric.preflight"):
            await preflight.check_eviction(client)
    finally:
        await client.aclose()
    assert "cannot read maxmemory-policy" in caplog.text and "+info" in caplog.text


async def test_a_user_that_may_not_multi_is_warned_and_the_check_skipped(acl_redis: AclRedis,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    acl_redis.set_user("nomulti", "~*", "+@all", "-multi")
    client = connect(acl_redis.user_url("nomulti"))
    try:
        with caplog.at_level(logging.WARNING, "fabric.preflight"):
            await preflight.check_publisher(client, Keys(NS))
    finally:
        await client.aclose()
    assert "+multi +discard" in caplog.text


def test_the_acl_file_loads_as_is(tmp_path: Path) -> None:
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with redis_server(tmp_path, "--port", str(port), "--aclfile", str(ACL_FILE), url=url), \
            sync_redis.Redis(port=port) as r:
        users = set(r.execute_command("ACL", "USERS"))
    assert {b"fabric-producer", b"fabric-worker"} <= users
