"""L2 admission: second sighting within a window, bounded memory."""

from __future__ import annotations

import pytest

from stream_app.cache.admission import AlwaysAdmit, SecondSightingAdmission
from stream_app.cache.keys import ModelIdentity, cache_key

pytestmark = pytest.mark.unit

MODEL = ModelIdentity("m", "1", "torch", "float32")


def key(i: int) -> bytes:
    return cache_key(f"message number {i}", MODEL)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_first_sighting_rejected_second_admitted() -> None:
    adm = SecondSightingAdmission(1000)
    assert adm.admit(key(1)) is False
    assert adm.admit(key(1)) is True
    assert adm.admit(key(1)) is True
    assert adm.admit(key(2)) is False


def test_one_off_keys_are_mostly_rejected() -> None:
    adm = SecondSightingAdmission(1000)
    admitted = sum(adm.admit(key(i)) for i in range(1000))
    assert admitted <= 30, f"false positives far above design: {admitted} of 1000"


def test_sighting_survives_one_rotation_but_not_two() -> None:
    adm = SecondSightingAdmission(100)
    target = key(-1)
    assert not adm.admit(target)
    for i in range(100):  # fills the generation: the next admit rotates
        adm.admit(key(i))
    assert adm.admit(target), "seen in the previous generation: still within the window"
    adm2 = SecondSightingAdmission(100)
    adm2.admit(target)
    for i in range(300):  # two full rotations later
        adm2.admit(key(10_000 + i))
    assert adm2.rotations >= 2
    assert not adm2.admit(target), "a sighting two windows ago is forgotten"


def test_memory_is_bounded() -> None:
    adm = SecondSightingAdmission(1000)
    before = adm.memory_bytes
    assert before <= 2 * (2 * 10 * 1000) // 8, "two filters of about 10 bits per key, rounded up to 2^k"
    for i in range(20_000):
        adm.admit(key(i))
    assert adm.memory_bytes == before
    assert adm.rotations >= 19


def test_time_window_rotates_generations() -> None:
    clock = FakeClock()
    adm = SecondSightingAdmission(1000, window_s=60.0, clock=clock)
    adm.admit(key(1))
    clock.now = 61.0
    assert adm.admit(key(1)), "still inside the previous generation"
    adm.admit(key(2))
    clock.now = 250.0
    adm.admit(key(99))  # rotation at 250
    clock.now = 320.0
    assert not adm.admit(key(2)), "two windows later the first sighting is gone"


def test_always_admit() -> None:
    assert AlwaysAdmit().admit(key(1))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="capacity"):
        SecondSightingAdmission(0)
    with pytest.raises(ValueError, match="window_s"):
        SecondSightingAdmission(10, window_s=0.0)
