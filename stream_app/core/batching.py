"""The batcher: a bounded queue that closes batches on count, padded tokens or age.

Two pieces, neither of which knows about Kafka or the model:

* :class:`Batcher` is the synchronous core. Items arrive with their token count; :meth:`Batcher.take`
  forms one :class:`Batch` that always holds the oldest pending item (no starvation), filled either with
  the items whose token length is closest to the oldest's (``group_by_length``, less padding) or in
  arrival order. A batch never exceeds ``max_batch_size`` items nor ``max_batch_tokens`` padded tokens
  (longest sequence x batch size, as in text-embeddings-inference), except that an item longer than the
  budget on its own forms a batch alone. Time comes from an injected clock, so flush-on-age is tested
  without sleeping; a batch's age is that of its oldest item (aiokafka's linger).
* :class:`AdaptiveBudget` moves the padded-token budget so that batch time stays under a target, halves
  it on out-of-memory, and respects an external cap (free device memory).

The classifier (``stream_app.core.classifier``) puts the batcher on the event loop and decides when a
batch starts. Everything here runs on the event loop thread only; none of it is thread-safe.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left, insort
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from stream_app.errors import BatcherClosed, ConfigError, QueueFull

__all__ = [
    "AdaptiveBudget",
    "Batch",
    "Batcher",
    "BatcherClosed",
    "CloseReason",
    "QueueFull",
]

T = TypeVar("T")

CloseReason = Literal["size", "tokens", "age", "drain"]
"""Why a batch closed: count cap, padded-token budget, oldest item's age, or forced (drain on close)."""


@dataclass(frozen=True)
class Batch(Generic[T]):
    """One closed batch. Items are in arrival order; the tuples run parallel to ``items``.

    Attributes:
        items: The batched items, oldest first.
        token_counts: Token count of each item.
        arrivals: Clock reading at which each item was added (for queue-wait metrics).
        real_tokens: Sum of ``token_counts``.
        padded_tokens: Longest item x number of items: what the model actually computes.
        oldest_arrival: Arrival of the oldest item; the batch's age is measured from it.
        closed_at: Clock reading at which the batch was taken.
        reason: Which limit closed the batch.
    """

    items: tuple[T, ...]
    token_counts: tuple[int, ...]
    arrivals: tuple[float, ...]
    real_tokens: int
    padded_tokens: int
    oldest_arrival: float
    closed_at: float
    reason: CloseReason

    def __len__(self) -> int:
        return len(self.items)

    @property
    def max_tokens(self) -> int:
        """Token length every item is padded to."""
        return max(self.token_counts)

    @property
    def padding_efficiency(self) -> float:
        """Real / padded tokens, in (0, 1]; 1 means no padding at all."""
        return self.real_tokens / self.padded_tokens

    def queue_waits(self) -> tuple[float, ...]:
        """Seconds each item waited in the queue before its batch closed."""
        return tuple(self.closed_at - a for a in self.arrivals)


class _Entry(Generic[T]):
    __slots__ = ("arrival", "item", "seq", "tokens")

    def __init__(self, seq: int, item: T, tokens: int, arrival: float) -> None:
        self.seq = seq
        self.item = item
        self.tokens = tokens
        self.arrival = arrival


class Batcher(Generic[T]):
    """Bounded queue that forms batches under count, padded-token and age limits.

    Args:
        max_batch_size: Most items in one batch.
        max_batch_tokens: Padded-token budget of one batch (changed later by :meth:`set_token_budget`).
        max_wait_s: A batch is ready at the latest this long after its oldest item arrived.
        capacity: Most pending items; :meth:`add` raises :class:`QueueFull` beyond it.
        group_by_length: Fill batches with the items closest in length to the oldest one (less padding)
            instead of in arrival order.
        clock: Monotonic clock in seconds; injected so tests control time.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        capacity: int,
        group_by_length: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if not (max_wait_s >= 0 and math.isfinite(max_wait_s)):
            raise ConfigError(f"max_wait_s must be finite and >= 0, got {max_wait_s}")
        if capacity < 1:
            raise ConfigError(f"capacity must be >= 1, got {capacity}")
        self._max_size = max_batch_size
        self._budget = max_batch_tokens
        self._max_wait = max_wait_s
        self._capacity = capacity
        self._group = group_by_length
        self._clock = clock
        # Arrival order (oldest first); an OrderedDict so grouped takes remove from the middle in O(1).
        self._fifo: OrderedDict[int, _Entry[T]] = OrderedDict()
        # One bucket per token length, each in arrival order, and the sorted list of lengths that have
        # items: the longest pending item for the readiness check, and the neighbourhood of the oldest
        # item's length for grouped takes. Adding and removing an item is O(1) (a new length costs an
        # insort into a list of at most max_length entries), however many items wait.
        self._buckets: dict[int, OrderedDict[int, _Entry[T]]] = {}
        self._lengths: list[int] = []
        self._seq = 0

    # -- configuration -------------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self._max_size

    @property
    def max_batch_tokens(self) -> int:
        """The current padded-token budget."""
        return self._budget

    @property
    def max_wait_s(self) -> float:
        return self._max_wait

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def group_by_length(self) -> bool:
        return self._group

    def now(self) -> float:
        """The injected clock's reading."""
        return self._clock()

    def set_token_budget(self, n: int) -> None:
        """Change the padded-token budget (adaptive sizing); applies to the next batch formed."""
        if n < 1:
            raise ValueError(f"token budget must be >= 1, got {n}")
        self._budget = n

    # -- queue ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._fifo)

    def is_full(self) -> bool:
        return len(self._fifo) >= self._capacity

    def add(self, item: T, tokens: int) -> None:
        """Queue ``item`` of ``tokens`` tokens, stamped with the clock.

        Raises:
            QueueFull: ``capacity`` items are already pending.
            ValueError: ``tokens`` < 1.
        """
        if tokens < 1:
            raise ValueError(f"an item has at least one token, got {tokens}")
        if len(self._fifo) >= self._capacity:
            raise QueueFull(f"batcher holds its capacity of {self._capacity} items")
        self._add(item, tokens, self._clock())

    def add_many(self, items: Sequence[tuple[T, int]]) -> None:
        """Queue several ``(item, tokens)`` at once, all stamped with one clock reading.

        Raises:
            QueueFull: they do not all fit; none is added.
            ValueError: a token count < 1; none is added.
        """
        if any(tokens < 1 for _, tokens in items):
            raise ValueError("an item has at least one token")
        if len(self._fifo) + len(items) > self._capacity:
            raise QueueFull(f"batcher holds {len(self._fifo)} of {self._capacity} items; {len(items)} more do not fit")
        now = self._clock()
        for item, tokens in items:
            self._add(item, tokens, now)

    def _add(self, item: T, tokens: int, arrival: float) -> None:
        seq = self._seq
        self._seq += 1
        entry = _Entry(seq, item, tokens, arrival)
        self._fifo[seq] = entry
        bucket = self._buckets.get(tokens)
        if bucket is None:
            bucket = self._buckets[tokens] = OrderedDict()
            insort(self._lengths, tokens)
        bucket[seq] = entry

    def _oldest(self) -> _Entry[T] | None:
        return next(iter(self._fifo.values()), None)

    def oldest_age(self, now: float) -> float | None:
        """Seconds the oldest pending item has waited, or None when empty."""
        oldest = self._oldest()
        return None if oldest is None else now - oldest.arrival

    def deadline(self) -> float | None:
        """Clock reading at which the oldest item's batch must close, or None when empty."""
        oldest = self._oldest()
        return None if oldest is None else oldest.arrival + self._max_wait

    def ready(self, now: float) -> bool:
        """Whether a batch should close now: count cap, token budget, or the oldest item's age.

        The token condition is "all pending items padded together reach or overflow the budget", which is
        exactly when the batch :meth:`take` would form is budget-bound (some item left out, or the budget
        met); a lone oversized item is therefore ready at once, as waiting cannot grow its batch.
        """
        if self.full():
            return True
        oldest = self._oldest()
        if oldest is None:
            return False
        # Compared as `now >= arrival + wait` (not `now - arrival >= wait`) so it agrees bit for bit
        # with deadline(): a caller that sleeps until deadline() always finds the batch ready.
        return now >= oldest.arrival + self._max_wait

    def full(self) -> bool:
        """Whether a batch would close on a cap (count or token budget) rather than on age."""
        n = len(self._fifo)
        return n > 0 and (n >= self._max_size or self._lengths[-1] * n >= self._budget)

    def take(self, now: float) -> Batch[T] | None:
        """Form and remove one batch (even if not :meth:`ready`: that is a drain). None when empty."""
        oldest = self._oldest()
        if oldest is None:
            return None
        if self._group:
            chosen, left_out_by_tokens = self._select_grouped(oldest)
        else:
            chosen, left_out_by_tokens = self._select_in_order()
        for e in chosen:
            del self._fifo[e.seq]
        self._remove_from_index(chosen)
        chosen.sort(key=lambda e: e.seq)

        n = len(chosen)
        longest = max(e.tokens for e in chosen)
        padded = longest * n
        reason: CloseReason
        if n >= self._max_size:
            reason = "size"
        elif left_out_by_tokens or padded >= self._budget:
            reason = "tokens"
        elif now >= oldest.arrival + self._max_wait:
            reason = "age"
        else:
            reason = "drain"
        return Batch(
            items=tuple(e.item for e in chosen),
            token_counts=tuple(e.tokens for e in chosen),
            arrivals=tuple(e.arrival for e in chosen),
            real_tokens=sum(e.tokens for e in chosen),
            padded_tokens=padded,
            oldest_arrival=oldest.arrival,
            closed_at=now,
            reason=reason,
        )

    # -- selection -----------------------------------------------------------------------------

    def _select_in_order(self) -> tuple[list[_Entry[T]], bool]:
        """Arrival order, stopping at the first item that would overflow the budget (strict FIFO)."""
        chosen: list[_Entry[T]] = []
        longest = 0
        for e in self._fifo.values():
            if len(chosen) >= self._max_size:
                return chosen, False
            new_longest = max(longest, e.tokens)
            if chosen and new_longest * (len(chosen) + 1) > self._budget:
                return chosen, True
            chosen.append(e)
            longest = new_longest
        return chosen, False

    def _select_grouped(self, oldest: _Entry[T]) -> tuple[list[_Entry[T]], bool]:
        """The oldest item plus those closest to its length, under both caps.

        Walks outwards from the oldest item's length: upwards (its own length, then longer items, which
        raise the padded length) and downwards (shorter ones, which do not), taking whichever is closer in
        length, the older on a tie; within one length, oldest first.
        """
        t0 = oldest.tokens
        lengths = self._lengths
        buckets = self._buckets
        pos = bisect_left(lengths, t0)
        up_lengths = iter(lengths[pos:])
        down_lengths = iter(reversed(lengths[:pos]))

        def entries(length_iter: Iterator[int]) -> Iterator[_Entry[T]]:
            for length in length_iter:
                yield from buckets[length].values()

        up = entries(up_lengths)
        down = entries(down_lengths)
        next(up)  # the oldest item itself: the first of the first bucket upwards
        up_head = next(up, None)
        down_head = next(down, None)
        chosen = [oldest]
        longest = t0
        n = 1
        left_out = False
        budget = self._budget
        while n < self._max_size:
            if up_head is None and down_head is None:
                break
            take_up = down_head is None or (
                up_head is not None and (up_head.tokens - t0, up_head.seq) < (t0 - down_head.tokens, down_head.seq)
            )
            if take_up:
                assert up_head is not None
                if up_head.tokens * (n + 1) > budget:
                    # Every item further up is at least as long: close the upper side, keep the lower.
                    up_head = None
                    left_out = True
                    continue
                chosen.append(up_head)
                longest = up_head.tokens
                up_head = next(up, None)
            else:
                assert down_head is not None
                if longest * (n + 1) > budget:
                    # Even the shortest addition overflows, and so would anything above.
                    left_out = True
                    break
                chosen.append(down_head)
                down_head = next(down, None)
            n += 1
        return chosen, left_out

    def _remove_from_index(self, chosen: list[_Entry[T]]) -> None:
        buckets = self._buckets
        for e in chosen:
            bucket = buckets[e.tokens]
            del bucket[e.seq]
            if not bucket:
                del buckets[e.tokens]
                self._lengths.remove(e.tokens)


class AdaptiveBudget:
    """Padded-token budget that keeps batch time under a target.

    Rule: the time of a full batch is projected as ``cost_per_token x budget``, where the cost per token
    is the largest seconds/padded-token ratio among the last ``window`` batches that were at least
    ``min_fill`` full (small batches say little about a full one and overstate the per-token cost of the
    fixed overhead). Taking the window's largest ratio makes this a bound on the window's worst batch, the
    p99 for a window of 32. Over target, the budget shrinks at once; under ``low_water x target``, it grows
    but only after ``cooldown`` observations since the last change. Either way it is scaled
    multiplicatively to land at ``aim x target`` (at most x2 or /2 a step) and clamped to
    ``[minimum, min(maximum, cap)]``. Because ``aim`` lies inside the dead band
    ``[low_water, 1] x target``, a step does not trigger the opposite step: no oscillation.

    Out of memory halves the budget and sets a ceiling at 3/4 of the budget that failed, so growth does not
    walk straight back into the same failure.

    Args:
        initial: Starting budget.
        minimum: Floor of the budget (an item longer than the budget still runs alone).
        maximum: Ceiling of the budget.
        target_s: Batch-time target in seconds.
        window: Number of recent batches considered.
        low_water: Grow only when the projection is under this fraction of the target.
        aim: Fraction of the target a resize aims for; must lie in ``(low_water, 1)``.
        min_fill: Batches with fewer padded tokens than this fraction of the budget are not used to
            estimate the per-token cost.
        cooldown: Observations between a change and the next growth; ``window // 4`` by default.
    """

    def __init__(
        self,
        *,
        initial: int,
        minimum: int,
        maximum: int,
        target_s: float,
        window: int = 32,
        low_water: float = 0.6,
        aim: float = 0.85,
        min_fill: float = 0.5,
        cooldown: int | None = None,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ConfigError(f"need 1 <= minimum <= initial <= maximum, got {minimum}, {initial}, {maximum}")
        if not (target_s > 0 and math.isfinite(target_s)):
            raise ConfigError(f"target_s must be a positive number, got {target_s}")
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        if not 0 < low_water < aim < 1:
            raise ConfigError(f"need 0 < low_water < aim < 1, got {low_water}, {aim}")
        if not 0 <= min_fill <= 1:
            raise ConfigError(f"min_fill must be in [0, 1], got {min_fill}")
        self._value = initial
        self._minimum = minimum
        self._maximum = maximum
        self._target = target_s
        self._low = low_water
        self._aim = aim
        self._min_fill = min_fill
        self._cooldown = max(1, window // 4) if cooldown is None else cooldown
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._since_change = 0
        self._external_cap: int | None = None
        self._oom_ceiling: int | None = None

    @property
    def value(self) -> int:
        """The current padded-token budget."""
        return self._value

    @property
    def ceiling(self) -> int:
        """The highest value the budget may take now (maximum, external cap, OOM ceiling)."""
        c = self._maximum
        if self._external_cap is not None:
            c = min(c, self._external_cap)
        if self._oom_ceiling is not None:
            c = min(c, self._oom_ceiling)
        return max(self._minimum, c)

    def projected_s(self) -> float | None:
        """Projected time of a batch filling the current budget, or None without usable samples."""
        cost = self._cost_per_token()
        return None if cost is None else cost * self._value

    def observe(self, padded_tokens: int, seconds: float) -> int:
        """Record one batch's padded tokens and inference time; returns the (possibly new) budget."""
        if padded_tokens < 1 or not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"bad observation: {padded_tokens} tokens in {seconds} s")
        self._samples.append((padded_tokens, seconds))
        self._since_change += 1
        projected = self.projected_s()
        if projected is None or projected <= 0:
            return self._value
        if projected > self._target:
            factor = max(0.5, self._aim * self._target / projected)
        elif projected < self._low * self._target and self._since_change >= self._cooldown:
            factor = min(2.0, self._aim * self._target / projected)
        else:
            return self._value
        self._set(int(self._value * factor))
        return self._value

    def on_oom(self) -> int:
        """The batch at the current budget ran out of memory: halve, and never grow back near it."""
        failed = self._value
        self._oom_ceiling = max(self._minimum, failed * 3 // 4)
        self._set(failed // 2)
        return self._value

    def cap(self, n: int | None) -> int:
        """Apply an external upper bound (e.g. from free device memory); None removes it."""
        if n is not None and n < 1:
            raise ValueError(f"cap must be >= 1, got {n}")
        self._external_cap = n
        self._set(self._value)
        return self._value

    def _cost_per_token(self) -> float | None:
        floor = self._min_fill * self._value
        ratios = [s / p for p, s in self._samples if p >= floor]
        return max(ratios) if ratios else None

    def _set(self, n: int) -> None:
        new = min(max(n, self._minimum), self.ceiling)
        if new != self._value:
            self._value = new
            self._since_change = 0
