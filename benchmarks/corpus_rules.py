"""Candidate detection rules scored on the development corpus's saved scans, calibration and
validation side by side: what each piece of evidence buys, and the gap between the half a
rule was chosen on and the half it was not.

    python benchmarks/corpus_rules.py                        # few-shot, seed 0
    python benchmarks/corpus_rules.py --mode datafree --seeds 0,1,2

Reads benchmarks/corpus/results/MODE/seedK/*.json (written by benchmarks/corpus.py: per
class the reversed trigger norms of every family, the concentration of each trigger's
channel support and the MM-BD max margin) and recomputes, per model, the decision score of
each rule from those per-class statistics: no scan runs here. A rule's score per model is
its largest per-class value; ROC-AUC, TPR at FPR <= 5 % (best threshold on that half) and
the right-target rate (the class with the largest value is the true target) per half.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from corpus import CLASS_FIELDS, manifest, result_path, roc_auc, tpr_at_fpr  # noqa: E402

from scanner.detect import anomaly_indices, isolation  # noqa: E402

MAD = 1.4826


def high_index(values: np.ndarray) -> np.ndarray:
    """High-side robust z on the raw scale (margins can be 0 or negative)."""
    v = np.asarray(values, np.float64)
    med = np.median(v)
    mad = MAD * np.median(np.abs(v - med))
    return np.zeros_like(v) if mad <= 1e-12 else (v - med) / mad


def class_stats(record: dict) -> dict[str, np.ndarray]:
    """Per-class statistics of one scan, each an array over classes."""
    fields = record.get("class_fields") or list(CLASS_FIELDS[:4])
    rows = np.array([[np.nan if v is None else v for v in row] for row in record["classes"]],
                    np.float64)
    col = {f: rows[:, i] for i, f in enumerate(fields)}
    out = {"patch": anomaly_indices(col["mask_l1"]),
           "universal": anomaly_indices(col["universal_norm"]),
           "warp": anomaly_indices(col["warp_norm"]),
           "isolation": isolation(col["mask_l1"])}
    out["combined"] = (out["patch"] + out["universal"]) / 2
    if "max_margin" in col and np.isfinite(col["max_margin"]).all():
        out["margin"] = high_index(col["max_margin"])
    for fam in ("patch", "universal", "warp"):
        key = f"{fam}_concentration"
        if key in col and np.isfinite(col[key]).all():
            out[f"conc_{fam}"] = high_index(col[key])
    return out


Rule = Callable[[dict[str, np.ndarray]], np.ndarray]

RULES: dict[str, Rule] = {
    "norms (combined index)": lambda s: s["combined"],
    "norms, best family": lambda s: np.maximum(s["combined"], np.maximum(s["patch"],
                                                                          s["universal"])),
    "max margin": lambda s: s["margin"],
    "concentration (patch)": lambda s: s["conc_patch"],
    "concentration (best)": lambda s: np.maximum.reduce(
        [s["conc_patch"], s["conc_universal"], s["conc_warp"]]),
    "norms + margin": lambda s: (s["combined"] + s["margin"]) / 2,
    "min(norms, margin)": lambda s: np.minimum(s["combined"], s["margin"]),
    "norms + concentration": lambda s: (s["combined"] + s["conc_patch"]) / 2,
    "norms + margin + conc.": lambda s: (s["combined"] + s["margin"] + s["conc_patch"]) / 3,
}


def evaluate(rule: Rule, scans: list[tuple[dict, dict]]) -> tuple[str, ...]:
    pos, neg, right, n_pos = [], [], 0, 0
    for entry, record in scans:
        try:
            values = rule(class_stats(record))
        except KeyError:
            return ("-",) * 3
        score = float(np.max(values))
        if entry["attack"]:
            pos.append(score)
            n_pos += 1
            right += int(np.argmax(values)) == entry["target"]
        else:
            neg.append(score)
    auc, tpr = roc_auc(pos, neg), tpr_at_fpr(pos, neg)
    return (f"{auc:.3f}" if auc is not None else "-",
            f"{100 * tpr:.0f} %" if tpr is not None else "-",
            f"{right}/{n_pos}" if n_pos else "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="fewshot")
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    scans: dict[str, list[tuple[dict, dict]]] = {"calibration": [], "validation": []}
    for e in manifest():
        if e["attack"] and not e.get("implanted"):
            continue
        for seed in (int(s) for s in args.seeds.split(",")):
            path = result_path(e["name"], args.mode, seed, False)
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            if record.get("classes") and "class_fields" in record:
                scans[e["split"]].append((e, record))
    counts = {k: (sum(bool(e["attack"]) for e, _ in v), sum(not e["attack"] for e, _ in v))
              for k, v in scans.items()}
    print(f"### {args.mode}, seeds {args.seeds}: calibration {counts['calibration'][0]} "
          f"backdoored / {counts['calibration'][1]} clean scans, validation "
          f"{counts['validation'][0]} / {counts['validation'][1]}\n")
    print("| rule | cal. ROC-AUC | cal. TPR @ FPR<=5 % | cal. right target (top class) "
          "| val. ROC-AUC | val. TPR @ FPR<=5 % | val. right target |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rule in RULES.items():
        print(f"| {name} | " + " | ".join(evaluate(rule, scans["calibration"])
                                         + evaluate(rule, scans["validation"])) + " |")


if __name__ == "__main__":
    main()
