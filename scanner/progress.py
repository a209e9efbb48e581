"""Progress on stderr: a live bar on a terminal, one line per stage otherwise, nothing quiet."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None,
                 live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = self.stream.isatty() if live is None else live
        self._label = ""
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def stage(self, label: str) -> None:
        """Start a stage; on a non-terminal this is the only output."""
        self._finish_line()
        self._label = label
        self._start = time.perf_counter()
        if self.enabled and not self.live:
            print(f"shapscan: {label} ...", file=self.stream, flush=True)

    def __call__(self, done: int, total: int) -> None:
        if not (self.enabled and self.live):
            return
        now = time.perf_counter()
        if done < total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = 24
        filled = int(width * done / max(1, total))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self._label:<28} [{bar}] {done}/{total} "
                          f"{now - self._start:5.1f}s")
        self.stream.flush()

    def _finish_line(self) -> None:
        if self.enabled and self.live and self._label:
            self.stream.write("\n")
            self.stream.flush()

    def close(self) -> None:
        self._finish_line()
        self._label = ""
