"""Checks of the files in deploy/ with the tools operators use on them (kubeconform, promtool, hadolint...).

The tools are installed into the cache by ``scripts/deploy/install_tools.sh``, which a fixture runs for a
tool that is missing (so a fresh CI machine gets them on the first run), skipping with the installer's own
reason only where the tool cannot be installed (no Go toolchain, no apt-get or not root).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.helpers import INSTALLER


def pytest_configure(config: pytest.Config) -> None:
    # Also listed in pyproject's markers; registered here too so this folder runs on its own.
    config.addinivalue_line("markers", "deploy: checks deploy/ files with external tools (kubeconform, promtool)")


def _install(tool: str) -> dict[str, Path]:
    """Run the installer for ``tool``; ``{name: path}`` from its output, or a skip with its reason."""
    proc = subprocess.run(["bash", str(INSTALLER), tool], capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        pytest.skip(f"{tool} cannot be installed here: {reason}")
    found = {}
    for line in proc.stdout.splitlines():
        name, _, path = line.partition(" ")
        if path:
            found[name] = Path(path)
    return found


@pytest.fixture(scope="session")
def tools() -> Callable[[str], dict[str, Path]]:
    """``tools("kubeconform")`` -> paths the installer reported (installed once per session)."""
    cache: dict[str, dict[str, Path]] = {}

    def get(tool: str) -> dict[str, Path]:
        if tool not in cache:
            cache[tool] = _install(tool)
        return cache[tool]

    return get


@pytest.fixture(scope="session")
def promtool(tools: Callable[[str], dict[str, Path]]) -> Path:
    return tools("promtool")["promtool"]


@pytest.fixture(scope="session")
def prometheus_bin(tools: Callable[[str], dict[str, Path]]) -> Path:
    return tools("promtool")["prometheus"]
