"""Detection over the sample zoo: verdict, target and anomaly index per model, ROC-AUC.

    python benchmarks/detection.py                 # few-shot (1 image per class)
    python benchmarks/detection.py --data-free     # inputs synthesised from the model
    python benchmarks/detection.py --models cnn_clean,cnn_badnets

Runs the scan's first two stages (trigger reverse, detection) exactly as `shapscan scan`
does, with the default policy, and prints a markdown table. Score for the ROC:
`scanner.detect.score`, how far the most suspicious class goes past the decision rule
(a ratio; above 1 = flagged), so it sees all three tests (combined, patch, warp).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scanner.api import model_preprocess  # noqa: E402
from scanner.autodiff import GradientProgram  # noqa: E402
from scanner.data import load_images  # noqa: E402
from scanner.detect import detect, score  # noqa: E402
from scanner.graph.load import load_model  # noqa: E402
from scanner.policy import load_policy  # noqa: E402
from scanner.reverse import reverse_triggers, synthesize  # noqa: E402


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
    ap.add_argument("--policy", default="default")
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
    for entry in zoo:
        model = load_model(ROOT / "samples" / entry["model"])
        prep = model_preprocess(model)
        start = time.perf_counter()
        program = GradientProgram(model.proto, bn_stats=args.data_free)
        if args.data_free:
            images, _ = synthesize(program, prep, 10, seed=args.seed)
        else:
            images = load_images(ROOT / "samples" / "data" / "fewshot.npz", prep)
        result = reverse_triggers(program, prep, images, 10, seed=args.seed)
        d = policy.detection
        verdict = detect(result, d.anomaly_threshold, d.warn_threshold, d.isolation_threshold,
                         args.data_free, program.bn_layers)
        seconds = time.perf_counter() - start
        det = verdict.detection
        s = score(det, d.warn_threshold, d.isolation_threshold)
        target = entry["target"]
        flagged = det.flagged_targets
        # the strongest flagged class must be the target (extra classes are shown)
        correct = (flagged[:1] == [target]) if target is not None else not flagged
        by_class = {c.target: c for c in det.classes}
        at_target = f"{by_class[target].anomaly_index:.2f}" if target is not None else "-"
        rows.append((entry["name"], entry["attack"] or "clean",
                     "-" if target is None else str(target), ",".join(map(str, flagged)) or "-",
                     f"{s:.2f}", at_target, "yes" if correct else "NO", f"{seconds:.0f}"))
        scores.append(s)
        positive.append(target is not None)
        dump[entry["name"]] = {"target": target, "norms": {
            fam: [result.triggers[(fam, t)].norm for t in range(10)]
            for fam in sorted({f for f, _ in result.triggers})}}
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    if args.dump:
        args.dump.write_text(json.dumps(dump, indent=1))
    mode = "data-free" if args.data_free else "few-shot (1 image/class)"
    header = ("model", "attack", "target", "flagged", "decision score", "index at target",
              "correct", "seconds")
    print(f"\nDetection, {mode}, policy {policy.name} "
          f"(threshold {policy.detection.anomaly_threshold:g})\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    correct = sum(r[6] == "yes" for r in rows)
    print(f"\n{correct}/{len(rows)} correct; ROC-AUC (decision score) = "
          f"{roc_auc(scores, positive):.3f}; mean {np.mean([float(r[7]) for r in rows]):.0f} s "
          "per model")


if __name__ == "__main__":
    main()
