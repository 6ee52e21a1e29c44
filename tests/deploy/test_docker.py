"""The Dockerfile and compose file, checked without a Docker daemon: hadolint, the Compose specification's
JSON schema (from compose-go), and the facts the images rely on (extras, settings, the build context)."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from deploy.assert_no_cuda import forbidden
from stream_app.settings import settings_reference
from tests.deploy.helpers import DEPLOY, REPO, local_kafka_version

pytestmark = pytest.mark.deploy

DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
WORKER_STOP_BOUND_S = 15


def _dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # resolves the `<<` merges
    return data


def _stages() -> dict[str, str]:
    """Stage name -> its instructions (joined continuation lines)."""
    text = re.sub(r"\\\n", " ", _dockerfile())
    stages: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            name = match.group(1) or f"stage{len(stages)}"
            stages[name] = ""
        elif name is not None:
            stages[name] += line + "\n"
    return stages


def _duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


# --- hadolint -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hadolint(tools: Callable[[str], dict[str, Path]]) -> Callable[[Path], subprocess.CompletedProcess[str]]:
    binary = tools("hadolint")["hadolint"]

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), "--no-color", "--failure-threshold", "info", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


def test_dockerfile_passes_hadolint(hadolint: Callable[[Path], subprocess.CompletedProcess[str]]) -> None:
    proc = hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_a_careless_dockerfile(
    hadolint: Callable[[Path], subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install requests\n", encoding="utf-8")
    proc = hadolint(bad)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3013" in proc.stdout


# --- the images -----------------------------------------------------------------------------------------


def test_pip_installs_only_extras_that_exist() -> None:
    extras_defined = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    used = {e.strip() for group in re.findall(r"\.\[([^\]]+)\]", _dockerfile()) for e in group.split(",")}
    assert used, "no extras found: the pattern no longer matches the pip lines"
    assert used <= extras_defined, (
        f"extras the Dockerfile installs but pyproject lacks: {sorted(used - extras_defined)}"
    )


def test_cpu_image_installs_the_base_alone_and_checks_it() -> None:
    stages = _stages()
    cpu_build = stages["build-cpu"]
    assert re.search(r"pip install -c constraints\.txt \.(\s|$)", cpu_build), "the CPU image installs no extra"
    assert "assert_no_cuda.py" in cpu_build
    assert list(stages)[-1] == "cpu", "a plain `docker build` must give the CPU image"
    assert "COPY --from=build-cpu /opt/venv" in stages["cpu"]
    assert "COPY --from=build-gpu /opt/venv" in stages["gpu"]


def test_base_dependencies_hold_no_pytorch_or_cuda() -> None:
    """What the CPU image installs: pyproject's base dependencies, which must not pull PyTorch or CUDA."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0] for d in deps]
    assert forbidden(names) == []


def test_images_run_as_a_non_root_user_with_a_healthcheck() -> None:
    stages = _stages()
    for target in ("cpu", "gpu"):
        assert re.search(r"^USER 10001:10001$", stages[target], re.M), target
    assert "HEALTHCHECK" in stages["base"] and "/livez" in stages["base"]
    # the images serve a mounted model folder and never download one
    assert "HF_HUB_OFFLINE=1" in stages["base"] and "EMOTION_STREAM_MODEL__PATH=/model" in stages["base"]


def test_build_context_holds_every_copied_file() -> None:
    """deploy/Dockerfile.dockerignore keeps the context small; it must not drop a file a COPY needs."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore
    sources = []
    for line in re.sub(r"\\\n", " ", _dockerfile()).splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source in kept, f"{source} is copied but Dockerfile.dockerignore leaves it out"


def test_no_cuda_check_names_what_it_finds() -> None:
    assert forbidden(["onnxruntime", "numpy", "tokenizers"]) == []
    assert forbidden(["torch", "nvidia_cublas", "onnxruntime-gpu", "numpy", "NVIDIA-nccl-cu13"]) == [
        "nvidia-cublas",
        "nvidia-nccl-cu13",
        "onnxruntime-gpu",
        "torch",
    ]


# --- compose ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_schema(tools: Callable[[str], dict[str, Path]]) -> jsonschema.protocols.Validator:
    schema = json.loads(tools("compose-schema")["compose-schema"].read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def test_compose_file_follows_the_compose_specification(compose_schema: jsonschema.protocols.Validator) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_schema.iter_errors(_compose())]
    assert errors == []


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("worker", "restart_policy", "always"),  # a misspelt key
        ("worker", "restart", ["always"]),  # a wrong type
        ("prometheus", "ports", "9090:9090"),  # a list expected
    ],
)
def test_an_invalid_compose_file_fails(
    compose_schema: jsonschema.protocols.Validator, where: str, key: str, value: Any
) -> None:
    doc = _compose()
    doc["services"][where][key] = value
    assert list(compose_schema.iter_errors(doc))


def test_compose_worker_restarts_and_stops_gracefully() -> None:
    services = _compose()["services"]
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert worker["restart"] in {"always", "unless-stopped"} or worker["restart"].startswith("on-failure")
        assert _duration_s(worker["stop_grace_period"]) > WORKER_STOP_BOUND_S
        assert any(v.endswith(":/model:ro") for v in worker["volumes"])
    assert services["worker-gpu"]["build"]["target"] == "gpu" and services["worker"]["build"]["target"] == "cpu"
    targets = set(_stages())
    assert {s["build"]["target"] for s in services.values() if "build" in s} <= targets


def test_compose_runs_the_kafka_version_of_the_local_stack() -> None:
    image = _compose()["services"]["kafka"]["image"]
    assert image == f"apache/kafka:{local_kafka_version()}"


def test_compose_prometheus_loads_the_alert_rules() -> None:
    prometheus = _compose()["services"]["prometheus"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in prometheus["volumes"])
    config_in_container = Path(mounts["./prometheus/prometheus.yml"])
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    for rule_file in config["rule_files"]:
        target = config_in_container.parent / rule_file
        assert str(target) in mounts.values(), f"{rule_file} is not mounted beside prometheus.yml"
        assert (DEPLOY / "prometheus" / rule_file).is_file()


def test_every_setting_in_the_images_and_compose_exists() -> None:
    known = {env for env, _, _ in settings_reference()}
    used = set(re.findall(r"\bEMOTION_STREAM_[A-Z0-9_]+__[A-Z0-9_]+\b", _dockerfile()))
    for service in _compose()["services"].values():
        used |= {k for k in service.get("environment", {}) if k.startswith("EMOTION_STREAM_")}
    assert "EMOTION_STREAM_MODEL__PATH" in used
    assert used <= known, f"settings the worker does not read: {sorted(used - known)}"
