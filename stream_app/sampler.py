"""Resource sampling: this process's CPU and memory (psutil) and, when pynvml finds one, its GPU.

A daemon thread reads them every ``interval_s`` into the Prometheus gauges of
:class:`~stream_app.metrics.Metrics` and a bounded ring of samples (the profiler in ``stream_app.perf``
reads the ring). One reading costs about 55 µs of CPU (``benchmarks/replay.py --modes overhead``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from stream_app.metrics import Metrics

__all__ = ["ResourceSample", "ResourceSampler"]


@dataclass(frozen=True, slots=True)
class ResourceSample:
    """One reading. ``cpu_percent`` is psutil's (100 = one core busy); GPU fields are None without pynvml."""

    t: float
    cpu_percent: float
    rss_bytes: int
    cpu_count: int
    gpu_utilization_percent: float | None = None
    gpu_memory_used_bytes: int | None = None


class ResourceSampler:
    """Samples CPU, RSS and (with pynvml) GPU of this process every ``interval_s`` on a daemon thread.

    The readings go into ``metrics.process_cpu_percent``, ``process_rss_bytes``,
    ``gpu_utilization_percent`` and ``gpu_memory_used_bytes``, and into a ring of the last ``capacity``
    samples (:meth:`samples`). A missing pynvml or GPU is never an error: :attr:`gpu_note` says why GPU
    readings are absent, in one line.
    """

    def __init__(
        self,
        metrics: Metrics,
        interval_s: float = 1.0,
        *,
        capacity: int = 3600,
        gpu_index: int = 0,
        pid: int | None = None,
    ) -> None:
        import psutil

        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.metrics = metrics
        self.interval_s = interval_s
        self._process = psutil.Process(pid)
        self._cpu_count = psutil.cpu_count() or 1
        self._ring: deque[ResourceSample] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._gpu: Any = None
        self.gpu_note = self._init_gpu(gpu_index)
        self._process.cpu_percent(None)  # the first call only sets the reference point

    def _init_gpu(self, index: int) -> str:
        try:
            import pynvml
        except ImportError:
            return "GPU sampling off: pynvml is not installed (pip install nvidia-ml-py)"
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            if count <= index:
                pynvml.nvmlShutdown()
                return f"GPU sampling off: no NVIDIA GPU at index {index} ({count} found)"
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
        except pynvml.NVMLError as exc:
            return f"GPU sampling off: NVML unavailable ({exc})"
        self._nvml, self._gpu = pynvml, handle
        return f"GPU sampling on: {name.decode() if isinstance(name, bytes) else name} (index {index})"

    def sample_once(self) -> ResourceSample:
        """Take one reading now, publish it to the gauges and the ring, and return it."""
        cpu = float(self._process.cpu_percent(None))
        rss = int(self._process.memory_info().rss)
        util: float | None = None
        used: int | None = None
        if self._gpu is not None:
            try:
                util = float(self._nvml.nvmlDeviceGetUtilizationRates(self._gpu).gpu)
                used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._gpu).used)
            except self._nvml.NVMLError as exc:
                self.gpu_note = f"GPU sampling stopped: {exc}"
                self._gpu = None
        sample = ResourceSample(time.time(), cpu, rss, self._cpu_count, util, used)
        self.metrics.process_cpu_percent.set(cpu)
        self.metrics.process_rss_bytes.set(rss)
        if util is not None and used is not None:
            self.metrics.gpu_utilization_percent.set(util)
            self.metrics.gpu_memory_used_bytes.set(used)
        with self._lock:
            self._ring.append(sample)
        return sample

    def samples(self) -> list[ResourceSample]:
        with self._lock:
            return list(self._ring)

    def start(self) -> ResourceSampler:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
            self._thread = None
        if self._nvml is not None:
            # already shut down, or the driver went away: nothing left to release
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._nvml = self._gpu = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()
