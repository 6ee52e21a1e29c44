"""Every dashboard query and alert rule, evaluated by a real Prometheus that scrapes workers' metrics ports.

A ``prometheus`` binary (Debian's package) starts on a free loopback port with a scrape config pointing at
``worker_metrics_ports`` and the rule file of deploy/prometheus. Once it has scraped each worker a few times
and evaluated the rules, every query of the Grafana dashboard and every alert expression goes through its
HTTP API: a query error fails, so does an empty result for a series that must exist, a rule whose
evaluation failed, or two series of one panel that the legend cannot tell apart.

``worker_metrics_ports`` serves two fake workers (tests/deploy/fake_worker.py: the worker's own collectors on
their own ports). Pointing it at real workers is one fixture: yield their metrics ports instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.fake_worker import fake_worker
from tests.deploy.helpers import DEPLOY, free_port

pytestmark = pytest.mark.integration

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "emotion-stream.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\bemotion_[a-z0-9_]+\b")
SCRAPES_BEFORE_QUERYING = 4  # rate() over [1m] needs two samples; a few more keep a slow scrape from racing us
# Series a healthy worker only has once something happened (a labelled counter appears with its first
# increment): a query over them alone may come back empty.
EVENT_COUNTERS = {
    "emotion_dead_letters_total",
    "emotion_engine_fallbacks_total",
    "emotion_offset_resets_total",
    "emotion_partitions_changes_total",
    "emotion_l2_rebuilds_total",
    "emotion_conversation_alerts_total",
    "emotion_cache_evictions_total",
    "emotion_oom_splits_total",
    "emotion_errors_total",
}


@pytest.fixture(scope="module")
def worker_metrics_ports() -> Iterator[list[int]]:
    """Metrics ports of the workers to scrape: two fake workers owning partitions 0-1 and 2-3."""
    with ExitStack() as stack:
        yield [stack.enter_context(fake_worker(partitions=(2 * i, 2 * i + 1))) for i in range(2)]


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with the error in the body
            with exc:
                body = json.load(exc)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", f"{expr!r} gave a {data['resultType']}"
        result: list[dict[str, Any]] = data["result"]
        return result


def _wait(condition: Any, what: str, timeout_s: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"prometheus exited with {proc.returncode} while waiting for {what}:\n{log.read_text()[-3000:]}"
            )
        try:
            if condition():
                return
        except (OSError, AssertionError):
            pass  # not up yet
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prometheus(
    prometheus_bin: Path, worker_metrics_ports: list[int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "emotion-stream",
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in worker_metrics_ports]}],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(prometheus_bin),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        n = len(worker_metrics_ports)

        def scraped_enough() -> bool:
            counts = prom.query(f'count_over_time(up{{job="emotion-stream"}}[1m]) >= {SCRAPES_BEFORE_QUERYING}')
            ups = prom.query('up{job="emotion-stream"} == 1')
            return len(counts) == n and len(ups) == n

        def rules_evaluated() -> bool:
            groups = prom.get("/api/v1/rules")["groups"]
            return bool(groups) and all(r.get("lastEvaluation", "").startswith("2") for g in groups for r in g["rules"])

        _wait(scraped_enough, f"{SCRAPES_BEFORE_QUERYING} scrapes of {n} workers", 60, proc, log)
        _wait(rules_evaluated, "a first evaluation of every rule", 30, proc, log)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(p["title"], t) for p in dashboard["panels"] for t in p["targets"]]


def _alert_rules() -> list[dict[str, Any]]:
    spec = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [r for g in spec["groups"] for r in g["rules"]]


def _legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def test_the_workers_are_scraped(prometheus: Prometheus, worker_metrics_ports: list[int]) -> None:
    names = set(prometheus.get("/api/v1/label/__name__/values"))
    assert {"emotion_messages_total", "emotion_stage_seconds_bucket", "emotion_consumer_lag_seconds"} <= names
    instances = {r["metric"]["instance"] for r in prometheus.query('up{job="emotion-stream"}')}
    assert instances == {f"127.0.0.1:{p}" for p in worker_metrics_ports}


@pytest.mark.parametrize(("panel", "target"), _dashboard_targets(), ids=lambda v: v if isinstance(v, str) else "")
def test_dashboard_query(prometheus: Prometheus, panel: str, target: dict[str, Any]) -> None:
    expr = target["expr"]
    names = set(METRIC.findall(expr))
    scraped = set(prometheus.get("/api/v1/label/__name__/values"))
    missing = {n for n in names - scraped if n not in EVENT_COUNTERS}
    assert not missing, f"{panel}: {expr!r} reads {sorted(missing)}, which no worker exposes"
    result = prometheus.query(expr)  # raises on a query error
    if names - EVENT_COUNTERS:
        assert result, f"{panel}: {expr!r} returned nothing"
    legends = [_legend(target.get("legendFormat", ""), r["metric"]) for r in result]
    assert len(set(legends)) == len(legends), f"{panel}: series share a legend: {sorted(legends)}"


def test_legends_are_distinct_within_each_panel(prometheus: Prometheus) -> None:
    by_panel: dict[str, list[str]] = {}
    for panel, target in _dashboard_targets():
        for r in prometheus.query(target["expr"]):
            by_panel.setdefault(panel, []).append(_legend(target.get("legendFormat", ""), r["metric"]))
    for panel, legends in by_panel.items():
        assert len(set(legends)) == len(legends), f"{panel}: {sorted(legends)}"


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda r: r.get("alert", r.get("record", "")))
def test_alert_rule(prometheus: Prometheus, rule: dict[str, Any]) -> None:
    names = set(METRIC.findall(rule["expr"]))
    scraped = set(prometheus.get("/api/v1/label/__name__/values"))
    missing = {n for n in names - scraped if n not in EVENT_COUNTERS}
    assert not missing, f"{rule['alert']} reads {sorted(missing)}, which no worker exposes"
    prometheus.query(rule["expr"])  # raises on a query error
    loaded = {r["name"]: r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]}
    state = loaded[rule["alert"]]
    assert state["health"] == "ok", f"{rule['alert']}: {state.get('lastError')}"


def test_a_bad_query_fails(prometheus: Prometheus) -> None:
    with pytest.raises(AssertionError, match="bad_data"):
        prometheus.query("sum by (instance (emotion_ready)")
    assert prometheus.query("emotion_no_such_metric") == []
