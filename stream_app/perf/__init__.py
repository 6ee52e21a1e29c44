"""Load generation, replay, the naive baseline and profiler reports: tooling, not the worker's runtime.

Installed with the ``perf`` extra (matplotlib for the plots); the ``replay``, ``baseline``, ``profile`` and
``sweep`` verbs of ``emotion-stream`` appear when it is. Nothing in the worker imports this package.
"""
