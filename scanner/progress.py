"""Progress on stderr for the long stages: trigger reverse (and the second view's synthesis
and reverse), Shapley values, choosing the channels to zero.

Each stage reports `progress(done, total)` from its loop; the share done and the time
spent give an estimate of the time left (linear; a loop that can stop early, such as a
reverse that converges or a repair that reaches its target, may finish sooner).

* On a terminal: one live bar per stage with the share, the time spent and the time left,
  redrawn at most ten times a second.
* Elsewhere (a CI log, a file): the stage's name when it starts; then a line only once the
  stage has gone at least 10 % further *and* 10 s have passed since the last line (so a
  30-second stage prints two or three, a long one at most ten), or after 60 s of silence
  whatever the share (a CI runner that kills silent jobs still sees a heartbeat); and the
  stage's time when it ends.
* Quiet: nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from .errors import OutOfTime

LINE_EVERY_S = 10.0  # a non-terminal line needs this much time since the last one ...
LINE_EVERY_SHARE = 0.10  # ... and this much more of the stage done
HEARTBEAT_S = 60.0  # ... or this long without a line
REDRAW_S = 0.1  # the live bar's refresh
LABEL_WIDTH, BAR_WIDTH = 30, 20  # with the status, under 80 columns


def duration(seconds: float, compact: bool = False) -> str:
    """`7 s`, `3 min 20 s`, `1 h 05 min` (compact: `7s`, `3m20s`, `1h05m`)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s" if compact else f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if compact else f"{s // 60} min {s % 60:02d} s"
    return (f"{s // 3600}h{s % 3600 // 60:02d}m" if compact
            else f"{s // 3600} h {s % 3600 // 60:02d} min")


class Progress:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None,
                 live: bool | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = self.stream.isatty() if live is None else live
        self.clock = clock
        self._label = ""
        self._start = clock()
        self._last_line = self._start  # when the last line (or the bar) was written
        self._last_share = 0.0  # the share the last non-terminal line reported
        self._updates = 0  # progress reports received in this stage
        self._bar_open = False  # the live bar is on the current line
        # a stage reporting progress after this (clock) time raises OutOfTime; None: never
        self.deadline: float | None = None

    def stage(self, label: str) -> None:
        """Start a stage (and end the previous one)."""
        self._end_stage()
        self._label = label
        self._start = self._last_line = self.clock()
        self._last_share, self._updates = 0.0, 0
        if self.enabled and not self.live:
            self._write(f"shapscan: {label} ...")
        elif self.enabled:
            self._draw(f"{label} ...")

    def __call__(self, done: int, total: int) -> None:
        """The stage's loop has done `done` of `total` units (steps, permutations, rounds)."""
        if self.deadline is not None and self.clock() > self.deadline:
            raise OutOfTime(self._label)
        if not self.enabled or total <= 0:
            return
        self._updates += 1
        now = self.clock()
        share = min(1.0, max(0.0, done / total))
        if self.live:
            if share < 1.0 and now - self._last_line < REDRAW_S:
                return
            self._last_line = now
            self._draw(self._bar(share, self._status(share, now, compact=True)))
            return
        quiet_for = now - self._last_line + 1e-9  # 0.3 - 0.2 < 0.1 in floats
        further = share - self._last_share + 1e-9
        if share >= 1.0 or not ((quiet_for >= LINE_EVERY_S and further >= LINE_EVERY_SHARE)
                                or quiet_for >= HEARTBEAT_S):
            return  # the end of the stage is said by _end_stage
        self._last_line, self._last_share = now, share
        self._write(f"shapscan: {self._label}: {self._status(share, now)}")

    def _status(self, share: float, now: float, compact: bool = False) -> str:
        spent = now - self._start
        sep = " " if compact else ", "
        text = f"{100 * share:3.0f}%{sep}{duration(spent, compact)}"
        if 0 < share < 1 and spent >= 1.0:  # earlier, the rate is noise
            left = duration(spent * (1 - share) / share, compact)
            text += f"{sep}~{left} left" if compact else f", about {left} left"
        return text

    def _bar(self, share: float, status: str) -> str:
        filled = int(BAR_WIDTH * share)
        return f"{self._label:<{LABEL_WIDTH}.{LABEL_WIDTH}} [{'#' * filled}" \
               f"{'-' * (BAR_WIDTH - filled)}] {status}"

    def _draw(self, text: str) -> None:
        # \x1b[K erases what a longer previous draw left on the line
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()
        self._bar_open = True

    def announce(self, text: str) -> None:
        """One line of its own (an estimate before a long scan), on terminals too."""
        if not self.enabled:
            return
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
        self._write(f"shapscan: {text}")

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def _end_stage(self) -> None:
        if not (self.enabled and self._label):
            return
        spent = duration(self.clock() - self._start)
        if self._bar_open:  # a loop that stopped early (converged, target reached) is done too
            done = f"done in {duration(self.clock() - self._start, True)}"
            self._draw(self._bar(1.0, done) if self._updates else f"{self._label} ... {done}")
            self.stream.write("\n")
            self.stream.flush()
            self._bar_open = False
        elif not self.live and self._updates:
            self._write(f"shapscan: {self._label}: done in {spent}")

    def close(self) -> None:
        self._end_stage()
        self._label = ""
