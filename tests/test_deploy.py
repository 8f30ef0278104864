"""deploy/: the Prometheus config and alert rules pass promtool (and the rules their unit tests), the Grafana
dashboard's queries parse and name only fabric's metrics, and the Kubernetes and KEDA examples match what
``fabric worker`` accepts.

promtool comes with Debian's ``prometheus`` package. Without it the promtool tests skip locally and fail under
CI (``CI`` set), as tests/conftest.py does for redis-server. PyYAML is not a dependency, so the YAML files are
read by promtool, or as text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fabric.cli import app
from fabric.config import load_config

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "fabric-dashboard.json"
KEDA = DEPLOY / "keda" / "scaledobject.yaml"
WORKER = DEPLOY / "kubernetes" / "worker.yaml"

METRICS = frozenset({
    "fabric_published_events_total",
    "fabric_delivered_events_total",
    "fabric_handled_events_total",
    "fabric_failed_events_total",
    "fabric_retried_events_total",
    "fabric_dead_lettered_events_total",
    "fabric_rejected_events_total",
    "fabric_invalid_events_total",
    "fabric_reclaimed_events_total",
    "fabric_refused_commits_total",
    "fabric_trimmed_pending_events_total",
    "fabric_breaker_transitions_total",
    "fabric_handler_duration_seconds",
    "fabric_end_to_end_latency_seconds",
    "fabric_read_batch_size",
    "fabric_consumer_lag",
    "fabric_pending_events",
    "fabric_oldest_pending_age_seconds",
    "fabric_dead_letters",
    "fabric_breaker_state",
    "fabric_workers_ready",
})
"""Every metric family fabric exports (histograms by their base name): what deploy/ may query."""
HISTOGRAMS = frozenset({
    "fabric_handler_duration_seconds", "fabric_end_to_end_latency_seconds", "fabric_read_batch_size",
})
ALERTS = frozenset({"FabricHandlerSlow", "FabricConsumerLagHigh", "FabricBreakerOpen", "FabricDeadLettersGrowing",
                    "FabricValidationFailures"})


def _family(series: str) -> str:
    """The family a series name belongs to: ``x_bucket``, ``x_sum`` and ``x_count`` of a histogram are ``x``."""
    base, _, suffix = series.rpartition("_")
    return base if suffix in ("bucket", "sum", "count") and base in HISTOGRAMS else series


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        message = "promtool is not installed (apt-get install -y --no-install-recommends prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(["promtool", *args], cwd=ROOT, capture_output=True, text=True, timeout=50)


def _succeeded(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and "SUCCESS" in result.stdout + result.stderr


# ---- Prometheus --------------------------------------------------------------------------------------------------


def test_prometheus_config_and_its_rule_files_pass_promtool() -> None:
    # When promtool checks the static scrape config (which loads alerts.yml through rule_files)
    result = _promtool("check", "config", "deploy/prometheus/prometheus.yml")

    # Then both are valid
    assert _succeeded(result), result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_kubernetes_scrape_config_passes_promtool(tmp_path: Path) -> None:
    # When promtool checks the Kubernetes scrape config
    path = PROMETHEUS / "prometheus-kubernetes.yml"
    result = _promtool("check", "config", str(path))

    # Then it is valid; Debian's promtool is built without Kubernetes discovery, so with it everything but the
    # two-line discovery block is checked: the same file with static targets in its place
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        discovery = "    kubernetes_sd_configs:\n      - role: pod\n"
        text = path.read_text()
        assert discovery in text
        text = text.replace(discovery, '    static_configs:\n      - targets: ["pod:9464"]\n')
        text = text.replace("  - alerts.yml\n", f"  - {PROMETHEUS / 'alerts.yml'}\n")
        (tmp_path / path.name).write_text(text)
        result = _promtool("check", "config", str(tmp_path / path.name))
    assert _succeeded(result), result.stdout + result.stderr


def test_alert_rules_pass_promtool() -> None:
    # When promtool checks the alert rules
    result = _promtool("check", "rules", "deploy/prometheus/alerts.yml")

    # Then every rule is valid
    assert _succeeded(result), result.stdout + result.stderr
    assert f"{len(ALERTS)} rules found" in result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    # When promtool runs the alerts' unit tests (for each alert, series that fire it and series that do not)
    result = _promtool("test", "rules", "deploy/prometheus/alerts_test.yml")

    # Then every expectation holds
    assert _succeeded(result), result.stdout + result.stderr


def test_the_alerts_are_the_designs_conditions_and_each_is_unit_tested() -> None:
    # Given the alert rules and their unit tests, read as text
    rules = (PROMETHEUS / "alerts.yml").read_text()
    tests = (PROMETHEUS / "alerts_test.yml").read_text()

    # Then the rules are exactly the design's five alerts, each with a severity and a for: duration
    assert set(re.findall(r"^\s*- alert: (\w+)$", rules, re.M)) == ALERTS
    assert len(re.findall(r"^\s*severity: (?:warning|critical)$", rules, re.M)) == len(ALERTS)
    assert len(re.findall(r"^\s*for: \d+m$", rules, re.M)) == len(ALERTS)
    # And each is tested firing (a case expecting it) and not firing (a case expecting nothing)
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", tests)
    assert {name for name, empty in cases if not empty} == ALERTS
    assert {name for name, empty in cases if empty} == ALERTS


# ---- Grafana -----------------------------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]  # a collapsed row holds its panels
    return panels


def _queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_NOT_NAMES = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*+(?!\s*\()")  # possessive: a call's name is no word
_KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "Inf", "NaN"})


def _series_names(expr: str) -> set[str]:
    """The series a PromQL expression selects: its words that are not functions, keywords, labels or durations."""
    bare = _NOT_NAMES.sub(" ", _STRING.sub('""', expr))
    bare = re.sub(r"\b\d[\w.]*", " ", bare)  # numbers and durations
    return {w for w in _WORD.findall(bare) if w not in _KEYWORDS}


def test_series_names_reads_a_promql_expression() -> None:
    expr = ('sum by (group) (rate(fabric_invalid_events_total{group=~"$group"}[5m])) / on (group) '
            'histogram_quantile(0.99, sum by (le) (rate(fabric_read_batch_size_bucket[1m]))) or vector(0)')
    assert _series_names(expr) == {"fabric_invalid_events_total", "fabric_read_batch_size_bucket"}


def test_dashboard_queries_name_only_fabrics_metrics() -> None:
    # Given every query of every panel
    queries = _queries(_dashboard())
    assert queries

    # Then each selects only series of the families fabric exports
    for expr in queries:
        names = _series_names(expr)
        assert names, expr
        assert {_family(n) for n in names} <= METRICS, expr


def test_dashboard_shows_every_metric() -> None:
    families = {_family(n) for expr in _queries(_dashboard()) for n in _series_names(expr)}
    assert families == METRICS


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    # Given every dashboard query as a recording rule, Grafana's variables replaced by values
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(_queries(_dashboard())):
        concrete = expr.replace("$__rate_interval", "1m").replace("$group", ".*")
        assert "$" not in concrete, expr
        rules += [f"      - record: dashboard_query_{i}", f"        expr: {json.dumps(concrete)}"]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(rules) + "\n")

    # When promtool checks them
    result = _promtool("check", "rules", str(path))

    # Then every one parses
    assert _succeeded(result), result.stdout + result.stderr


def test_dashboard_has_datasource_and_group_variables() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["group"]["type"] == "query"
    assert variables["group"]["query"]["query"].startswith("label_values(fabric_")
    # And every panel queries the chosen data source
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_dashboard_panels_have_unique_ids_and_the_issues_subjects() -> None:
    panels = _panels(_dashboard())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in panels)
    for subject in ("published", "handled", "failed", "latency", "handler duration", "lag", "pending",
                    "dead letters", "breaker state", "breaker transitions", "ready workers"):
        assert subject in titles, subject


# ---- the metric list ---------------------------------------------------------------------------------------------


def test_the_metric_list_is_fabrics() -> None:
    try:
        from fabric import metrics
    except ImportError:
        pytest.skip("fabric.metrics is not there yet")
    names = getattr(metrics, "NAMES", None)
    if names is None:
        pytest.skip("fabric.metrics has no NAMES yet")
    assert frozenset(names) == METRICS


def test_deploy_files_name_only_fabrics_metrics() -> None:
    # Given every file under deploy/ (alert rules and their tests, the KEDA query, the README)
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        # Then every fabric_… word in it is a series of a family fabric exports
        words = set(re.findall(r"\bfabric_[a-z0-9_]+", path.read_text()))
        assert {_family(w) for w in words} <= METRICS, path


# ---- Kubernetes and KEDA -----------------------------------------------------------------------------------------


def _block(text: str, key: str) -> str:
    """The literal block scalar (``key: |``) in YAML ``text``, dedented."""
    match = re.search(rf"^(\s*){re.escape(key)}: \|\n((?:\1\s+\S.*\n|\s*\n)+)", text, re.M)
    assert match is not None, key
    return textwrap.dedent(match.group(2))


def test_keda_scales_the_worker_deployment_on_the_groups_lag() -> None:
    keda = KEDA.read_text()
    worker = WORKER.read_text()

    assert "kind: ScaledObject" in keda
    assert re.search(r"^\s*- type: prometheus$", keda, re.M)
    query = re.search(r"^\s*query: (.+)$", keda, re.M)
    assert query is not None
    assert query.group(1) == 'sum(max by (topic, priority) (fabric_consumer_lag{group="indicators"}))'
    # And it scales the Deployment of deploy/kubernetes/worker.yaml, never to zero (a worker samples the lag)
    target = re.search(r"scaleTargetRef:\n\s+name: (\S+)", keda)
    assert target is not None
    assert re.search(rf"kind: Deployment\nmetadata:\n\s+name: {re.escape(target.group(1))}\n", worker)
    assert re.search(r"^\s*minReplicaCount: [1-9]", keda, re.M)
    # And it shows the redis-streams trigger, which watches a single stream, as the alternative
    assert "type: redis-streams" in keda


def test_worker_manifest_runs_the_config_with_metrics_and_probes() -> None:
    worker = WORKER.read_text()
    command = re.search(r"^\s*command: (\[.*\])$", worker, re.M)
    assert command is not None
    argv = json.loads(command.group(1))

    assert argv[:4] == ["fabric", "worker", "--config", "/config/fabric.toml"]
    port = argv[argv.index("--metrics-port") + 1]
    assert f'prometheus.io/port: "{port}"' in worker
    assert 'prometheus.io/scrape: "true"' in worker
    assert f"containerPort: {port}" in worker
    assert re.search(r"livenessProbe:\n\s+httpGet:\n\s+path: /healthz\n", worker)
    assert re.search(r"readinessProbe:\n\s+httpGet:\n\s+path: /readyz\n", worker)
    assert "mountPath: /config" in worker


def test_worker_manifest_uses_only_flags_fabric_worker_has() -> None:
    worker = WORKER.read_text()
    command = re.search(r"^\s*command: (\[.*\])$", worker, re.M)
    assert command is not None
    flags = [a for a in json.loads(command.group(1)) if a.startswith("--")]

    result = CliRunner().invoke(app, ["worker", "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}\b", result.stdout), flag


def test_worker_manifest_config_is_valid_and_outlasted_by_the_termination_grace(tmp_path: Path) -> None:
    # Given the fabric.toml the manifest's ConfigMap holds
    worker = WORKER.read_text()
    path = tmp_path / "fabric.toml"
    path.write_text(_block(worker, "fabric.toml"))

    # When fabric loads it
    config = load_config(path)

    # Then it has the workers, and Kubernetes waits longer than their drain before it kills a pod
    assert config.workers
    grace = re.search(r"^\s*terminationGracePeriodSeconds: (\d+)$", worker, re.M)
    assert grace is not None
    assert all(int(grace.group(1)) > spec.grace_s for spec in config.workers.values())
