"""Progress: the share done and the time left, as a live bar on a terminal and as sparse
lines in a log; driven by a fake clock so the rules are checked exactly."""

from __future__ import annotations

import io
import re

import pytest

from scanner.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_stage(progress: Progress, clock: Clock, label: str, steps: int, seconds: float) -> None:
    progress.stage(label)
    for step in range(1, steps + 1):
        clock.now += seconds / steps
        progress(step, steps)


def test_a_log_gets_a_line_per_10_percent_and_10_seconds_with_the_time_left() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress(stream=out, live=False, clock=clock)
    run_stage(progress, clock, "Shapley values towards class 0", 40, 120.0)  # 3 s a step
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "shapscan: Shapley values towards class 0 ..."
    assert lines[-1] == "shapscan: Shapley values towards class 0: done in 2 min 00 s"
    middle = lines[1:-1]
    # a line every 12 s (four 3-second steps): 10 s since the last and 10 % further
    assert len(middle) == 9
    first = re.fullmatch(r"shapscan: Shapley values towards class 0:\s+(\d+)%, (\d+) s, "
                         r"about (\d+) min (\d+) s left", middle[0])
    assert first is not None, middle[0]
    share, spent = int(first[1]), int(first[2])
    left = 60 * int(first[3]) + int(first[4])
    assert (share, spent) == (10, 12)
    assert left == pytest.approx(108, abs=1)  # 12 s for 10 %: 108 s for the other 90 %


def test_a_short_stage_in_a_log_prints_its_start_and_end_only() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress(stream=out, live=False, clock=clock)
    run_stage(progress, clock, "reversing triggers", 120, 8.0)
    run_stage(progress, clock, "choosing channels to zero", 10, 3.0)
    progress.close()
    assert out.getvalue().splitlines() == [
        "shapscan: reversing triggers ...", "shapscan: reversing triggers: done in 8 s",
        "shapscan: choosing channels to zero ...",
        "shapscan: choosing channels to zero: done in 3 s"]


def test_a_slow_stage_still_gets_a_heartbeat_every_minute() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress(stream=out, live=False, clock=clock)
    run_stage(progress, clock, "reversing triggers", 1000, 600.0)  # 0.1 % a step
    # 10 % takes 60 s here, so the share and the heartbeat agree: one line a minute
    lines = out.getvalue().splitlines()[1:]
    assert 9 <= len(lines) <= 10
    clock2, out2 = Clock(), io.StringIO()
    slow = Progress(stream=out2, live=False, clock=clock2)
    slow.stage("Shapley values towards class 3")
    clock2.now = 130.0
    slow(1, 100)  # only 1 % after two minutes: the heartbeat still says where it is
    assert out2.getvalue().splitlines()[1].startswith(
        "shapscan: Shapley values towards class 3:   1%, 2 min 10 s, about 3 h 34 min left")


def test_a_terminal_gets_a_live_bar_with_the_time_left_and_a_done_line() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress(stream=out, live=True, clock=clock)
    progress.stage("reversing triggers")
    for step in range(1, 61):  # converges at half the budget
        clock.now += 0.5
        progress(step, 120)
    progress.close()
    text = out.getvalue()
    draws = text.split("\r")[1:]
    assert draws[0].startswith("reversing triggers ...")
    halfway = next(d for d in draws if " 25% " in d)
    assert "[#####---------------]" in halfway and "~45s left" in halfway
    assert draws[-1].startswith("reversing triggers") and "done in 30s" in draws[-1]
    assert text.endswith("\n") and text.count("\n") == 1
    # a stage without a loop (loading) shows no bar it never filled
    progress.stage("loading model.onnx")
    clock.now += 0.2
    progress.close()
    assert out.getvalue().endswith("\rloading model.onnx ... done in 0s\x1b[K\n")
    # under 80 columns even with a long label and hours left
    assert all(len(d.replace("\x1b[K", "").rstrip("\n")) < 80 for d in draws)


def test_an_announcement_ends_the_bar_line_and_quiet_prints_nothing() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress(stream=out, live=True, clock=clock)
    progress.stage("reversing triggers")
    clock.now += 2
    progress(1, 10)
    progress.announce("a large scan")
    assert "\nshapscan: a large scan\n" in out.getvalue()
    quiet_out = io.StringIO()
    quiet = Progress(enabled=False, stream=quiet_out, live=False, clock=clock)
    run_stage(quiet, clock, "reversing triggers", 10, 100.0)
    quiet.announce("a large scan")
    quiet.close()
    assert quiet_out.getvalue() == ""


@pytest.mark.parametrize(("seconds", "text", "compact"), [
    (0.4, "0 s", "0s"), (59.6, "1 min 00 s", "1m00s"), (200, "3 min 20 s", "3m20s"),
    (3900, "1 h 05 min", "1h05m")])
def test_durations_read_as_a_person_says_them(seconds: float, text: str, compact: str) -> None:
    assert duration(seconds) == text and duration(seconds, compact=True) == compact


def test_a_long_forecast_is_said_before_the_scan_and_a_short_one_is_not() -> None:
    from scanner.estimate import ANNOUNCE_OVER_S, announce

    out = io.StringIO()
    progress = Progress(stream=out, live=False)
    assert not announce(progress, ANNOUNCE_OVER_S - 1, "small.onnx")
    assert out.getvalue() == ""
    assert announce(progress, 300.0, "big.onnx")
    assert out.getvalue() == (
        "shapscan: big.onnx: a long scan ahead: trigger reverse alone will take about "
        "5 min 00 s on this machine as it is now, the whole scan about 10 min 00 s to "
        "15 min 00 s if a backdoor is found and repaired\n")
