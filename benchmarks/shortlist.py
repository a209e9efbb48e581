"""The many-class screen on trained 100-class models: the shortlist against every class in
full, on the corpus's 100-class set (`make_corpus.py --many`).

    python benchmarks/shortlist.py --split calibration --reference 16,48
    python benchmarks/shortlist.py --split validation --reference 48 --jobs 2
    python benchmarks/shortlist.py --split calibration --no-full --reference "" --fast default,48

Each model of the split is scanned by the real `shapscan scan` (few-shot, seed 0,
detection only) in its own process, once with every class reversed in full
(`shortlist_over = 0`) and once per reference size with the screen forced
(`shortlist_over = 64`, `shortlist = 16`, `reference_classes = R`), and with --fast once
with the fast plan forced (`DetectionPolicy.fast_plan()`: the label-free sweep, 8 candidates,
16 reference classes, 360 rows a step, synthesis for 24 classes) per --fast reference size
(the rows a step grow with it: 5 images per class). Per run: the
flagged classes, whether the first is the true target, the flags on other classes, the
decision score, the seconds of the reverse stage and its forward passes. Reports go to
--out (default: a temporary folder) as MODE/NAME.json; a report already there is read,
not scanned again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benchmarks" / "corpus"


def scan(entry: dict, mode: str, policy: Path, out: Path) -> dict:
    report = out / mode / f"{entry['name']}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    if not report.is_file():
        cmd = [sys.executable, "-c", "from scanner.cli import run; run()", "scan",
               str(CORPUS / entry["model"]), "--data", str(ROOT / entry["fewshot"]),
               "--policy", str(policy), "--report", str(report), "--quiet"]
        subprocess.run(cmd, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    row = {"name": entry["name"], "mode": mode, "target": entry["target"],
           "attack": entry["attack"] or "clean"}
    if not report.is_file():
        return row | {"error": "no report"}
    res = json.loads(report.read_text())["results"][0]
    det = res.get("detection") or {}
    flagged = det.get("flagged_targets", [])
    score = max((v["decision_score"] for v in det.get("views", [])), default=None)
    return row | {"flagged": flagged, "score": score,
                  "right": bool(flagged) and flagged[0] == entry["target"],
                  "others": [t for t in flagged if t != entry["target"]],
                  "seconds": res["timings"].get("reverse"),
                  "passes": det.get("forward_passes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="calibration", choices=("calibration", "validation"))
    ap.add_argument("--reference", default="16,48", help="reference_classes to try")
    ap.add_argument("--no-full", action="store_true", help="skip every class in full")
    ap.add_argument("--fast", default="", help="reference sizes for the fast plan, forced "
                    "(default: none; 'default' for [detection.fast]'s)")
    ap.add_argument("--models", default="", help="comma-separated names (default: the split)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    entries = [e for e in json.loads((CORPUS / "manifest_many.json").read_text())["models"]
               if e["split"] == args.split
               and (not args.models or e["name"] in args.models.split(","))]
    out = Path(args.out or tempfile.mkdtemp(prefix="shapscan-shortlist-"))
    out.mkdir(parents=True, exist_ok=True)
    modes = {} if args.no_full else {"all in full": "shortlist_over = 0\n"}
    for r in filter(None, args.reference.split(",")):
        modes[f"screen, reference {r}"] = (f"shortlist_over = 64\nshortlist = 16\n"
                                           f"reference_classes = {r}\n")
    for r in filter(None, args.fast.split(",")):
        from dataclasses import replace

        from scanner.policy import DetectionPolicy, FastPlan
        plan = FastPlan() if r == "default" else replace(
            FastPlan(), reference_classes=int(r),
            reverse_rows=FastPlan().reverse_rows * (FastPlan().shortlist + int(r))
            // (FastPlan().shortlist + FastPlan().reference_classes))
        fast = replace(DetectionPolicy(), fast=plan).fast_plan()
        modes[f"fast plan, reference {fast.reference_classes}"] = "".join(
            f"{key} = {getattr(fast, key)!r}\n".replace("'", '"')
            for key in ("screen", "shortlist_over", "shortlist", "reference_classes",
                        "reverse_rows", "synthesised_classes"))
    jobs = []
    for mode, keys in modes.items():
        policy = out / f"{mode.replace(' ', '_').replace(',', '')}.toml"
        policy.write_text(f'extends = "default"\n[detection]\n{keys}[repair]\nenabled = false\n')
        jobs += [(e, mode, policy) for e in entries]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: scan(*job, out), jobs))
    print(f"\n100-class set, {args.split} ({len(entries)} models), few-shot seed 0, detection "
          f"only; reports in {out}\n")
    print("| model | attack (target) | mode | flagged | first is the target | other flags | "
          "decision score | reverse s | forward passes |")
    print("|---|---|---|---|---|---|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["name"], r["mode"])):
        if "error" in r:
            print(f"| {r['name']} | {r['attack']} | {r['mode']} | {r['error']} | | | | | |")
            continue
        target = f" ({r['target']})" if r["target"] is not None else ""
        right = "-" if r["target"] is None else ("y" if r["right"] else "n")
        print(f"| {r['name']} | {r['attack']}{target} | {r['mode']} | {r['flagged'] or '-'} | "
              f"{right} | {len(r['others'])} | {r['score']:.2f} | {r['seconds'] or 0:.0f} | "
              f"{r['passes'] or 0:,} |")


if __name__ == "__main__":
    main()
