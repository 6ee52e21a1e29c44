"""Docker HEALTHCHECK of a worker: GET one of its health endpoints on loopback; exit 0 when it answers 200.

Usage: ``python healthcheck.py [/livez|/readyz]`` (default ``/livez``). The port is the worker's
``EMOTION_STREAM_METRICS__PORT`` (default 9108). Standard library only: it runs in the image's Python
before anything else is known to work. Prints the worker's reason when the answer is not 200.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 2.5  # under the HEALTHCHECK --timeout of 3 s, so a hung worker reads as unhealthy, not as a timeout


def check(path: str = "/livez", port: int | None = None) -> tuple[bool, str]:
    """``(healthy, what the worker said)`` for ``GET http://127.0.0.1:<port><path>``."""
    port = port if port is not None else int(os.environ.get("EMOTION_STREAM_METRICS__PORT") or 9108)
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.status == 200, f"{response.status} {response.read(500).decode(errors='replace')}"
    except urllib.error.HTTPError as exc:
        with exc:
            return False, f"{exc.code} {exc.read(500).decode(errors='replace')}"
    except (OSError, ValueError) as exc:  # refused, timed out, or not HTTP at all
        return False, f"{url}: {exc}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/livez"
    healthy, said = check(path)
    print(said.strip())
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
