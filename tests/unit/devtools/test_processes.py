"""Child-process helpers: SIGTERM runs a tool's clean-up; terminate() escalates to SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_app.devtools.processes import terminate

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]

_CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from stream_app.devtools.processes import exit_on_sigterm
if {install}:
    exit_on_sigterm()
try:
    print("ready", flush=True)
    time.sleep(60)
finally:
    open({marker!r}, "w").write("cleaned up")
"""


def _spawn(tmp_path: Path, install: bool) -> tuple[subprocess.Popen[bytes], Path]:
    marker = tmp_path / "marker"
    code = _CHILD.format(repo=str(REPO), install=install, marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    return proc, marker


@pytest.mark.parametrize("install", [True, False])
def test_sigterm_runs_finally_blocks_only_with_the_handler(tmp_path: Path, install: bool) -> None:
    proc, marker = _spawn(tmp_path, install)
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        terminate(proc, timeout_s=1)
        assert proc.stdout is not None
        proc.stdout.close()
    if install:
        assert code == 128 + signal.SIGTERM
        assert marker.read_text() == "cleaned up"
    else:
        assert code == -signal.SIGTERM
        assert not marker.exists()


def test_terminate_kills_a_child_that_ignores_sigterm() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    started = time.monotonic()
    terminate(proc, timeout_s=0.5)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 15


_PARENT = """
import subprocess, sys, time
sys.path.insert(0, {repo!r})
from stream_app.devtools.processes import terminate
child = subprocess.Popen(
    [sys.executable, "-c",
     "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"],
    start_new_session=True, stdout=subprocess.PIPE,
)
assert child.stdout.readline().strip() == b"ready"
try:
    print(child.pid, flush=True)
    time.sleep(300)  # the tool's work; the first Ctrl-C ends it
finally:
    print("stopping", flush=True)
    terminate(child, timeout_s=60)  # a slow orderly stop (this child ignores SIGTERM); a 2nd Ctrl-C comes
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_second_ctrl_c_during_the_stop_kills_the_child_instead_of_orphaning_it() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT.format(repo=str(REPO))], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGINT)  # Ctrl-C: the orderly stop begins (SIGTERM, then a 60 s wait)
        assert parent.stdout.readline().strip() == b"stopping"
        time.sleep(0.5)
        assert _alive(child)  # it ignores SIGTERM: the orderly stop would take the whole minute
        pressed = time.monotonic()
        parent.send_signal(signal.SIGINT)  # Ctrl-C again
        parent.wait(timeout=20)
        assert time.monotonic() - pressed < 10
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its parent"
        assert parent.returncode != 0  # the interrupt still reached the tool
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.communicate(timeout=10)
