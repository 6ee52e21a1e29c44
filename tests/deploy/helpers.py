"""Paths and small helpers shared by the deploy checks."""

from __future__ import annotations

import importlib
import socket
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
INSTALLER = REPO / "scripts" / "deploy" / "install_tools.sh"


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def local_kafka_version() -> str:
    """The Apache Kafka version of the local test broker (its module moves to devtools/ in the new layout)."""
    for module in ("stream_app.devtools.kafka_local", "stream_app.kafka_local"):
        try:
            return str(importlib.import_module(module).KAFKA_VERSION)
        except ModuleNotFoundError:
            continue
    raise LookupError("no kafka_local module defines KAFKA_VERSION")
