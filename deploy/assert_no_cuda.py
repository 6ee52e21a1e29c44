"""Fail the CPU image's build if PyTorch or a CUDA library got into its environment.

The CPU worker serves with ONNX Runtime; PyTorch and the ``nvidia-*`` wheels it pulls add gigabytes and
nothing it runs. Run by deploy/Dockerfile after the install; exits 1 naming what it found.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib import metadata

FORBIDDEN_NAMES = {"torch", "torchvision", "torchaudio", "triton", "onnxruntime-gpu", "cupy", "tensorrt"}
FORBIDDEN_PREFIXES = ("nvidia-", "cuda-")


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def forbidden(names: Iterable[str]) -> list[str]:
    """The distributions among ``names`` that a CPU image must not hold, sorted."""
    found = {_normal(n) for n in names}
    return sorted(n for n in found if n in FORBIDDEN_NAMES or n.startswith(FORBIDDEN_PREFIXES))


def main() -> int:
    bad = forbidden(d.metadata["Name"] for d in metadata.distributions())
    if bad:
        print(f"the CPU image must not hold PyTorch or CUDA libraries; found: {', '.join(bad)}", file=sys.stderr)
        return 1
    print("no PyTorch, no CUDA libraries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
