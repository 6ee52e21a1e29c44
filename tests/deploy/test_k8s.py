"""The Kubernetes manifests: kubeconform (strict, KEDA's CRD included) and the facts that tie them together."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_app.settings import settings_reference
from tests.deploy.helpers import DEPLOY, load_yaml_docs

pytestmark = pytest.mark.deploy

K8S = DEPLOY / "k8s"
WORKER_STOP_BOUND_S = 15  # the worker's bounded stop (finish the batch in flight, commit, leave the group)


@pytest.fixture(scope="module")
def kubeconform(tools: Callable[[str], dict[str, Path]]) -> Callable[[Path], subprocess.CompletedProcess[str]]:
    binary = tools("kubeconform")["kubeconform"]
    schemas = tools("k8s-schemas")["k8s-schemas"]
    (standalone,) = schemas.glob("v*-standalone-strict")
    version = standalone.name.removeprefix("v").removesuffix("-standalone-strict")

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        # No -ignore-missing-schemas: a kind without a schema is an error, never a silent pass.
        return subprocess.run(
            [
                str(binary),
                "-strict",
                "-summary",
                "-output=json",
                "-verbose",
                f"-kubernetes-version={version}",
                "-schema-location",
                f"{schemas}/{{{{.NormalizedKubernetesVersion}}}}-standalone{{{{.StrictSuffix}}}}/"
                "{{.ResourceKind}}{{.KindSuffix}}.json",
                "-schema-location",
                f"{schemas}/crds/{{{{.Group}}}}/{{{{.ResourceKind}}}}_{{{{.ResourceAPIVersion}}}}.json",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run


def _by_kind() -> dict[str, list[dict[str, Any]]]:
    docs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            docs.setdefault(doc["kind"], []).append(doc)
    return docs


def _one(kind: str) -> dict[str, Any]:
    (doc,) = _by_kind()[kind]
    return doc


def _worker_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def _env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in _worker_container()["env"] if "value" in e}


def test_every_manifest_is_valid(kubeconform: Callable[[Path], subprocess.CompletedProcess[str]]) -> None:
    proc = kubeconform(K8S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    statuses = {(r["kind"], r["status"]) for r in report["resources"]}
    kinds = set(_by_kind())
    # every kind was checked against a schema (none skipped), the KEDA ScaledObject included
    assert {kind for kind, _ in statuses} == kinds
    assert {status for _, status in statuses} == {"statusValid"}
    assert "ScaledObject" in kinds
    assert report["summary"]["invalid"] == 0 and report["summary"]["errors"] == 0


def _broken(kind: str, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = copy.deepcopy(_one(kind))
    mutate(doc)
    return doc


def _rename_key(node: dict[str, Any], old: str, new: str) -> None:
    node[new] = node.pop(old)


BROKEN = {
    "deployment field typo": (
        _broken(
            "Deployment",
            lambda d: _rename_key(d["spec"]["template"]["spec"], "terminationGracePeriodSeconds", "terminationGrace"),
        ),
        "terminationGrace",
    ),
    "probe port of the wrong type": (
        _broken(
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(port=9.5),
        ),
        "readinessProbe",
    ),
    "scaledobject field typo": (
        _broken("ScaledObject", lambda d: _rename_key(d["spec"], "maxReplicaCount", "maxReplicas")),
        "maxReplicas",
    ),
    "scaledobject count as text": (
        _broken("ScaledObject", lambda d: d["spec"].update(maxReplicaCount="eight")),
        "maxReplicaCount",
    ),
    "scaledobject without triggers": (_broken("ScaledObject", lambda d: d["spec"].pop("triggers")), "triggers"),
    "kind without a schema": (
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"}, "spec": {}},
        "ServiceMonitor",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_invalid_manifest_fails(
    case: str, tmp_path: Path, kubeconform: Callable[[Path], subprocess.CompletedProcess[str]]
) -> None:
    doc, expected = BROKEN[case]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    proc = kubeconform(path)
    assert proc.returncode != 0, f"kubeconform accepted a broken manifest ({case}):\n{proc.stdout}"
    assert expected in proc.stdout


def test_scaledobject_matches_the_deployment() -> None:
    deployment, scaled = _one("Deployment"), _one("ScaledObject")
    env = _env()
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; a fixed one resets it on apply"
    # one consumer per partition: a replica beyond the partition count idles
    assert spec["maxReplicaCount"] == int(env["EMOTION_STREAM_TOPICS__PARTITIONS"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (kafka,) = [t for t in spec["triggers"] if t["type"] == "kafka"]
    assert kafka["metadata"]["consumerGroup"] == env["EMOTION_STREAM_WORKER__APP_ID"]
    assert kafka["metadata"]["topic"] == env["EMOTION_STREAM_TOPICS__INPUT"]
    assert kafka["metadata"]["bootstrapServers"] == env["EMOTION_STREAM_KAFKA__BOOTSTRAP_SERVERS"]
    assert kafka["metadata"]["allowIdleConsumers"] == "false"
    assert int(kafka["metadata"]["lagThreshold"]) > 0
    (rate,) = [t for t in spec["triggers"] if t["type"] == "prometheus"]
    assert "emotion_messages_total" in rate["metadata"]["query"]


def _keda_metadata_names(source: Path, scaler: str) -> set[str]:
    text = (source / "pkg" / "scalers" / f"{scaler}_scaler.go").read_text(encoding="utf-8")
    return set(re.findall(r'keda:"name=\s*([A-Za-z]+)', text))


def test_trigger_metadata_names_exist_in_keda(tools: Callable[[str], dict[str, Path]]) -> None:
    """The CRD types trigger metadata as a string map, so a misspelt key passes kubeconform: read KEDA's scalers."""
    source = tools("k8s-schemas")["keda-source"]
    for trigger in _one("ScaledObject")["spec"]["triggers"]:
        known = _keda_metadata_names(source, trigger["type"])
        assert len(known) > 5, f"no metadata names found in KEDA's {trigger['type']} scaler"
        unknown = set(trigger["metadata"]) - known
        assert not unknown, f"{trigger['type']} trigger: {sorted(unknown)} are not metadata KEDA reads"
    assert "lagTreshold" not in _keda_metadata_names(source, "kafka")  # the check can tell a typo apart


def test_probes_use_the_health_endpoints() -> None:
    container = _worker_container()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names["metrics"] == int(_env()["EMOTION_STREAM_METRICS__PORT"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names


def test_graceful_stop_outlasts_the_workers_bounded_stop() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > WORKER_STOP_BOUND_S


def test_volumes_are_defined_and_state_is_scratch() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {doc["metadata"]["name"] for doc in _by_kind()["PersistentVolumeClaim"]}
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    mounts = {m["mountPath"]: m["name"] for m in _worker_container()["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[_env()["EMOTION_STREAM_WORKER__STATE_DIR"]]]
    assert (
        volumes[mounts[_env()["EMOTION_STREAM_MODEL__PATH"]]]["persistentVolumeClaim"]["claimName"] == "emotion-model"
    )


def test_headless_service_selects_the_worker_pods() -> None:
    service, deployment = _one("Service"), _one("Deployment")
    assert service["spec"]["clusterIP"] == "None"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in _worker_container()["ports"]}


def test_every_setting_in_the_manifests_exists() -> None:
    known = {env for env, _, _ in settings_reference()}
    used = {e["name"] for e in _worker_container()["env"] if e["name"].startswith("EMOTION_STREAM_")}
    assert used, "no settings found: the check would pass vacuously"
    assert used <= known, f"settings the worker does not read: {sorted(used - known)}"
