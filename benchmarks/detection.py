"""Detection over the sample zoo: verdict, target and anomaly index per model, ROC-AUC.

    python benchmarks/detection.py                 # few-shot (1 image per class)
    python benchmarks/detection.py --data-free     # inputs synthesised from the model
    python benchmarks/detection.py --models cnn_clean,cnn_badnets

Runs `scanner.api.scan` with the policy's detection settings and repair switched off:
trigger reverse and detection exactly as `shapscan scan` does them, including the second
view on synthesised inputs when the few-shot images flag nothing. Prints a markdown table.
Score for the ROC: `scanner.detect.score`, how far the most suspicious class goes past the
decision rule (a ratio; above 1 = flagged), so it sees all three tests (combined, patch,
warp); with two views, the larger of their scores (either view flags).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FEWSHOT = ROOT / "samples" / "data" / "fewshot.npz"
sys.path.insert(0, str(ROOT))

from scanner.api import ScanOptions, scan  # noqa: E402
from scanner.policy import BUILTIN_POLICIES, load_policy  # noqa: E402


def roc_auc(scores: list[float], positive: list[bool]) -> float:
    """Probability that a random backdoored model outscores a random clean one (ties ½)."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated zoo entries")
    ap.add_argument("--data-free", action="store_true")
    ap.add_argument("--policy", default="default", choices=BUILTIN_POLICIES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", type=Path, default=None,
                    help="also write every class's trigger norms per model (JSON)")
    args = ap.parse_args()
    policy = load_policy(args.policy)
    zoo = json.loads((ROOT / "samples" / "zoo.json").read_text())
    if args.models:
        wanted = args.models.split(",")
        zoo = [e for e in zoo if e["name"] in wanted]
    rows, scores, positive, dump = [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="shapscan-detection-") as tmp:
        detect_only = Path(tmp) / "detect-only.toml"
        detect_only.write_text(f'extends = "{args.policy}"\n[repair]\nenabled = false\n')
        options = ScanOptions(data=None if args.data_free else FEWSHOT,
                              data_free=args.data_free, policy=detect_only, seed=args.seed,
                              quiet=True)
        for entry in zoo:
            start = time.perf_counter()
            result = scan(ROOT / "samples" / entry["model"], options)
            seconds = time.perf_counter() - start
            det = result.detection
            if det is None:
                sys.exit(f"{entry['name']}: {'; '.join(result.errors + result.skipped)}")
            s = max(det.views.values())
            target = entry["target"]
            flagged = det.flagged_targets
            # the strongest flagged class must be the target (extra classes are shown)
            correct = (flagged[:1] == [target]) if target is not None else not flagged
            by_class = {c.target: c for c in det.classes}
            at_target = f"{by_class[target].anomaly_index:.2f}" if target is not None else "-"
            views = ", ".join(f"{k} {v:.2f}" for k, v in det.views.items())
            rows.append((entry["name"], entry["attack"] or "clean",
                         "-" if target is None else str(target),
                         ",".join(map(str, flagged)) or "-", views, f"{s:.2f}", at_target,
                         "yes" if correct else "NO", f"{seconds:.0f}"))
            scores.append(s)
            positive.append(target is not None)
            dump[entry["name"]] = {"target": target, "views": det.views, "norms": {
                "patch": [c.mask_l1 for c in det.classes],
                "universal": [c.universal_norm for c in det.classes],
                "warp": [c.warp_norm for c in det.classes]}}
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    if args.dump:
        args.dump.write_text(json.dumps(dump, indent=1))
    mode = "data-free" if args.data_free else "few-shot (1 image/class)"
    header = ("model", "attack", "target", "flagged", "views (decision score)",
              "decision score", "index at target", "correct", "seconds")
    print(f"\nDetection, {mode}, policy {policy.name} "
          f"(threshold {policy.detection.anomaly_threshold:g})\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    correct = sum(r[7] == "yes" for r in rows)
    print(f"\n{correct}/{len(rows)} correct; ROC-AUC (decision score) = "
          f"{roc_auc(scores, positive):.3f}; mean {np.mean([float(r[8]) for r in rows]):.0f} s "
          "per model")


if __name__ == "__main__":
    main()
