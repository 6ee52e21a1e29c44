"""N worker processes on one host: ``emotion-stream worker --processes N``.

One Python process drains a few thousand messages per second on the host side (the GIL bounds what its
threads do in Python); a GPU host with many cores and one device is served by several processes, each a
full member of the consumer group sharing the device (CUDA time-slices the processes' kernels; each
process holds its own copy of the model in device memory). This supervisor starts them as children and:

* gives child ``i`` its own worker id (``<worker_id>-<i>``), state folder (``<state_dir>/<i>``: RocksDB
  locks its folder) and HTTP port (``metrics.port + i``: each serves its own probes and metrics);
* passes SIGTERM/SIGINT on to all of them and waits (each bounds its own stop);
* when one child exits on its own, stops the others and exits with that child's code, so the
  supervisor above it (Kubernetes, systemd) restarts the whole set: a restart policy per child here would
  hide crash loops from it.

Limits: the partitions of the input are shared by all processes of all hosts (more processes than
partitions leave some idle); every process loads the model (memory x N); per-process caches (L1) are not
shared, L2 is per partition anyway.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from stream_app.devtools.processes import terminate
from stream_app.settings import Settings

__all__ = ["child_env", "supervise"]

_log = logging.getLogger(__name__)


def child_env(settings: Settings, index: int, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of child ``index``: its own worker id, state folder and HTTP port."""
    env = dict(base)
    env["EMOTION_STREAM_WORKER__WORKER_ID"] = f"{settings.worker.worker_id}-{index}"
    env["EMOTION_STREAM_WORKER__STATE_DIR"] = str(Path(settings.worker.state_dir) / str(index))
    if settings.metrics.port:
        env["EMOTION_STREAM_METRICS__PORT"] = str(settings.metrics.port + index)
        if not settings.worker.advertised_url:
            env.pop("EMOTION_STREAM_WORKER__ADVERTISED_URL", None)
    return env


def supervise(settings: Settings, processes: int, *, poll_s: float = 0.5) -> int:
    """Run ``processes`` workers until a signal or until one exits; returns the exit code to use."""
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(processes):
            env = child_env(settings, i, os.environ)
            children.append(
                subprocess.Popen([sys.executable, "-m", "stream_app.cli", "worker"], env=env, start_new_session=True)
            )
            _log.info("worker %d of %d: pid %d", i + 1, processes, children[-1].pid)
        code = 0
        while not stopping:
            done = [c for c in children if c.poll() is not None]
            if done:
                code = done[0].returncode
                _log.warning("worker pid %d exited with %d: stopping the others", done[0].pid, code)
                break
            time.sleep(poll_s)
        for c in children:
            terminate(c, settings.worker.shutdown_timeout_s + 5)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for c in children:
            if c.poll() is None:
                terminate(c, 5)
