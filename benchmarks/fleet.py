"""A folder of models scanned locally (one after another) and on a local Ray cluster, in
one run: the same results? how much faster?

    SHAPSCAN_THREADS=1 python benchmarks/fleet.py                 # the 12 sample models
    SHAPSCAN_THREADS=1 python benchmarks/fleet.py --copies 2      # 24: each twice, renamed
    SHAPSCAN_THREADS=1 python benchmarks/fleet.py --quick         # a quarter of the steps
    SHAPSCAN_THREADS=1 python benchmarks/fleet.py --only cnn_clean,cnn_badnets  # a subset

Both runs drive the real `shapscan scan` entry point on the same folder with --report;
the Ray run adds `--executor ray` against a cluster of --cpus CPUs started here (its start
is timed apart). --quick scans with a policy of fewer steps (QUICK_POLICY: for a busy
machine; what is compared is the two runs, not the verdicts' quality). Results match when
every model's verdict, flagged targets, zeroed channels and the exit code are the same.
Set SHAPSCAN_THREADS=1: a Ray task runs ORT on as many threads as the driver's
SHAPSCAN_THREADS (else its CPU request), and the local run should use as many, or the
comparison measures thread counts. Needs `pip install 'shapscan[ray]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scanner.cli import main  # noqa: E402

# the default policy with about a quarter of the reverse steps and Shapley permutations
QUICK_POLICY = """extends = "default"
[detection]
reverse_steps = 30
second_view_steps = 15
[shapley]
permutations = 10
"""


def outcome(report: Path) -> dict[str, tuple]:
    doc = json.loads(report.read_text())
    return {Path(r["model_path"]).name: (
        r["verdict"], tuple((r["detection"] or {}).get("flagged_targets", ())),
        tuple((c["layer"], c["channel"]) for c in (r["repair"] or {}).get("pruned", ())),
        r.get("attempts", 1)) for r in doc["results"]}


def timed_scan(folder: Path, data: Path, policy: str, report: Path, *extra: str
               ) -> tuple[int, float]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # stderr keeps the progress lines
        code = main(["scan", str(folder), "--data", str(data), "--policy", policy,
                     "--report", str(report), *extra])
    return code, time.perf_counter() - start


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> None:
    import ray

    models = sorted(p for p in args.models.iterdir() if p.suffix == ".onnx")
    if args.only:
        wanted = set(args.only.split(","))
        models = [p for p in models if p.stem in wanted]
        if len(models) != len(wanted):
            raise SystemExit(f"--only: no model named {wanted - {p.stem for p in models}}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "fleet"
        folder.mkdir()
        policy = args.policy
        if args.quick:
            policy = str(Path(tmp) / "quick.toml")
            Path(policy).write_text(QUICK_POLICY)
        for copy in range(args.copies):
            for model in models:
                tag = f"_copy{copy}" if args.copies > 1 else ""
                # copies, not links: a model named twice is scanned once
                shutil.copyfile(model, folder / f"{model.stem}{tag}.onnx")
        n = len(list(folder.iterdir()))
        threads = os.environ.get("SHAPSCAN_THREADS", "unset")
        print(f"{n} models, policy {'quick' if args.quick else args.policy}, "
              f"SHAPSCAN_THREADS={threads}, "
              f"{os.cpu_count()} cores; load average {load()} at the start", flush=True)
        local_report, ray_report = Path(tmp) / "local.json", Path(tmp) / "ray.json"
        local_code, local_s = timed_scan(folder, args.data, policy, local_report)
        print(f"local: exit {local_code}, {local_s:.1f} s; load average {load()}", flush=True)
        start = time.perf_counter()
        # workers at the driver's priority, as the CLI's own local cluster runs them (Ray's
        # default adds 15 to their niceness: on a busy machine that measures the
        # scheduler, not Ray)
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        ray_start = time.perf_counter() - start
        try:
            ray_code, ray_s = timed_scan(folder, args.data, policy, ray_report,
                                         "--executor", "ray")
        finally:
            ray.shutdown()
        print(f"ray: exit {ray_code}, {ray_s:.1f} s (+{ray_start:.1f} s cluster start); "
              f"load average {load()}", flush=True)
        local, on_ray = outcome(local_report), outcome(ray_report)
    same = {name: local[name][:3] == on_ray.get(name, (None,))[:3] for name in local}
    retried = sum(v[3] > 1 for v in on_ray.values())
    for name, ok in same.items():
        if not ok:
            print(f"  differs: {name}: local {local[name][:3]}, ray {on_ray.get(name)}")
    print()
    print("| models | verdicts, targets and channels equal | exit code local / ray | "
          "wall s local | wall s Ray (2 CPUs) | Ray cluster start s | ratio local / Ray |")
    print("|---:|---|---|---:|---:|---:|---:|")
    print(f"| {len(local)} | {'y' if all(same.values()) else 'n'} "
          f"({sum(same.values())}/{len(same)}) | {local_code} / {ray_code} | {local_s:.0f} | "
          f"{ray_s:.0f} | {ray_start:.0f} | {local_s / ray_s:.2f}x |")
    if retried:
        print(f"{retried} Ray task(s) re-run after a lost worker")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "samples" / "models")
    ap.add_argument("--data", type=Path, default=ROOT / "samples" / "data" / "fewshot.npz")
    ap.add_argument("--copies", type=int, default=1,
                    help="scan each model this many times under different names")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--policy", default="default")
    ap.add_argument("--quick", action="store_true", help="scan with QUICK_POLICY")
    ap.add_argument("--only", default=None, help="comma-separated model stems to scan")
    return ap.parse_args()


if __name__ == "__main__":
    run(parse())
