"""The alert rules, unit-tested with promtool (Debian's `prometheus` package): each fires on its scenario."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import DEPLOY

pytestmark = pytest.mark.deploy

PROM = DEPLOY / "prometheus"
RULES = PROM / "alerts.yml"
RULE_TESTS = PROM / "alerts.test.yml"


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False)


def _alerts(path: Path = RULES) -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {r["alert"]: r for group in rules["groups"] for r in group["rules"] if "alert" in r}


def _copy(tmp_path: Path) -> tuple[Path, Path]:
    shutil.copy(RULES, tmp_path / RULES.name)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return tmp_path / RULES.name, tmp_path / RULE_TESTS.name


def test_rules_and_config_are_valid(promtool: Path) -> None:
    proc = _run(promtool, "check", "rules", RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the compose Prometheus config, with the rule file it loads
    proc = _run(promtool, "check", "config", PROM / "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout


def test_every_alert_fires_on_its_scenario(promtool: Path) -> None:
    proc = _run(promtool, "test", "rules", RULE_TESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    spec = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in spec["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert alerts - firing == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"
    assert (firing | quiet) - alerts == set(), "tests name alerts that do not exist"


def test_a_wrong_expectation_fails(promtool: Path, tmp_path: Path) -> None:
    """promtool is not a rubber stamp: an expectation the rules do not meet fails the run."""
    _, tests = _copy(tmp_path)
    spec = yaml.safe_load(tests.read_text(encoding="utf-8"))
    lag = next(c for c in spec["tests"] if c["name"].startswith("lag in seconds"))
    lag["alert_rule_test"][-1]["exp_alerts"][0]["exp_labels"]["partition"] = "1"
    tests.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    proc = _run(promtool, "test", "rules", tests)
    assert proc.returncode != 0
    assert "EmotionStreamLagHigh" in proc.stdout + proc.stderr


def test_increase_alone_misses_a_fallback_at_start_up(promtool: Path, tmp_path: Path) -> None:
    """Why the fallback rule is a state: the old `increase(...[15m]) > 0` never fires for a counter born at 1."""
    rules, tests = _copy(tmp_path)
    spec = yaml.safe_load(rules.read_text(encoding="utf-8"))
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "EmotionStreamEngineFallback":
                rule["expr"] = "increase(emotion_engine_fallbacks_total[15m]) > 0"
    rules.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    proc = _run(promtool, "test", "rules", tests)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "name: an engine fallback at start-up fires on the first scrape" in out
    assert "alertname: EmotionStreamEngineFallback, time: 0s" in out


def test_every_alert_says_what_it_means() -> None:
    for name, rule in _alerts().items():
        assert rule.get("labels", {}).get("severity") in {"info", "warning", "critical"}, name
        assert rule.get("annotations", {}).get("summary"), name
