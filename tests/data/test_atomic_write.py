"""data.atomic.write_atomic: the project's one atomic file writer (text or bytes, optional mode)."""

import os

import pytest

from data.atomic import write_atomic


def test_write_atomic_text_bytes_mode(tmp_path):
    path = write_atomic(tmp_path / "a" / "b.txt", "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    write_atomic(path, b"\x00\x01", mode=0o600)
    assert path.read_bytes() == b"\x00\x01" and (os.stat(path).st_mode & 0o777) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]


def test_write_atomic_failure_leaves_the_old_file(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "c.txt", "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["c.txt"]
