"""Every dashboard query and alert rule, evaluated by a real Prometheus that scrapes workers' metrics ports.

A ``prometheus`` binary (Debian's package) starts on a free loopback port with a scrape config pointing at
``worker_metrics_ports`` and the rule file of deploy/prometheus. Once it has scraped each worker a few times
and evaluated the rules, every query of the Grafana dashboard and every alert expression goes through its
HTTP API: a query error fails, so does an empty result for a series that must exist, a rule whose
evaluation failed, or two series of one panel that the legend cannot tell apart.

``worker_metrics_ports`` runs each check twice: against two real workers (``emotion-stream worker``
subprocesses on a local Kafka that processed valid, repeated and malformed messages, so every series a
dashboard reads exists as in production: tests/deploy/real_worker.py) and against two fake ones (the
worker's own collectors kept moving on their own ports, every label value filled: tests/deploy/fake_worker.py),
which is fast and covers series a healthy worker only has once something went wrong.
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
from tests.deploy.real_worker import MALFORMED, MESSAGES, real_workers

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


@pytest.fixture(scope="module", params=["real", "fake"])
def worker_metrics_ports(
    request: pytest.FixtureRequest, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[int]]:
    """Metrics ports of the workers to scrape: two real workers of one group on a 4-partition input, or two
    fake workers owning partitions 0-1 and 2-3."""
    with ExitStack() as stack:
        if request.param == "real":
            yield stack.enter_context(real_workers(cache_dir, tmp_path_factory.mktemp("real-workers")))
        else:
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


README = DEPLOY.parent / "README.md"
_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def _readme_metrics() -> dict[str, str]:
    """``{metric name: its labels cell}`` of the README's metrics table (``emotion_gpu_*`` kept as a pattern)."""
    section = README.read_text(encoding="utf-8").split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, str] = {}
    for row in section.splitlines():
        if row.startswith("| `emotion_"):
            names, _kind, labels = (cell.strip() for cell in row.strip().strip("|").split("|"))
            table |= dict.fromkeys(re.findall(r"`(emotion_[a-z0-9_*]+)`", names), labels)
    return table


def _listed(name: str, table: dict[str, str]) -> bool:
    return name in table or any(p.endswith("*") and name.startswith(p[:-1]) for p in table)


def _label_values(prometheus: Prometheus, expr: str, label: str) -> set[str]:
    return {r["metric"].get(label, "") for r in prometheus.query(expr)}


def test_a_real_worker_exposes_what_the_readme_lists_and_nothing_it_does_not(
    prometheus: Prometheus, request: pytest.FixtureRequest
) -> None:
    if request.node.callspec.params["worker_metrics_ports"] != "real":
        pytest.skip("the fake workers expose every collector by construction; the real ones are the question")
    table = _readme_metrics()
    exposed = set()
    for name in prometheus.get("/api/v1/label/__name__/values"):
        if name.startswith("emotion_"):
            base = next((name.removesuffix(s) for s in _SUFFIXES if name.endswith(s)), name)
            exposed.add(base if _listed(base, table) or not _listed(f"{base}_total", table) else f"{base}_total")
    assert not {n for n in exposed if not _listed(n, table)}, "exposed but missing from the README's table"
    wanted = {n for n in table if "*" not in n} - EVENT_COUNTERS
    assert not wanted - exposed, "listed in the README (and always there) but not exposed by a real worker"
    # the label values the README promises are the ones a worker that processed messages has
    stages = {s.strip() for s in table["emotion_stage_seconds"].removeprefix("stage:").split(",")}
    assert _label_values(prometheus, "sum by (stage) (emotion_stage_seconds_count)", "stage") == stages
    phases = {s.strip() for s in table["emotion_cold_start_seconds"].removeprefix("phase:").split(",")}
    assert _label_values(prometheus, "max by (phase) (emotion_cold_start_seconds)", "phase") == phases
    levels = _label_values(prometheus, 'sum by (level) (emotion_cache_lookups_total{result="hit"})', "level")
    assert "l1" in levels  # the repeats were answered by the cache
    assert _label_values(prometheus, "sum by (reason) (emotion_dead_letters_total)", "reason") >= {"undecodable"}
    # each input partition's lag is reported by exactly one worker: its owner
    owners = prometheus.query("count by (partition) (emotion_consumer_lag_messages)")
    assert {r["metric"]["partition"]: r["value"][1] for r in owners} == {str(p): "1" for p in range(4)}
    assert prometheus.query("sum(emotion_assigned_partitions)")[0]["value"][1] == "4"
    assert prometheus.query("sum(emotion_messages_total)")[0]["value"][1] == str(MESSAGES + len(MALFORMED))
