"""Stopping child processes in order: SIGTERM, a grace period, then SIGKILL to the whole group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

__all__ = ["exit_on_sigterm", "terminate"]


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` in the main thread.

    Python's default for SIGTERM ends the process at once, skipping ``finally`` blocks and context
    managers, so a tool stopped that way (``kill``, a CI timeout) left the local Kafka and worker it had
    started running. With this, they stop as they do on Ctrl-C. A Faust worker later installs its own
    handler on the event loop, which takes precedence.
    """

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


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
