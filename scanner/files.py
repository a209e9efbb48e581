"""Atomic output files: what a CI gate writes is whole or absent."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .errors import OutputError


def write_atomic(path: str | Path, payload: bytes) -> Path:
    """Write `payload` to a temp file beside `path`, then rename it into place, so a reader
    (or a CI artifact upload) never sees half a file; nothing is left on failure. Not
    mkstemp: its files are 0600, and an output gets the mode the umask gives.

    A symlink is followed (its target is replaced, the link stays); a path that is not a
    regular file (/dev/null, /dev/stdout, a FIFO) is written in place, never replaced."""
    path = Path(path)
    try:
        return _write(path, payload)
    except OSError as exc:  # disk full, permissions, a vanished folder: one line, exit 2
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write(path: Path, payload: bytes) -> Path:
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_file():
        with open(path, "wb") as f:
            f.write(payload)
        return path
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
