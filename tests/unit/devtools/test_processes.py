"""Child-process helpers: SIGTERM runs a tool's clean-up; terminate() escalates to SIGKILL."""

from __future__ import annotations

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
