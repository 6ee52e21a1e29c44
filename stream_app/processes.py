"""Stopping child processes in order: SIGTERM, a grace period, then SIGKILL to the whole group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

__all__ = ["terminate"]


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Ask ``proc`` to stop (SIGTERM); after ``timeout_s`` kill its process group (it was started in a new
    session, so its own children go with it). Returns once it has exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
