"""The bottleneck report on recorded runs with a known bottleneck, and the resource sampler."""

from __future__ import annotations

import builtins
import json
import sys
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from stream_app.metrics import Metrics
from stream_app.perf.profile import (
    BUSY_SATURATED,
    build_profile,
    render_json,
    render_markdown,
    render_png,
    write_profile,
)
from stream_app.sampler import ResourceSampler

pytestmark = pytest.mark.unit


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _batch(
    t: float,
    *,
    infer: float,
    queue_wait: float,
    size: int = 32,
    real: int = 600,
    padded: int = 700,
    produce: float = 2.0,
    reason: str = "size",
) -> dict[str, Any]:
    return {
        "schema": "stage_metrics.v1",
        "batch_id": int(t),
        "worker_id": "w",
        "engine": "torch-fp32",
        "device": "cpu",
        "size": size,
        "real_tokens": real,
        "padded_tokens": padded,
        "token_budget": 4096,
        "closed_reason": reason,
        "stage_ms": {"queue_wait": queue_wait, "tokenize": 1.0, "infer": infer, "postprocess": 0.3,
                     "produce": produce},
        "cache": {"l1_hits": 0, "l2_hits": 0, "batch_hits": 0, "misses": size},
        "emitted_at": _iso(t),
    }  # fmt: skip


def _event(*, queue_wait: float, infer: float, e2e: float, level: str = "none") -> dict[str, Any]:
    timings = {"decode": 0.05, "cache": 0.02, "queue_wait": queue_wait, "tokenize": 1.0, "infer": infer,
               "postprocess": 0.3}  # fmt: skip
    timings["total"] = sum(timings.values()) + 0.5
    return {"level": level, "timings_ms": timings, "e2e_ms": e2e}


def _infer_bound() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    # 100 batches of 90 ms back to back over 10 s: the device is busy 90 % of the time
    t0 = 1_700_000_000.0
    stages = [_batch(t0 + 0.1 * i, infer=90.0, queue_wait=60.0) for i in range(100)]
    events = [_event(queue_wait=60.0, infer=90.0, e2e=170.0) for _ in range(3200)]
    report = {"duration_s": 10.0, "latency_ms": {"mean": 170.0}, "lag_samples": [], "final_lag": 0}
    return stages, events, report


def _queue_bound(reason: str = "age") -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    # 50 small batches of 5 ms over 20 s (busy ~1 %), messages wait 40 ms for their batch to close
    t0 = 1_700_000_000.0
    stages = [_batch(t0 + 0.4 * i, infer=5.0, queue_wait=40.0, size=2, real=30, padded=32, reason=reason)
              for i in range(50)]  # fmt: skip
    events = [_event(queue_wait=40.0, infer=5.0, e2e=55.0) for _ in range(100)]
    report = {"duration_s": 20.0, "latency_ms": {"mean": 55.0}, "lag_samples": [], "final_lag": 0}
    return stages, events, report


def test_infer_dominates() -> None:
    stages, events, report = _infer_bound()
    prof = build_profile(stages, events, [], report, max_batch_size=64)
    assert prof.device_busy == pytest.approx(0.9, abs=0.01)
    assert prof.device_busy >= BUSY_SATURATED
    assert prof.bottleneck == "infer"
    assert any("onnx-int8" in r and "90%" in r for r in prof.recommendations)
    # queue wait is large here too, but it is the engine's symptom: no max_wait_ms advice
    assert not any("max_wait_ms" in r for r in prof.recommendations)
    assert prof.latency_share["infer"] == pytest.approx(90.0 / 170.0, abs=0.01)


def test_a_saturated_int8_engine_with_small_batches_is_told_to_batch_more() -> None:
    # 40 batches back to back over 2 s: small ones cost 5 ms per message, large ones 2 ms
    t0 = 1_700_000_000.0
    stages = []
    for i in range(40):
        size, infer = (4, 20.0) if i % 2 else ((40, 80.0) if i % 4 == 0 else (10, 45.0))
        stages.append(_batch(t0 + 0.05 * i, infer=infer, queue_wait=5.0, size=size) | {"engine": "onnx-int8"})
    events = [_event(queue_wait=5.0, infer=40.0, e2e=60.0) for _ in range(400)]
    prof = build_profile(stages, events, [], {"duration_s": 2.0, "latency_ms": {"mean": 60.0}})
    assert prof.bottleneck == "infer"
    assert prof.engine == "onnx-int8"
    assert not any("use onnx-int8" in r for r in prof.recommendations)
    assert any("a GPU" in r for r in prof.recommendations)
    eff = prof.batch_efficiency
    assert eff["small_infer_ms_per_message"] == pytest.approx(5.0)
    assert eff["large_infer_ms_per_message"] == pytest.approx(2.0)
    assert any("raise target_batch_p99_ms" in r and "60% less" in r for r in prof.recommendations)


def test_queue_wait_dominates_with_an_idle_device() -> None:
    stages, events, report = _queue_bound("age")
    prof = build_profile(stages, events, [], report, max_batch_size=64)
    assert prof.device_busy < 0.05
    assert prof.bottleneck == "queue_wait"
    assert prof.latency_share["queue_wait"] == pytest.approx(40.0 / 55.0, abs=0.01)
    advice = [r for r in prof.recommendations if "queue wait" in r]
    assert advice and "lower max_wait_ms" in advice[0]
    assert "73% of latency" in advice[0]
    assert not any("onnx-int8" in r for r in prof.recommendations)


def test_queue_wait_with_batches_closed_on_the_cap_suggests_a_bigger_budget() -> None:
    stages, events, report = _queue_bound("tokens")
    prof = build_profile(stages, events, [], report)
    assert prof.bottleneck == "queue_wait"
    assert any("raise max_batch_tokens" in r for r in prof.recommendations)
    assert not any("lower max_wait_ms" in r for r in prof.recommendations)


def test_padding_waste_and_produce_rules() -> None:
    t0 = 1_700_000_000.0
    stages = [_batch(t0 + i, infer=5.0, queue_wait=1.0, real=300, padded=1000, produce=30.0) for i in range(20)]
    events = [_event(queue_wait=1.0, infer=5.0, e2e=45.0) for _ in range(200)]
    prof = build_profile(stages, events, [], {"duration_s": 20.0, "latency_ms": {"mean": 45.0}})
    assert prof.batch_fill["padding_waste"] == pytest.approx(0.7)
    assert any("padding waste 70%" in r and "group_by_length" in r for r in prof.recommendations)
    assert prof.bottleneck == "produce"
    assert any("producer_linger_ms" in r for r in prof.recommendations)


def test_without_a_replay_the_wall_time_comes_from_the_stage_records() -> None:
    stages, events, _ = _infer_bound()
    for e in events:
        e.pop("e2e_ms")
    prof = build_profile(stages, events)
    # 100 records 0.1 s apart span 9.9 s, plus the last batch's inference
    assert prof.wall_s == pytest.approx(9.99, abs=0.01)
    assert prof.bottleneck == "infer"
    assert prof.latency_share["topic_wait"] == 0.0
    assert prof.notes


def test_cache_hits_lower_the_produce_share_and_levels_are_counted() -> None:
    stages, events, report = _queue_bound()
    hits = [_event(queue_wait=0.0, infer=0.0, e2e=3.0, level="l1") for _ in range(100)]
    prof = build_profile(stages, events + hits, [], report)
    assert prof.cache_levels == {"none": 100, "l1": 100}
    assert prof.mean_stage_ms["produce"] == pytest.approx(1.0)  # 2 ms per batch x half the events inferred


def test_time_before_the_worker_reads_is_topic_wait() -> None:
    # a consumer that is behind: messages reach it 1 s after the produce call, with a lag of 150
    events = [_event(queue_wait=5.0, infer=1.0, e2e=1100.0) | {"to_worker_ms": 1000.0} for _ in range(500)]
    report = {"duration_s": 5.0, "throughput_events_per_s": 100.0, "latency_ms": {"mean": 1100.0},
              "max_lag": 150, "final_lag": 0}  # fmt: skip
    prof = build_profile([], events, [], report)
    assert prof.mean_stage_ms["topic_wait"] == pytest.approx(1000.0)
    assert prof.mean_stage_ms["produce"] == pytest.approx(1100.0 - 1000.0 - events[0]["timings_ms"]["total"])
    assert sum(prof.latency_share.values()) == pytest.approx(1.0)
    assert prof.bottleneck == "topic_wait"
    assert any("consumer lag up to 150 (1.5 s of throughput)" in r for r in prof.recommendations)
    assert "No stage metrics" in render_markdown(prof)
    # the same wait while the consumer keeps up points at the Kafka hops instead
    calm = build_profile([], events, [], {**report, "max_lag": 20})
    assert any("the Kafka hops dominate" in r for r in calm.recommendations)


def test_without_batches_busy_comes_from_per_message_inference() -> None:
    # the naive baseline: 90 messages inferred one by one at 10 ms each in 1 s, 10 answered otherwise
    events = [_event(queue_wait=0.0, infer=10.0, e2e=15.0) for _ in range(90)]
    events += [_event(queue_wait=0.0, infer=0.0, e2e=2.0, level="l1") for _ in range(10)]
    prof = build_profile([], events, [], {"duration_s": 1.0, "latency_ms": {"mean": 14.0}})
    assert prof.device_busy == pytest.approx(0.9)
    assert prof.bottleneck == "infer"


def test_time_outside_the_stages_is_named() -> None:
    stages, events, report = _queue_bound()
    for e in events:
        e["timings_ms"]["total"] += 100.0  # waiting for the tokenizer or the ordered emitter
        e["e2e_ms"] += 100.0
    prof = build_profile(stages, events, [], {**report, "latency_ms": {"mean": 155.0}})
    assert prof.mean_stage_ms["worker_other"] == pytest.approx(100.5)
    assert prof.bottleneck == "worker_other"
    assert any("outside every measured stage" in r for r in prof.recommendations)


def test_nothing_recorded() -> None:
    prof = build_profile([], [])
    assert prof.bottleneck == "none"


def test_renderers(tmp_path: Path) -> None:
    stages, events, report = _infer_bound()
    samples = [{"t": float(i), "cpu_percent": 190.0, "rss_bytes": 500e6 + i, "cpu_count": 2} for i in range(5)]
    prof = build_profile(stages, events, samples, report)
    assert any("CPU" in r for r in prof.recommendations)
    md = render_markdown(prof, "run x")
    assert md.startswith("# run x")
    assert "**Bottleneck: infer**" in md
    assert json.loads(render_json(prof))["bottleneck"] == "infer"
    png = render_png(prof, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    paths = write_profile(prof, tmp_path / "profile-x")
    assert sorted(p.suffix for p in paths) == [".json", ".md", ".png"]


# --------------------------------------------------------------------------------------------- sampler
def test_sampler_without_pynvml_notes_it_and_still_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_pynvml(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    metrics = Metrics()
    sampler = ResourceSampler(metrics, 0.5, capacity=3)
    assert "pynvml is not installed" in sampler.gpu_note
    assert "\n" not in sampler.gpu_note
    for _ in range(5):
        sample = sampler.sample_once()
    assert sample.rss_bytes > 0 and sample.gpu_utilization_percent is None
    assert len(sampler.samples()) == 3  # the ring is bounded
    assert metrics.registry.get_sample_value("emotion_process_rss_bytes") == sample.rss_bytes
    sampler.start()
    sampler.stop()
    assert sampler._thread is None


def _fake_pynvml(*, fail_init: bool = False, devices: int = 1) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init() -> None:
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: devices  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: b"Fake GPU"  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=37)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=123456)  # type: ignore[attr-defined]
    return mod


def test_sampler_with_nvml_failing_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    sampler = ResourceSampler(Metrics(), 1.0)
    assert sampler.gpu_note.startswith("GPU sampling off: NVML unavailable")
    assert sampler.sample_once().gpu_memory_used_bytes is None


def test_sampler_without_a_gpu_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(devices=0))
    sampler = ResourceSampler(Metrics(), 1.0)
    assert "no NVIDIA GPU" in sampler.gpu_note


def test_sampler_reads_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    metrics = Metrics()
    sampler = ResourceSampler(metrics, 1.0)
    assert sampler.gpu_note == "GPU sampling on: Fake GPU (index 0)"
    sample = sampler.sample_once()
    assert sample.gpu_utilization_percent == 37.0
    assert metrics.registry.get_sample_value("emotion_gpu_memory_used_bytes") == 123456
    sampler.stop()


def test_sampler_refuses_a_zero_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        ResourceSampler(Metrics(), 0)
