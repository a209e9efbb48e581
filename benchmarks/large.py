"""The 1,000-class 224x224 pair (`benchmarks/corpus/make_large.py`: a torchvision
MobileNetV2, width 0.5, trained on shapes drawn at 224x224; the same model with a BadNets
patch planted by fine-tuning), each scanned by the real `shapscan scan` in its own
process, few-shot (1 image per class: 1,000 images) and data-free: verdict, flagged
classes, whether the fast plan was taken (SS212), seconds, peak RSS and each stage's
share of the time.

    python benchmarks/corpus/make_large.py --data     # draw the few-shot set (150 MB, cached)
    python benchmarks/large.py                        # detection only, max_minutes = 30
    python benchmarks/large.py --modes fewshot --repair

Detection only by default (`[repair] enabled = false`): at 224x224 the repair would run
for hours on 2 cores (with it on, --repair, it is stopped at max_minutes: SS306).
`min_clean_accuracy = 0.3`: the models read under half of their few-shot images right.
Reports go to --out (default: a temporary folder) as MODEL.MODE.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benchmarks" / "corpus"
sys.path.insert(0, str(ROOT / "benchmarks"))

from light_zoo import timed_scan  # noqa: E402

FEWSHOT = CORPUS / "cache" / "shapes1000_fewshot.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="fewshot,datafree")
    ap.add_argument("--models", default="", help="comma-separated names (default: both)")
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--repair", action="store_true", help="leave the repair on")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not FEWSHOT.is_file():
        sys.exit("no few-shot set: python benchmarks/corpus/make_large.py --data")
    entries = json.loads((CORPUS / "manifest_large.json").read_text())["models"]
    if args.models:
        entries = [e for e in entries if e["name"] in args.models.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="shapscan-large-"))
    out.mkdir(parents=True, exist_ok=True)
    policy = out / "policy.toml"
    # the pair reads 47 % (clean) and 38-45 % (backdoored) of its 1,000 classes right: under
    # the default 0.5 the few-shot scan would stop at SS206
    policy.write_text(f"[detection]\nmax_minutes = {args.max_minutes:g}\n"
                      "min_clean_accuracy = 0.3\n"
                      + ("" if args.repair else "[repair]\nenabled = false\n"))
    print(f"reports in {out}; policy: max_minutes = {args.max_minutes:g}, "
          "min_clean_accuracy = 0.3" + ("" if args.repair else ", repair off") + "\n")
    print("| model | attack (target) | mode | exit | verdict | flagged | plan | seconds | "
          "peak RSS (GB) | share of time per stage |")
    print("|---|---|---|---:|---|---|---|---:|---:|---|")
    for e in entries:
        for mode in args.modes.split(","):
            report = out / f"{e['name']}.{mode}.json"
            data = ["--data", str(FEWSHOT)] if mode == "fewshot" else ["--data-free"]
            code, text, seconds, peak = timed_scan(
                [str(CORPUS / e["model"]), *data, "--policy", str(policy), "--report",
                 str(report), "--quiet"], args.timeout)
            row = _row(report, text)
            target = "clean" if e["target"] is None else f"{e['attack']} ({e['target']})"
            print(f"| {e['name']} | {target} | {mode} | {code} | {row['verdict']} | "
                  f"{row['flagged']} | {row['plan']} | {seconds:.0f} | {peak:.2f} | "
                  f"{row['stages']} |", flush=True)


def _row(report: Path, text: str) -> dict:
    if not report.is_file():
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return {"verdict": (lines[-1][:100] if lines else "no output"), "flagged": "-",
                "plan": "-", "stages": "-"}
    res = json.loads(report.read_text())["results"][0]
    rules = {f["rule_id"] for f in res["findings"]}
    det = res.get("detection") or {}
    timings = {k: v for k, v in res.get("timings", {}).items() if v}
    total = timings.pop("total", None) or sum(timings.values()) or 1.0
    return {"verdict": res["verdict"], "flagged": det.get("flagged_targets", "-"),
            "plan": "fast (SS212)" if "SS212" in rules else
            ("inconclusive (SS210)" if "SS210" in rules else "thorough"),
            "stages": ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in timings.items())}


if __name__ == "__main__":
    main()
