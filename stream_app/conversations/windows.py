"""Event-time windows and decay: the arithmetic under a conversation's state.

Two pictures of the recent past, both by event time (the messages' ``sent_at``), never by the clock of
the machine that processes them:

* :class:`PaneWindow`, a sliding window of ``window_s`` seconds made of ``window_s / pane_s`` panes. Each
  pane holds the label counts of the messages sent in it; the window is the ``n`` panes that end with the
  pane of the conversation's latest message. It slides by whole panes, so the distribution covers between
  ``window_s - pane_s`` and ``window_s`` seconds of history: the price of a bounded state (at most ``n``
  panes of ``n_labels`` counts, whatever the message rate). A late message lands in the pane of its own
  ``sent_at``, so messages that arrive in any order within the allowance leave the same counts.
* Exponential decay with a half-life: a score seen ``dt`` seconds before the reference time weighs
  ``2 ** (-dt / half_life_s)``. :func:`decay_factor` is the one formula both the in-order and the late
  path use, so half-lives are exact (up to float64 rounding) whichever order messages arrive in.
"""

from __future__ import annotations

import math

__all__ = ["PaneWindow", "decay_factor"]


def decay_factor(dt_s: float, half_life_s: float) -> float:
    """Weight of something ``dt_s`` seconds old under exponential decay with this half-life.

    ``decay_factor(h, h) == 0.5`` and ``decay_factor(0, h) == 1`` exactly; negative ``dt_s`` (a reference
    time before the event) gives a weight above 1, which the callers never ask for.
    """
    return math.exp2(-dt_s / half_life_s)


class PaneWindow:
    """A sliding event-time window of label counts, built from fixed panes.

    The panes live in the caller's state as ``{pane_index: [count per label]}`` (only non-empty panes);
    this class holds the geometry and the operations on such a mapping.

    Args:
        window_s: Length of the window in seconds of event time.
        pane_s: Width of one pane in seconds; ``window_s`` must be a whole multiple of it (1 to 255 panes).
    """

    __slots__ = ("n_panes", "pane_s", "window_s")

    def __init__(self, *, window_s: float, pane_s: float) -> None:
        if not (pane_s > 0 and math.isfinite(pane_s)):
            raise ValueError(f"pane_s must be a positive number of seconds, got {pane_s}")
        if not (window_s >= pane_s and math.isfinite(window_s)):
            raise ValueError(f"window_s must be at least pane_s ({pane_s}), got {window_s}")
        n = round(window_s / pane_s)
        if not math.isclose(n * pane_s, window_s, rel_tol=1e-9) or not 1 <= n <= 255:
            raise ValueError(f"window_s ({window_s}) must be 1 to 255 whole panes of pane_s ({pane_s})")
        self.window_s = float(window_s)
        self.pane_s = float(pane_s)
        self.n_panes = n

    def pane_of(self, t: float) -> int:
        """Index of the pane holding event time ``t`` (Unix seconds)."""
        return math.floor(t / self.pane_s)

    def first_pane(self, latest_t: float) -> int:
        """Index of the oldest pane inside the window that ends with the pane of ``latest_t``."""
        return self.pane_of(latest_t) - self.n_panes + 1

    def bounds(self, latest_t: float) -> tuple[float, float]:
        """Event-time span ``[start, end)`` of the window ending with the pane of ``latest_t``."""
        last = self.pane_of(latest_t)
        return (last - self.n_panes + 1) * self.pane_s, (last + 1) * self.pane_s

    def add(self, panes: dict[int, list[int]], t: float, label: int, latest_t: float, n_labels: int) -> bool:
        """Count one message with ``label`` sent at ``t``; ``latest_t`` is the conversation's latest event time.

        Returns False (and counts nothing) when the message's pane is already older than the window: its
        window has passed. The caller decides beforehand whether a message is too late to apply at all.
        """
        pane = self.pane_of(t)
        if pane < self.first_pane(latest_t):
            return False
        counts = panes.get(pane)
        if counts is None:
            counts = panes[pane] = [0] * n_labels
        counts[label] += 1
        return True

    def prune(self, panes: dict[int, list[int]], latest_t: float) -> None:
        """Drop the panes that slid out of the window ending with the pane of ``latest_t``."""
        first = self.first_pane(latest_t)
        for pane in [p for p in panes if p < first]:
            del panes[pane]

    @staticmethod
    def counts(panes: dict[int, list[int]], n_labels: int) -> list[int]:
        """Label counts over the window (the panes held are exactly the window's, once pruned)."""
        total = [0] * n_labels
        for counts in panes.values():
            for i, c in enumerate(counts):
                total[i] += c
        return total
