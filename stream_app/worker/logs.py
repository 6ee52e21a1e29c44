"""Logging for the worker: one format, and a rate limit on repeated warnings and errors.

With the broker gone, aiokafka and Faust log a connection error for every retry of every client: about
12,600 lines in 2.5 minutes before this filter. :class:`RateLimitFilter` lets the first ``burst``
records of each (logger, message template) through per ``interval_s`` and then counts the rest, printing
one summary line per template when the interval ends. INFO and DEBUG pass untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["RateLimitFilter", "setup_logging"]


class RateLimitFilter(logging.Filter):
    """Pass at most ``burst`` WARNING+ records per (logger, template) per ``interval_s``; summarise the rest.

    Args:
        interval_s: Length of a rate window.
        burst: Records of one template let through per window.
        clock: Monotonic seconds (injected in tests).
    """

    def __init__(self, interval_s: float = 10.0, burst: int = 5, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.burst = burst
        self.clock = clock
        self._windows: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, passed, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.interval_s:
                dropped = int(window[2]) if window is not None else 0
                self._windows[key] = [now, 1, 0]
                if len(self._windows) > 1000:  # bounded: forget the stalest templates
                    for stale in sorted(self._windows, key=lambda k: self._windows[k][0])[:500]:
                        del self._windows[stale]
                if dropped:
                    record.msg = f"{record.msg} [and {dropped} similar message(s) suppressed in the last window]"
                return True
            if window[1] < self.burst:
                window[1] = int(window[1]) + 1
                return True
            window[2] = int(window[2]) + 1
            return False


def setup_logging(level: str, *, rate_limit: bool = True) -> None:
    """Configure the root logger once: a timestamped format and, for the worker, the rate limit."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if rate_limit:
        handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
