"""The Grafana dashboard, read as a file: well formed, and every query names series the worker exposes.

Whether the queries run and return distinct series per worker is checked against a real Prometheus in
test_prometheus_live.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy.fake_worker import FakeWorker
from tests.deploy.helpers import DEPLOY

pytestmark = pytest.mark.unit

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "emotion-stream.json"
METRIC = re.compile(r"\bemotion_[a-z0-9_]+\b")


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in _dashboard()["panels"] for target in panel["targets"]]


def exposed_sample_names() -> set[str]:
    """Every sample name one worker's /metrics carries (``_bucket``, ``_total``... included)."""
    worker = FakeWorker(partitions=(0,))
    worker.tick()
    return {sample.name for family in worker.registry.collect() for sample in family.samples}


def test_panels_are_well_formed() -> None:
    panels = _dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for override in panel["fieldConfig"].get("overrides", []):
            if override["matcher"]["id"] == "byFrameRefID":
                assert override["matcher"]["options"] in refs, panel["title"]


def test_every_query_names_exposed_metrics() -> None:
    exposed = exposed_sample_names()
    for panel, target in _targets():
        names = set(METRIC.findall(target["expr"]))
        assert names, f"{panel['title']}: a query with no emotion_ metric"
        assert names <= exposed, f"{panel['title']}: {sorted(names - exposed)} are not exposed by the worker"


def test_the_checker_knows_a_missing_metric() -> None:
    exposed = exposed_sample_names()
    assert "emotion_stage_seconds_bucket" in exposed and "emotion_consumer_lag_seconds" in exposed
    assert "emotion_queue_seconds_bucket" not in exposed


def test_resource_panel_shows_memory_and_lag_has_a_panel() -> None:
    by_title = {p["title"]: p for p in _dashboard()["panels"]}
    resources = " ".join(t["expr"] for t in by_title["CPU / memory / GPU"]["targets"])
    assert "emotion_process_rss_bytes" in resources and "emotion_process_cpu_percent" in resources
    lag = " ".join(t["expr"] for t in by_title["Consumer lag"]["targets"])
    assert "emotion_consumer_lag_seconds" in lag and "emotion_consumer_lag_messages" in lag


def test_unaggregated_queries_tell_workers_apart() -> None:
    """A query that keeps one series per worker must name the worker in its legend."""
    for panel, target in _targets():
        expr, legend = target["expr"], target.get("legendFormat", "")
        aggregated = re.match(r"^\s*(sum|max|min|avg|count|histogram_quantile)\b", expr)
        keeps_instance = not aggregated or re.search(r"by \([^)]*\binstance\b", expr)
        if keeps_instance:
            assert "{{instance}}" in legend, f"{panel['title']}: {expr!r} has legend {legend!r}"
