"""Pane windows and decay: the event-time arithmetic under the conversation state."""

from __future__ import annotations

import math

import pytest

from stream_app.conversations.windows import PaneWindow, decay_factor

pytestmark = pytest.mark.unit


def test_half_life_is_exact() -> None:
    assert decay_factor(0.0, 120.0) == 1.0
    assert decay_factor(120.0, 120.0) == 0.5
    assert decay_factor(240.0, 120.0) == 0.25
    assert decay_factor(60.0, 120.0) == pytest.approx(math.sqrt(0.5), rel=1e-15)


def test_decay_composes() -> None:
    # Decaying in two steps equals decaying once: what lets in-order and late messages agree.
    assert decay_factor(30.0, 90.0) * decay_factor(50.0, 90.0) == pytest.approx(decay_factor(80.0, 90.0), rel=1e-15)


@pytest.mark.parametrize(
    ("window_s", "pane_s"), [(300.0, 0.0), (300.0, -1.0), (10.0, 30.0), (100.0, 30.0), (300.0, 1.0)]
)
def test_geometry_is_validated(window_s: float, pane_s: float) -> None:
    with pytest.raises(ValueError):
        PaneWindow(window_s=window_s, pane_s=pane_s)


def test_window_is_the_n_panes_ending_with_the_latest_pane() -> None:
    w = PaneWindow(window_s=300.0, pane_s=30.0)
    assert w.n_panes == 10
    assert w.pane_of(59.999) == 1 and w.pane_of(60.0) == 2
    assert w.bounds(1000.0) == (720.0, 1020.0)  # pane 33 is the latest: panes 24..33
    assert w.first_pane(1000.0) == 24


def test_add_counts_in_the_messages_own_pane_and_refuses_panes_before_the_window() -> None:
    w = PaneWindow(window_s=60.0, pane_s=20.0)
    panes: dict[int, list[int]] = {}
    assert w.add(panes, 100.0, 1, latest_t=100.0, n_labels=3)  # pane 5
    assert w.add(panes, 61.0, 2, latest_t=100.0, n_labels=3)  # pane 3 (window 3..5)
    assert w.add(panes, 101.0, 1, latest_t=101.0, n_labels=3)
    assert not w.add(panes, 59.0, 0, latest_t=101.0, n_labels=3), "pane 2 slid out already"
    assert panes == {5: [0, 2, 0], 3: [0, 0, 1]}
    assert w.counts(panes, 3) == [0, 2, 1]


def test_prune_drops_what_slid_out() -> None:
    w = PaneWindow(window_s=60.0, pane_s=20.0)
    panes = {3: [1, 0], 4: [0, 1], 5: [2, 0]}
    w.prune(panes, latest_t=119.0)  # latest pane 5: window 3..5
    assert set(panes) == {3, 4, 5}
    w.prune(panes, latest_t=120.0)  # latest pane 6: window 4..6
    assert set(panes) == {4, 5}
    assert w.counts(panes, 2) == [2, 1]
