"""The pipeline assembly is transport-free: the GPU benchmark runs it where neither Faust nor a Kafka client
is installed, and the worker's composition is the only place that adds them."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

TRANSPORTS = ("faust", "mode", "aiokafka", "confluent_kafka", "kafka")


def test_assembling_a_pipeline_imports_no_kafka_client_nor_faust() -> None:
    code = (
        "import sys, stream_app.assembly, stream_app.core.pipeline, stream_app.service\n"
        f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({TRANSPORTS!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "", f"transport modules imported: {out.stdout.strip()}"
