"""The run-time fallback: an engine that switches to another, for good, when its primary fails."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from stream_app.errors import DeviceOutOfMemoryError, EngineError, ModelError
from stream_app.inference.base import Engine, EngineInfo, FloatArray
from stream_app.inference.tokenize import EncodedBatch

__all__ = ["FallbackEngine", "OnFallback", "close_quietly"]

log = logging.getLogger(__name__)

OnFallback = Callable[[str, str, str], None]
"""``on_fallback(from_engine, to_engine, reason)``; ``reason`` starts with a fixed code and ``": "``."""


def close_quietly(engine: Engine) -> None:
    """Close ``engine``, logging (not raising) a failure: closing is best effort on the way out."""
    try:
        engine.close()
    except (EngineError, RuntimeError) as exc:
        log.warning("closing %s failed: %s", engine.info.name, exc)


class FallbackEngine:
    """An engine that switches to a fallback, for good, when its primary fails at run time.

    Device out-of-memory is not a failure of the engine (the caller splits the batch), so it passes
    through. Any other error from ``primary.predict`` is logged, reported through ``on_fallback`` with
    reason ``predict_failed: ...``, the fallback is built and the same batch runs again there. An error
    of the fallback itself propagates.
    """

    def __init__(
        self,
        primary: Engine,
        fallback_factory: Callable[[], Engine],
        on_fallback: OnFallback | None = None,
    ) -> None:
        self._current = primary
        self._primary = primary
        self._factory = fallback_factory
        self._on_fallback = on_fallback
        self._lock = threading.Lock()
        self.switched = False
        self.switch_reason: str | None = None

    @property
    def info(self) -> EngineInfo:
        """The info of the engine now serving."""
        return self._current.info

    @property
    def labels(self) -> tuple[str, ...]:
        """Labels of the engine now serving (the fallback must have the same)."""
        return self._current.labels

    @property
    def bytes_per_token(self) -> int:
        """Forwarded for :func:`~stream_app.inference.base.memory_token_budget`."""
        return int(getattr(self._current, "bytes_per_token", 0))

    @bytes_per_token.setter
    def bytes_per_token(self, value: int) -> None:
        if hasattr(self._current, "bytes_per_token"):
            setattr(self._current, "bytes_per_token", value)  # noqa: B010 - not every Engine has it

    @property
    def current(self) -> Engine:
        """The engine now serving."""
        return self._current

    def predict(self, batch: EncodedBatch) -> FloatArray:
        """Predict on the primary; on failure switch to the fallback and predict there."""
        engine = self._current
        try:
            return engine.predict(batch)
        except DeviceOutOfMemoryError:
            raise
        # Broad on purpose: any failure of the primary (ORT, a bug, a bad kernel) must not stop the
        # stream while the fallback can serve; the error is logged and reported, not swallowed.
        except Exception as exc:
            if engine is not self._primary:
                raise
            self._switch(engine, f"predict_failed: {type(exc).__name__}: {exc}")
        return self._current.predict(batch)

    def _switch(self, failed: Engine, reason: str) -> None:
        with self._lock:
            if self._current is not failed:  # another thread already switched
                return
            log.error("engine %s failed at run time, switching to its fallback: %s", failed.info.name, reason)
            try:
                fallback = self._factory()
            except (EngineError, ModelError, OSError, RuntimeError) as exc:
                raise EngineError(f"fallback engine failed to load after {reason}: {exc}") from exc
            if fallback.labels != failed.labels:
                close_quietly(fallback)
                raise EngineError(f"fallback labels {fallback.labels} != primary labels {failed.labels}")
            self._current = fallback
            self.switched = True
            self.switch_reason = reason
            close_quietly(failed)
        if self._on_fallback is not None:
            self._on_fallback(failed.info.name, fallback.info.name, reason)

    def close(self) -> None:
        """Close whichever engine serves now (the primary is closed at a switch)."""
        close_quietly(self._current)
