"""Writing shared files so that a reader never sees half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_target"]


@contextmanager
def atomic_target(out_path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``out_path``'s folder; rename it onto ``out_path`` if the block succeeds."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; a model file is shared read-only data like any other build artefact.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
