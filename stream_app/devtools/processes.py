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


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s process group and reap it; further Ctrl-Cs cannot interrupt this (it is short)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    while True:
        try:
            proc.wait(timeout=10)
            return
        except KeyboardInterrupt:
            continue  # a SIGKILLed process is gone in milliseconds: finish reaping it
        except subprocess.TimeoutExpired:
            return  # unkillable (a zombie in uninterruptible I/O): nothing more a parent can do


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Ask ``proc`` to stop (SIGTERM); after ``timeout_s`` kill its process group (it was started in a new
    session, so its own children go with it). Returns once it has exited.

    A Ctrl-C (KeyboardInterrupt) while waiting, someone impatient pressing it again during the orderly
    stop, kills the group at once and is then raised again: the stop is cut short, never abandoned (a
    second Ctrl-C once left the worker running on its own for over a minute).
    """
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
    except KeyboardInterrupt:
        _kill_group(proc)
        raise
