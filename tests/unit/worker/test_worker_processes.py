"""The --processes supervisor: each child its own id, state folder and port; one exit stops the rest."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stream_app.settings import Settings
from stream_app.worker import processes
from stream_app.worker.processes import child_env

pytestmark = pytest.mark.unit


def test_each_child_gets_its_own_worker_id_state_folder_and_port(tmp_path: Path) -> None:
    settings = Settings(metrics={"port": 9200}, worker={"worker_id": "host-a", "state_dir": tmp_path})
    envs = [child_env(settings, i, {"KEEP": "1"}) for i in range(3)]
    assert [e["EMOTION_STREAM_WORKER__WORKER_ID"] for e in envs] == ["host-a-0", "host-a-1", "host-a-2"]
    assert [e["EMOTION_STREAM_METRICS__PORT"] for e in envs] == ["9200", "9201", "9202"]
    assert len({e["EMOTION_STREAM_WORKER__STATE_DIR"] for e in envs}) == 3
    assert all(e["KEEP"] == "1" for e in envs)


def test_when_one_child_exits_the_others_are_stopped_and_its_code_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def fake_popen(cmd: list[str], env: dict[str, str], start_new_session: bool) -> Any:
        # child 0 fails after a moment (a crash); child 1 would run for a minute
        index = int(env["EMOTION_STREAM_WORKER__WORKER_ID"].rsplit("-", 1)[1])
        script = "import sys, time; time.sleep(0.3); sys.exit(3)" if index == 0 else "import time; time.sleep(60)"
        proc = real_popen([sys.executable, "-c", script], start_new_session=True)
        started.append(proc)
        return proc

    monkeypatch.setattr(processes.subprocess, "Popen", fake_popen)
    settings = Settings(worker={"worker_id": "h", "state_dir": tmp_path, "shutdown_timeout_s": 2})
    t0 = time.monotonic()
    code = processes.supervise(settings, 2, poll_s=0.05)
    assert code == 3
    assert all(p.poll() is not None for p in started)
    assert time.monotonic() - t0 < 15
