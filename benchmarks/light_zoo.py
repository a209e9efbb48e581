"""The nine classic ONNX Model Zoo architectures that ship inside the `onnx` wheel
(onnx/backend/test/data/light/: opset 9, 1,000 classes, 224x224, constant weights), each
scanned data-free by the real `shapscan` command in its own process: outcome, seconds and
peak resident memory (the process's own maximum RSS, from os.wait4).

    python benchmarks/light_zoo.py                    # all nine, the default policy
    python benchmarks/light_zoo.py --only light_vgg19,light_resnet50 --policy my.toml

A scan ends in a verdict or in a one-line inconclusive; this prints the rule id and the
first words of its reason. Peak memory covers loading, opset conversion, the forecast
probe and whatever stage ran.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def scan(model: Path, policy: str, timeout: float) -> tuple[int, str, float, float]:
    """(exit code, the outcome line, seconds, peak RSS of the scan's process in GB)."""
    code, text, seconds, peak = timed_scan([str(model), "--data-free", "--policy", policy,
                                            "--quiet"], timeout)
    outcome = f"killed after {timeout:.0f} s" if code == -9 else _outcome(text)
    return code, outcome, seconds, peak


def timed_scan(args: list[str], timeout: float) -> tuple[int, str, float, float]:
    """`shapscan scan ARGS` in its own process: (exit code, its output, seconds, peak RSS
    in GB, the process's own maximum from os.wait4); killed (-9) after `timeout`."""
    cmd = [sys.executable, "-c", "from scanner.cli import run; run()", "scan", *args]
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log,
                                env=os.environ | {"PYTHONPATH": str(ROOT)})
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here: its own rusage
        timer.cancel()
        seconds = time.perf_counter() - start
        log.seek(0)
        text = log.read()
    return os.waitstatus_to_exitcode(status), text, seconds, usage.ru_maxrss / 1e6


def _outcome(text: str) -> str:
    forecast = re.search(r"(SS210): .*?(data-free synthesis about [^,]+), then "
                         r"(trigger reverse about [^(]+?) on this machine", text)
    fast = re.search(r"the fast plan: data-free synthesis about ([^,]+), then trigger "
                     r"reverse about ([^,]+),", text)
    if forecast:  # both stages' forecasts, the whole of what the user is told
        return (f"{forecast.group(1)}: {forecast.group(2)}, then {forecast.group(3)}"
                + (f"; fast plan {fast.group(1)} + {fast.group(2)}" if fast else ""))
    for pattern in (r"(SS2\d\d: inconclusive: [^;(]*)", r"(inconclusive: [^;(]*)",
                    r"verdict[: ]+(\w+)", r"\b(clean|backdoor)\b"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip()[:110]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:110] if lines else "no output"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model stems")
    ap.add_argument("--policy", default="default")
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()
    models = sorted(LIGHT.glob("*.onnx"))
    if args.only:
        models = [m for m in models if m.stem in args.only.split(",")]
    print("| model | exit | outcome | seconds | peak RSS (GB) |")
    print("|---|---:|---|---:|---:|")
    for model in models:
        code, outcome, seconds, peak = scan(model, args.policy, args.timeout)
        print(f"| {model.stem} | {code} | {outcome} | {seconds:.0f} | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
