"""scripts/deploy/k8s_schemas.py: CRD and Kubernetes API schemas converted for kubeconform (no tool needed)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from scripts.deploy.k8s_schemas import convert_crd, main, openapi_to_json_schema, standalone_kinds

pytestmark = pytest.mark.unit

CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "names": {"kind": "Widget", "plural": "widgets"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "x-kubernetes-validations": [{"rule": "self.size > 0"}],
                                "properties": {
                                    "size": {"type": "integer", "format": "int32"},
                                    "port": {"x-kubernetes-int-or-string": True},
                                    "note": {"type": "string", "nullable": True},
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                    "raw": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                        "properties": {"known": {"type": "string"}},
                                    },
                                    "items": {
                                        "type": "array",
                                        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
                                    },
                                },
                            },
                        },
                    }
                },
            },
            {"name": "v0", "served": False, "storage": False},
        ],
    },
}


@pytest.fixture(scope="module")
def widget_schema() -> dict[str, Any]:
    (item,) = list(convert_crd(CRD))
    path, schema = item
    assert path == "example.com/widget_v1.json"
    return schema


def _valid(schema: dict[str, Any], doc: dict[str, Any]) -> bool:
    return bool(jsonschema.Draft202012Validator(schema).is_valid(doc))


def _widget(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1, **spec}}


def test_a_valid_resource_passes(widget_schema: dict[str, Any]) -> None:
    doc = _widget(port="http", note=None, labels={"a": "b"}, raw={"anything": [1]}, items=[{"name": "x"}])
    assert _valid(widget_schema, doc)
    assert _valid(widget_schema, _widget(port=8080))


@pytest.mark.parametrize(
    "doc",
    [
        _widget(sizee=1),  # unknown field: strict
        _widget(items=[{"name": "x", "extra": 1}]),  # unknown field in an array item
        _widget(port=1.5),  # neither integer nor string
        _widget(note=3),
        _widget(labels={"a": 1}),
        {"apiVersion": "example.com/v2", "kind": "Widget", "metadata": {}, "spec": {"size": 1}},
        {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {}, "spec": {"size": 1}},
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}, "spec": {}},  # required size
    ],
)
def test_an_invalid_resource_fails(widget_schema: dict[str, Any], doc: dict[str, Any]) -> None:
    assert not _valid(widget_schema, doc)


def test_kubernetes_extensions_are_dropped(widget_schema: dict[str, Any]) -> None:
    text = json.dumps(widget_schema)
    assert "x-kubernetes" not in text and "nullable" not in text


def test_non_strict_allows_unknown_fields() -> None:
    schema = openapi_to_json_schema({"type": "object", "properties": {"a": {"type": "string"}}}, strict=False)
    assert jsonschema.Draft202012Validator(schema).is_valid({"a": "x", "b": 1})


def test_not_a_crd_is_refused() -> None:
    with pytest.raises(ValueError, match="not a CustomResourceDefinition"):
        list(convert_crd({"kind": "Deployment"}))


def _local_files() -> dict[str, dict[str, Any]]:
    defs = {
        "$defs": {
            "io.example.Spec": {
                "type": "object",
                "properties": {"meta": {"$ref": "#/$defs/io.example.Meta"}},
                "additionalProperties": False,
            },
            "io.example.Meta": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "additionalProperties": False,
            },
            "io.example.Unused": {"type": "string"},
        }
    }
    thing = {
        "$id": "https://kubernetes.io/api/thing/v1",
        "type": "object",
        "x-kubernetes-group-version-kind": [{"group": "", "kind": "Thing", "version": "v1"}],
        "properties": {"kind": {"enum": ["Thing"]}, "spec": {"$ref": "/api/_definitions.json#/$defs/io.example.Spec"}},
        "additionalProperties": False,
    }
    nested = {"type": "object"}  # no group-version-kind: not a kind of its own
    return {"_definitions.json": defs, "thing-v1.json": thing, "meta-v1.json": nested}


def test_standalone_kinds_carry_only_what_they_reach() -> None:
    (item,) = list(standalone_kinds(_local_files()))
    name, schema = item
    assert name == "thing-v1.json"
    assert set(schema["$defs"]) == {"io.example.Spec", "io.example.Meta"}
    assert "$id" not in schema and "/api/_definitions.json" not in json.dumps(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"kind": "Thing", "spec": {"meta": {"name": "x"}}})
    assert not validator.is_valid({"kind": "Thing", "spec": {"meta": {"nam": "x"}}})


def test_a_dangling_reference_is_an_error() -> None:
    files = _local_files()
    del files["_definitions.json"]["$defs"]["io.example.Meta"]
    with pytest.raises(KeyError, match=r"io\.example\.Meta"):
        list(standalone_kinds(files))


def test_command_line_writes_kubeconforms_layout(tmp_path: Path) -> None:
    wheel = tmp_path / "kubernetes_validate-0-py3-none-any.whl"
    prefix = "kubernetes_validate/kubernetes-json-schema/v1.34.0-local-strict/"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, content in _local_files().items():
            z.writestr(prefix + name, json.dumps(content))
    crd = tmp_path / "crd.yaml"
    crd.write_text(json.dumps(CRD))  # JSON is YAML
    out = tmp_path / "out"
    main(["standalone", "--wheel", str(wheel), "--kubernetes-version", "v1.34.0", "--out", str(out)])
    main(["crd", "--out", str(out / "crds"), str(crd)])
    assert (out / "v1.34.0-standalone-strict" / "thing-v1.json").is_file()
    assert not (out / "v1.34.0-standalone-strict" / "meta-v1.json").exists()
    assert json.loads((out / "crds" / "example.com" / "widget_v1.json").read_text())["properties"]["kind"]["enum"] == [
        "Widget"
    ]
