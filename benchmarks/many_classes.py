"""How the scan's detection grows with the class count, on one architecture.

    python benchmarks/many_classes.py                        # 10, 100, 1000 classes
    python benchmarks/many_classes.py --classes 10,100 --size 32

Builds one small CNN per class count (3x{size}x{size} input, conv 16 - ReLU - conv 32
stride 2 - ReLU - conv 64 stride 2 - ReLU - global pool - Gemm to the classes) with
**random weights** (a cost and memory figure, not a verdict: nothing here is trained), and
one random image per class. Each is scanned by the real `shapscan scan` in its own process,
detection only (repair off, no second view, the clean-accuracy check off since a random
model classifies nothing), with the default policy otherwise: above
`detection.shortlist_over` classes the screen chooses the classes reversed in full. It
prints, per class count, the detection seconds (from the JSON report's timings), the
forward passes, the classes reversed in full, the peak RSS of the scan's process
(os.wait4), and each row's ratio to the first row, measured in the same run; then the
same with `shortlist_over = 0` (every class in full) for the counts given by `--full`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent


def build(classes: int, size: int, path: Path) -> None:
    rng = np.random.default_rng(classes)
    inits, nodes = [], []
    channels, x = 3, "x"
    for i, (out, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
        w = rng.normal(0, np.sqrt(2 / (channels * 9)), (out, channels, 3, 3))
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4,
                                   strides=[stride] * 2, name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        channels, x = out, f"r{i}"
    fc = rng.normal(0, np.sqrt(1 / channels), (classes, channels)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "fcb")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, f"random_cnn_{classes}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def scan(model: Path, data: Path, policy: Path, report: Path, timeout: float
         ) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS of the scan's process in GB)."""
    cmd = [sys.executable, "-c", "from scanner.cli import run; run()", "scan", str(model),
           "--data", str(data), "--policy", str(policy), "--report", str(report), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here: its own rusage
    finally:
        timer.cancel()
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="10,100,1000")
    ap.add_argument("--full", default="10,100", help="also scan these with every class in full")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    counts = [int(c) for c in args.classes.split(",")]
    full = [int(c) for c in args.full.split(",") if c]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shapscan-many-") as tmp:
        base = 'extends = "default"\n[detection]\nmin_clean_accuracy = 0.0\n' \
               'synthesised_view = false\nmax_minutes = 0\n{extra}[repair]\nenabled = false\n'
        for label, counts_, extra in (("screened", counts, ""),
                                      ("all in full", full, "shortlist_over = 0\n")):
            policy = Path(tmp) / f"p{len(rows)}.toml"
            policy.write_text(base.format(extra=extra))
            for c in counts_:
                model, data = Path(tmp) / f"m{c}.onnx", Path(tmp) / f"d{c}.npz"
                build(c, args.size, model)
                rng = np.random.default_rng(0)
                np.savez(data, x=rng.random((c, 3, args.size, args.size), np.float32),
                         y=np.arange(c))
                report = Path(tmp) / f"r{c}.json"
                code, wall, rss = scan(model, data, policy, report, args.timeout)
                row = {"mode": label, "classes": c, "exit": code, "wall": wall, "rss": rss}
                if report.is_file():
                    res = json.loads(report.read_text())["results"][0]
                    det = res.get("detection") or {}
                    row |= {"detect_s": res["timings"].get("reverse"),
                            "passes": det.get("forward_passes"),
                            "reversed": len(det.get("classes", []))}
                rows.append(row)
                print(row, flush=True)
    print(f"\nrandom-weight CNN, 3x{args.size}x{args.size}, one random image per class; "
          "detection only (repair off, no second view)\n")
    print("| classes | mode | exit | classes reversed in full | forward passes | passes x first "
          "row | detection s | s x first row | peak RSS GB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    first: dict[str, dict] = {}
    for r in rows:
        base = first.setdefault(r["mode"], r)

        def ratio(key: str, r: dict = r, base: dict = base) -> str:
            return f"{r[key] / base[key]:.1f}" if r.get(key) and base.get(key) else "-"

        print(f"| {r['classes']:,} | {r['mode']} | {r['exit']} | {r.get('reversed', '-')} | "
              f"{r.get('passes') or 0:,} | {ratio('passes')} | {r.get('detect_s') or 0:.0f} | "
              f"{ratio('detect_s')} | {r['rss']:.2f} |")


if __name__ == "__main__":
    main()
