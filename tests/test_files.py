"""Output files: whole or absent, the umask's mode, and never a device or link replaced."""

from __future__ import annotations

import os
import stat

import pytest

from scanner.files import write_atomic


def test_a_new_file_gets_the_umask_mode_and_no_temp_file_is_left(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "r.json", b"{}")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"{}" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_symlink_is_followed_and_kept(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    write_atomic(tmp_path / "link.json", b"new")
    assert (tmp_path / "link.json").is_symlink()
    assert (tmp_path / "real.json").read_text() == "new"


def test_a_fifo_is_written_to_never_replaced(tmp_path):
    # what /dev/stdout or /dev/null are to a CI step: a file that is not a regular file
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        write_atomic(fifo, b"report")
        assert os.read(reader, 100) == b"report"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "r.json", "not bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
