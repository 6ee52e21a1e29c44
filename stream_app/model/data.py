"""Readers for the GoEmotions (Ekman) files: ``labels.txt`` and the ``text<TAB>ids<TAB>comment id`` splits.

The splits have no header. The label column holds one or more label ids separated by commas (``3,4``);
multi-label rows are kept as they are. A row that cannot be read raises :class:`~stream_app.errors.DataError`
whose message names the file and the 1-based line, so a broken file is fixed, not silently thinned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from stream_app.errors import DataError

__all__ = ["Example", "file_sha256", "load_labels", "load_split"]


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled row of a split."""

    text: str
    label_ids: tuple[int, ...]
    comment_id: str
    line_no: int


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line_no}: not valid UTF-8") from exc
    # splitlines() would also split on \x0b, \x1c, U+2028 ... which can occur inside Reddit text.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def load_labels(path: Path | str) -> tuple[str, ...]:
    """Label names, one a line; a label's id is its 0-based line number. Blank lines are not allowed
    between labels (they would shift every id after them)."""
    path = Path(path)
    lines = _read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: no labels")
    seen: dict[str, int] = {}
    labels: list[str] = []
    for line_no, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            raise DataError(f"{path}:{line_no}: empty label name")
        if name in seen:
            raise DataError(f"{path}:{line_no}: duplicate label {name!r} (first on line {seen[name]})")
        seen[name] = line_no
        labels.append(name)
    return tuple(labels)


def _parse_label_ids(field: str, num_labels: int, where: str) -> tuple[int, ...]:
    parts = [p.strip() for p in field.split(",")]
    if not field.strip() or any(not p for p in parts):
        raise DataError(f"{where}: empty label id in {field!r}")
    ids: list[int] = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise DataError(f"{where}: label id {part!r} is not an integer") from None
        if not 0 <= value < num_labels:
            raise DataError(f"{where}: label id {value} is out of range 0..{num_labels - 1}")
        if value not in ids:
            ids.append(value)
    return tuple(sorted(ids))


def load_split(path: Path | str, num_labels: int) -> list[Example]:
    """Read a split. Lines that are completely empty are skipped; every other line must be
    ``text<TAB>label ids<TAB>comment id`` with non-empty text and ids in ``0..num_labels-1``."""
    if num_labels < 1:
        raise ValueError("num_labels must be positive")
    path = Path(path)
    examples: list[Example] = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line:
            continue
        where = f"{path}:{line_no}"
        cols = line.split("\t")
        if len(cols) != 3:
            raise DataError(f"{where}: expected 3 tab-separated columns (text, label ids, comment id), got {len(cols)}")
        text, label_field, comment_id = cols
        if not text.strip():
            raise DataError(f"{where}: empty text")
        examples.append(
            Example(
                text=text,
                label_ids=_parse_label_ids(label_field, num_labels, where),
                comment_id=comment_id.strip(),
                line_no=line_no,
            )
        )
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples
