"""Rewrite the README's configuration table from stream_app.settings (run after changing a setting)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from stream_app.settings import settings_reference

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def render() -> str:
    lines = [START, "| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{env}` | `{default}` | {desc} |" for env, default, desc in settings_reference()]
    return "\n".join([*lines, END])


def main() -> int:
    text = README.read_text(encoding="utf-8")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: render(), text, flags=re.S)
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
