"""Optional heavy dependencies: imported on first use, with an error that names the extra to install.

An ONNX-only worker runs without PyTorch and transformers (install extras ``torch`` for the PyTorch
engine, the run-time fallback and ONNX export). Every import of those goes through :func:`require`, so a
missing package becomes an :class:`~stream_app.errors.EngineError` that says what to install instead of a
bare ``ModuleNotFoundError`` deep in a stack.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

from stream_app.errors import EngineError

__all__ = ["EXTRA_FOR", "MissingExtraError", "installed_version", "require"]

EXTRA_FOR: dict[str, str] = {
    "torch": "torch",
    "transformers": "torch",
    "safetensors": "torch",
    "onnxscript": "torch",
    "onnx": "onnx",
    "onnxruntime": "onnx",
}
"""The ``emotion-stream[...]`` extra that provides each optional top-level package."""


class MissingExtraError(EngineError):
    """An optional package an engine needs is not installed (the message names the extra)."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise an :class:`EngineError` naming the extra.

    Args:
        module: what to import, e.g. ``torch`` or ``transformers``.
        purpose: what needs it, for the message (``"the PyTorch engine"``).

    Raises:
        MissingExtraError: the package is not installed (or fails to import).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".", 1)[0]
        extra = EXTRA_FOR.get(top)
        hint = f"pip install 'emotion-stream[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(f"{purpose} needs {top}, which is not installed ({exc}); {hint}") from exc


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` from its metadata (no import), or None when absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
