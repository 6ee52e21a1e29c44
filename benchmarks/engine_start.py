"""Engine start-up benchmark: from a fresh Python process to a loaded, checked and warmed engine.

Run (from the repository root)::

    .venv/bin/python benchmarks/engine_start.py [--rounds 5] [--threads 1] [--entry engine|service]

Each round starts two fresh interpreters, one after the other: ``cold`` (the engine-selection cache
emptied first: every candidate is loaded, checked against PyTorch and timed, as on a first start) and
``warm`` (the cache from the previous run: the worker's restart). ONNX files are built once before the
rounds, as ``scripts/setup.sh`` does, and are not part of either figure.

``ready_s`` is measured from just before the parent launches the child to the moment
``start_engine`` returns in the child (both on the same wall clock), so it includes the interpreter's own
start and every import. ``--entry service`` goes through ``stream_app.service.build_runtime`` (what
``emotion-stream worker`` calls) instead of ``start_engine`` alone. Prints medians with min-max and the
load average, and writes ``benchmarks/results/engine-start.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_ENGINE_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from stream_app.inference.parity import default_parity_texts
from stream_app.inference.startup import start_engine
started = start_engine({model!r}, num_threads={threads}, cache_dir=Path({cache!r}),
                       parity_texts=default_parity_texts()[:64])
ready = time.time()
print(json.dumps({{"ready_epoch": ready, "cached": started.cached, "engine": started.engine.info.name,
                  "phases": dict(started.phases), "process_age_s": started.process_age_s,
                  "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}}))
"""

_SERVICE_CHILD = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
os.environ["EMOTION_STREAM_DATA__CACHE_DIR"] = {cache!r}
os.environ["EMOTION_STREAM_MODEL__PATH"] = {model!r}
os.environ["EMOTION_STREAM_MODEL__NUM_THREADS"] = "{threads}"
from stream_app.service import build_runtime
from stream_app.settings import load_settings
runtime = build_runtime(load_settings())
ready = time.time()
started = runtime.engine_start
print(json.dumps({{"ready_epoch": ready, "cached": started.cached, "engine": runtime.engine.info.name,
                  "phases": dict(started.phases), "process_age_s": started.process_age_s,
                  "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}}))
"""


def launch(script: str) -> dict[str, Any]:
    """Run one child; ``ready_s`` from just before launch to the child's ready stamp."""
    launched = time.time()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed:\n{out.stderr[-4000:]}")
    row: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    row["ready_s"] = row.pop("ready_epoch") - launched
    row["exit_s"] = time.time() - launched
    row["load_avg_1m"] = os.getloadavg()[0]
    return row


def summary(rows: Sequence[dict[str, Any]], key: str) -> dict[str, float]:
    values = [r[key] for r in rows]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: Sequence[str] | None = None) -> int:
    from stream_app.inference.onnx_engine import onnx_model_file
    from stream_app.model.train import resolve_default_model
    from stream_app.settings import load_settings

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the built model)")
    parser.add_argument("--rounds", type=int, default=5, help="cold/warm pairs")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (the worker's on 2 cores)")
    parser.add_argument("--entry", choices=("engine", "service"), default="engine")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "engine-start.json")
    args = parser.parse_args(argv)

    settings = load_settings()
    model = args.model or resolve_default_model(settings.data.goemotions_dir, settings.data.cache_dir)
    if model is None:
        print("no model: run `emotion-stream model build` or pass --model")
        return 1
    cache = Path(tempfile.mkdtemp(prefix="engine-start-"))
    try:
        for precision in ("fp32", "int8"):  # built once, as scripts/setup.sh does; not timed
            onnx_model_file(model, precision, cache)
        template = _ENGINE_CHILD if args.entry == "engine" else _SERVICE_CHILD
        script = template.format(repo=str(REPO), model=str(model), cache=str(cache), threads=args.threads)
        selection = cache / "engine-selection"
        rows: list[dict[str, Any]] = []
        for round_no in range(args.rounds):
            for kind in ("cold", "warm"):
                if kind == "cold":
                    shutil.rmtree(selection, ignore_errors=True)
                row = launch(script) | {"kind": kind, "round": round_no + 1}
                if row["cached"] != (kind == "warm"):
                    raise RuntimeError(f"expected a {kind} start, got cached={row['cached']}")
                rows.append(row)
                phases = " ".join(f"{k} {v:.3f}" for k, v in row["phases"].items())
                print(
                    f"round {round_no + 1} {kind}: ready {row['ready_s']:.3f}s ({phases}) engine {row['engine']} "
                    f"torch imported: {row['torch']} load {row['load_avg_1m']:.2f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    result: dict[str, Any] = {
        "benchmark": "engine-start",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "entry": args.entry,
        "model": str(model),
        "threads": args.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "command": " ".join(["benchmarks/engine_start.py", *(argv if argv is not None else sys.argv[1:])]),
        "runs": rows,
    }
    for kind in ("cold", "warm"):
        mine = [r for r in rows if r["kind"] == kind]
        result[kind] = {
            "ready_s": summary(mine, "ready_s"),
            "phases_median_s": {p: statistics.median(r["phases"][p] for r in mine) for p in mine[0]["phases"]},
            "load_avg_1m": summary(mine, "load_avg_1m"),
            "engines": sorted({r["engine"] for r in mine}),
            "imported_torch": sorted({r["torch"] for r in mine}),
        }
        ready = result[kind]["ready_s"]
        print(
            f"{kind}: ready median {ready['median']:.3f}s (min {ready['min']:.3f}, max {ready['max']:.3f}) "
            f"over {len(mine)} runs; phases {result[kind]['phases_median_s']}; "
            f"load {result[kind]['load_avg_1m']['median']:.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
