from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from stream_app.errors import DataError
from stream_app.model.data import Example, file_sha256, load_labels, load_split

pytestmark = pytest.mark.unit


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_labels_in_line_order(tmp_path: Path) -> None:
    path = _write(tmp_path / "labels.txt", "anger\ndisgust\nfear\n")
    assert load_labels(path) == ("anger", "disgust", "fear")


@pytest.mark.parametrize(
    ("content", "line"),
    [("anger\n\nfear\n", 2), ("anger\nfear\nanger\n", 3)],
    ids=["blank line", "duplicate"],
)
def test_bad_labels_name_the_line(tmp_path: Path, content: str, line: int) -> None:
    path = _write(tmp_path / "labels.txt", content)
    with pytest.raises(DataError, match=rf"labels\.txt:{line}:"):
        load_labels(path)


def test_split_keeps_multi_label_rows(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "train.tsv",
        "I love it\t3\tc1\nhappy but scared\t3,2\tc2\n\ncrlf row\t4\tc3\r\n",
    )
    rows = load_split(path, 7)
    assert rows == [
        Example("I love it", (3,), "c1", 1),
        Example("happy but scared", (2, 3), "c2", 2),
        Example("crlf row", (4,), "c3", 4),
    ]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("only text\t3", "expected 3 tab-separated columns"),
        ("too\tmany\tcolumns\there", "expected 3 tab-separated columns"),
        ("text\tx\tc", "not an integer"),
        ("text\t3,\tc", "empty label id"),
        ("text\t7\tc", "out of range"),
        ("text\t-1\tc", "out of range"),
        ("   \t3\tc", "empty text"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path: Path, row: str, reason: str) -> None:
    path = _write(tmp_path / "dev.tsv", f"fine\t1\ta\nalso fine\t2\tb\n{row}\nlater\t0\tz\n")
    with pytest.raises(DataError, match=reason) as info:
        load_split(path, 7)
    assert f"{path}:3:" in str(info.value)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"):
        load_split(_write(tmp_path / "x.tsv", "\n"), 7)


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_bytes(b"ok\t1\ta\nbad \xff\t1\tb\n")
    with pytest.raises(DataError, match=r"x\.tsv:2: not valid UTF-8"):
        load_split(path, 7)


def test_file_sha256(tmp_path: Path) -> None:
    path = _write(tmp_path / "f", "abc")
    assert file_sha256(path) == hashlib.sha256(b"abc").hexdigest()
