"""Reading a worker's HTTP port from a test: probes (``/livez``, ``/readyz``) and ``/metrics`` samples."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Answer:
    """One answer of a probe: when (monotonic), its HTTP status (None: no answer) and its JSON body."""

    at: float
    status: int | None
    body: dict[str, Any]

    @property
    def reasons(self) -> list[str]:
        return [str(r) for r in self.body.get("reasons", [])]


def probe(port: int, path: str, timeout_s: float = 2.0) -> Answer:
    """``GET http://127.0.0.1:<port><path>``; a refused or timed-out request is ``status=None``."""
    at = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
            return Answer(at, resp.status, json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(at, exc.code, json.loads(exc.read()))
    except OSError as exc:
        return Answer(at, None, {"error": repr(exc)})


def samples(port: int, timeout_s: float = 2.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` as ``{(name, sorted labels): value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by_partition(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[int, float]:
    """``{partition: value}`` of a per-partition gauge among :func:`samples`."""
    return {int(dict(labels)["partition"]): v for (n, labels), v in values.items() if n == name}
