"""deploy/cluster/: the compose file and the Kubernetes manifests for fabric on a Redis Cluster.

The YAML is parsed (PyYAML; without it these tests skip locally and fail under CI, as tests/conftest.py does for
redis-server), and checked against what fabric accepts: the workers' URL selects the cluster client, their
command uses flags ``fabric worker`` has, their config loads, the grace periods outlast it. The nodes' Redis
config and the one-shot ``redis-cli --cluster create`` script run for real on loopback: six nodes on
127.0.0.2..7 (one address per compose service), joined by the script into three masters with a replica each.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from fabric.cli import app
from fabric.client import connect, is_cluster_url
from fabric.config import load_config
from fabric.embedded import STREAM_NODE_SETTINGS
from fabric.nodes import is_cluster

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "deploy" / "cluster"
COMPOSE = CLUSTER / "compose.yaml"
K8S = CLUSTER / "k8s"
NODES = [f"redis-{n}" for n in range(1, 7)]
REDIS_IMAGE = re.compile(r"redis:7\.\d+")
"""Hostname announcements (cluster-preferred-endpoint-type) need Redis 7."""


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        message = "PyYAML is not installed (pip install pyyaml)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return yaml


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = _yaml().safe_load(COMPOSE.read_text())
    return document


def _manifests() -> dict[str, dict[str, Any]]:
    """The k8s documents by kind, every file the kustomization lists."""
    yaml = _yaml()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"] for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one document of each kind"
    return by_kind


def _flags_fabric_worker_lacks(argv: list[str]) -> list[str]:
    result = CliRunner().invoke(app, ["worker", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return [a for a in argv if a.startswith("--") and not re.search(rf"{re.escape(a)}\b", result.stdout)]


def _cluster_url_hosts(url: str) -> list[str]:
    parts = urlsplit(url)
    assert parts.scheme in ("redis+cluster", "rediss+cluster"), url
    assert is_cluster_url(url)
    return [h.rpartition(":")[0] for h in parts.netloc.rsplit("@", 1)[-1].split(",")]


async def test_the_url_forms_the_deploy_files_use_give_a_cluster_client() -> None:
    # Given the workers' URL in compose.yaml and the Secret's URL the k8s manifest tells you to create
    compose_url = _compose()["services"]["worker"]["environment"]["FABRIC_REDIS_URL"]
    secret = re.search(r"--from-literal=url='([^']+)'", (K8S / "worker.yaml").read_text())
    assert secret is not None

    for url in (compose_url, secret.group(1)):
        # When fabric connects with it (redis-py's cluster client connects on first use: nothing is reached here)
        client = connect(url)

        # Then it is the cluster client
        assert is_cluster(client)
        await client.aclose()


# ---- compose -----------------------------------------------------------------------------------------------------


def test_compose_runs_six_cluster_nodes_from_one_config() -> None:
    services = _compose()["services"]

    for name in NODES:
        node = services[name]
        assert REDIS_IMAGE.fullmatch(node["image"]), node["image"]
        assert node["hostname"] == name
        # each node runs the shared config and announces its own name (what MOVED replies and the slot map say)
        assert node["command"] == ["redis-server", "/usr/local/etc/redis/node.conf",
                                   "--cluster-announce-hostname", name]
        assert {"source": "redis-node", "target": "/usr/local/etc/redis/node.conf"} in node["configs"]
        assert node["volumes"] == [f"{name}:/data"]  # nodes.conf and the AOF survive a restart
        assert node["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    conf = _redis_conf()
    assert conf["cluster-enabled"] == "yes"
    assert conf["cluster-preferred-endpoint-type"] == "hostname"
    assert conf["maxmemory-policy"] == "noeviction"  # fabric's start-up check refuses an evicting one
    assert "dir" not in conf  # the image's working directory: /data, the volume
    assert STREAM_NODE_SETTINGS.items() <= conf.items()  # the stream node settings fabric recommends


def _redis_conf() -> dict[str, str]:
    lines = (CLUSTER / "redis-node.conf").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines if line and not line.startswith("#"))  # type: ignore[misc]


def test_compose_joins_the_nodes_once_with_a_replica_each() -> None:
    services = _compose()["services"]
    init = services["cluster-init"]

    assert REDIS_IMAGE.fullmatch(init["image"])
    assert init["restart"] == "no"
    assert init["depends_on"] == {name: {"condition": "service_healthy"} for name in NODES}
    script = _init_script()
    assert "redis-cli --cluster create $nodes --cluster-replicas 1 --cluster-yes" in script
    assert "for n in 1 2 3 4 5 6; do" in script
    result = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def _init_script() -> str:
    """cluster-init's shell script as the container runs it (compose turns ``$$`` into ``$``)."""
    init = _compose()["services"]["cluster-init"]
    assert init["entrypoint"] == ["sh", "-c"]
    (script,) = init["command"]
    assert re.search(r"(?<!\$)\$(?!\$)", script) is None, "a single $ would be interpolated by compose"
    return str(script).replace("$$", "$")


def test_compose_workers_run_the_config_on_the_cluster_after_it_is_created() -> None:
    compose = _compose()
    worker = compose["services"]["worker"]

    # The URL names nodes of this file to start from
    hosts = _cluster_url_hosts(worker["environment"]["FABRIC_REDIS_URL"])
    assert hosts and set(hosts) <= set(NODES)
    # The command runs the mounted config with metrics, with flags fabric worker has
    argv = worker["command"]
    assert argv[:4] == ["fabric", "worker", "--config", "/config/fabric.toml"]
    assert "--metrics-port" in argv
    assert not _flags_fabric_worker_lacks(argv)
    assert {"source": "fabric", "target": "/config/fabric.toml"} in worker["configs"]
    assert (CLUSTER / compose["configs"]["fabric"]["file"]).resolve() == CLUSTER / "fabric.toml"
    assert (CLUSTER / compose["configs"]["redis-node"]["file"]).resolve() == CLUSTER / "redis-node.conf"
    # Only once the cluster exists
    assert worker["depends_on"] == {"cluster-init": {"condition": "service_completed_successfully"}}
    # And the image is built from this repository
    assert worker["build"] == {"context": "../..", "dockerfile": "deploy/cluster/Dockerfile"}
    for source in re.findall(r"^COPY (.+) \S+$", (CLUSTER / "Dockerfile").read_text(), re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path


def test_compose_workers_config_is_valid_and_outlasted_by_the_stop_grace_period() -> None:
    config = load_config(CLUSTER / "fabric.toml")
    grace = re.fullmatch(r"(\d+)s", _compose()["services"]["worker"]["stop_grace_period"])

    assert config.workers
    assert grace is not None
    assert all(int(grace.group(1)) > spec.grace_s for spec in config.workers.values())


# ---- Kubernetes --------------------------------------------------------------------------------------------------


def test_k8s_workers_take_the_cluster_url_from_a_secret() -> None:
    deployment = _manifests()["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}

    secret = env["FABRIC_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    text = (K8S / "worker.yaml").read_text()
    assert f"kubectl create secret generic {secret['name']} --from-literal={secret['key']}=" in text
    assert "value" not in env["FABRIC_REDIS_URL"]  # never the password in the manifest


def test_k8s_workers_run_the_configmaps_config_with_metrics_and_probes() -> None:
    manifests = _manifests()
    pod = manifests["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    argv = container["command"]

    assert argv[:4] == ["fabric", "worker", "--config", "/config/fabric.toml"]
    assert not _flags_fabric_worker_lacks(argv)
    port = int(argv[argv.index("--metrics-port") + 1])
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fabric"
    assert container["ports"] == [{"name": "metrics", "containerPort": port}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/config"
    (volume,) = pod["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    assert manifests["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_k8s_config_is_the_compose_one_and_outlasted_by_the_termination_grace(tmp_path: Path) -> None:
    manifests = _manifests()
    toml = manifests["ConfigMap"]["data"]["fabric.toml"]
    path = tmp_path / "fabric.toml"
    path.write_text(toml)

    config = load_config(path)

    assert toml == (CLUSTER / "fabric.toml").read_text()  # one config, two ways to run it
    grace = manifests["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert config.workers
    assert all(grace > spec.grace_s for spec in config.workers.values())


def test_k8s_manifests_build_with_kustomize() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: kustomize's build of deploy/cluster/k8s is not checked")
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    kinds = {d["kind"] for d in _yaml().safe_load_all(result.stdout) if d}
    assert kinds == {"ConfigMap", "Deployment"}


# ---- the nodes and the init script, run on loopback --------------------------------------------------------------


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        message = f"{binary} is not installed (apt-get install -y redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _port_free_on_all(port: int, hosts: list[str]) -> bool:
    for host in hosts:
        for p in (port, port + 10000):  # a cluster node also listens on its port + 10000 (the bus)
            with socket.socket() as s:
                try:
                    s.bind((host, p))
                except OSError:
                    return False
    return True


class LoopbackNodes:
    """The compose file's six nodes as local processes: redis-N on 127.0.0.(N+1), all on one free port, each
    started as compose starts it (the shared redis-node.conf, announcing a name), with its port and dir replaced."""

    def __init__(self, workdir: Path) -> None:
        self.hosts = [f"127.0.0.{n + 1}" for n in range(1, 7)]
        self.port = next(p for p in iter(lambda: 20000 + int.from_bytes(os.urandom(2), "big") % 20000, None)
                         if _port_free_on_all(p, self.hosts))
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self._start(workdir)
        except BaseException:
            self.stop()
            raise

    def _start(self, workdir: Path) -> None:
        services = _compose()["services"]
        for name, host in zip(NODES, self.hosts, strict=True):
            argv = [a.replace("/usr/local/etc/redis/node.conf", str(CLUSTER / "redis-node.conf"))
                    for a in services[name]["command"]]
            # announce the address, not the compose name: no DNS resolves redis-N here; and on the bus too (a
            # connection from 127.0.0.N leaves from 127.0.0.1, which the peer would take for its address)
            argv[argv.index(name)] = host
            argv += ["--cluster-announce-ip", host]
            node_dir = workdir / name
            node_dir.mkdir()
            self.procs.append(subprocess.Popen(
                [*argv, "--port", str(self.port), "--bind", host, "--dir", str(node_dir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for host in self.hosts:
            self._until(lambda h=host: self.cli(h, "PING") == "PONG", f"{host} to answer")  # type: ignore[misc]

    def cli(self, host: str, *args: str) -> str:
        return subprocess.run(["redis-cli", "-h", host, "-p", str(self.port), *args], capture_output=True,
                              text=True, timeout=30).stdout.strip()

    def roles(self) -> list[str]:
        """Every node's role as the first node sees it, sorted."""
        lines = self.cli(self.hosts[0], "CLUSTER", "NODES").splitlines()
        return sorted(line.split()[2].replace("myself,", "") for line in lines)

    @staticmethod
    def _until(check: Any, what: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")
            time.sleep(0.05)

    def run_init(self, bin_dir: Path) -> subprocess.CompletedProcess[str]:
        """cluster-init's script with ``getent`` resolving redis-N as compose's DNS would (to 127.0.0.(N+1)),
        its ``-h redis-1`` and port 6379 replaced by this set's."""
        getent = bin_dir / "getent"
        getent.write_text('#!/bin/sh\nn="${2#redis-}"\necho "127.0.0.$((n + 1))       $2"\n')
        getent.chmod(0o755)
        script = _init_script().replace("-h redis-1", f"-h {self.hosts[0]} -p {self.port}")
        script = script.replace(":6379", f":{self.port}")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=60)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def loopback_nodes(tmp_path: Path) -> Iterator[LoopbackNodes]:
    _need("redis-server")
    _need("redis-cli")
    nodes = LoopbackNodes(tmp_path)
    yield nodes
    nodes.stop()


@pytest.mark.anyio
async def test_the_init_script_makes_three_masters_with_a_replica_each_once(
        loopback_nodes: LoopbackNodes, tmp_path: Path) -> None:
    # When cluster-init's script runs on the compose file's nodes
    first = loopback_nodes.run_init(tmp_path)

    # Then the cluster is up: three masters with a replica each, every slot served
    assert first.returncode == 0, first.stdout + first.stderr
    info = loopback_nodes.cli(loopback_nodes.hosts[0], "CLUSTER", "INFO")
    assert "cluster_state:ok" in info and "cluster_slots_ok:16384" in info and "cluster_size:3" in info
    expected = ["master"] * 3 + ["slave"] * 3
    with contextlib.suppress(RuntimeError):  # the replicas' CLUSTER REPLICATE spreads by gossip
        loopback_nodes._until(lambda: loopback_nodes.roles() == expected, "three masters and three replicas")
    roles = loopback_nodes.roles()
    assert roles == expected
    # And fabric connects to it with a URL like the workers' (compose names replaced by these addresses)
    url = "redis+cluster://" + ",".join(f"{h}:{loopback_nodes.port}" for h in loopback_nodes.hosts[:3])
    client = connect(url)
    try:
        assert await client.ping()
        primaries = client.get_primaries()  # as the nodes announce themselves (compose: redis-N)
        assert len(primaries) == 3 and {p.host for p in primaries} <= set(loopback_nodes.hosts)
        for key in ("{a}", "{b}", "{c}"):
            await client.set(key, key)
            assert await client.get(key) == key.encode()
    finally:
        await client.aclose()
    # And a second run (a second `compose up`) leaves the cluster as it is
    second = loopback_nodes.run_init(tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "the cluster exists already" in second.stdout
    assert loopback_nodes.roles() == roles
