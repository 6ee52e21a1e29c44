"""How the worker resolves its automatic concurrency and thread settings."""

from __future__ import annotations

import pytest

from stream_app.service import concurrent_batches, inference_threads
from stream_app.settings import Settings

pytestmark = pytest.mark.unit


def test_concurrent_batches_auto_is_two_on_a_cpu_and_one_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert concurrent_batches(settings, "cpu") == 2
    assert concurrent_batches(settings, "cuda:0") == 1
    monkeypatch.setenv("EMOTION_STREAM_BATCHING__CONCURRENT_BATCHES", "3")
    assert concurrent_batches(Settings(), "cuda:0") == 3


@pytest.mark.parametrize(("cores", "concurrency", "expected"), [(2, 2, 1), (2, 1, 1), (16, 2, 7), (9, 4, 2), (1, 2, 1)])
def test_inference_threads_share_the_cores_but_one(
    monkeypatch: pytest.MonkeyPatch, cores: int, concurrency: int, expected: int
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)))
    assert inference_threads(Settings(), concurrency) == expected
    monkeypatch.setenv("EMOTION_STREAM_MODEL__NUM_THREADS", "5")
    assert inference_threads(Settings(), concurrency) == 5
