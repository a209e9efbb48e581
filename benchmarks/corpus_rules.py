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

from corpus import (  # noqa: E402
    CLASS_FIELDS,
    manifest,
    result_path,
    roc_auc,
    tpr_at_fpr,
    usable_model,
)

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
    out["warp_isolation"] = isolation(col["warp_norm"])
    out["warp_ratio"] = np.median(col["warp_norm"]) / np.maximum(col["warp_norm"], 1e-12)
    if "max_margin" in col and np.isfinite(col["max_margin"]).all():
        out["margin"] = high_index(col["max_margin"])
    for fam in ("patch", "universal", "warp"):
        key = f"{fam}_concentration"
        if key in col and np.isfinite(col[key]).all():
            out[f"conc_{fam}"] = high_index(col[key])
        key = f"{fam}_selectivity"
        if key in col and np.isfinite(col[key]).all():
            out[f"sel_{fam}"] = col[key]  # a log ratio: comparable across models as it is
    return out


Rule = Callable[[dict[str, np.ndarray]], np.ndarray]

# statistic sets for logistic rules fitted on the calibration half (class_stats names)
LOGISTIC = [
    ["combined", "isolation", "warp"],
    ["combined", "isolation", "warp", "margin"],
    ["combined", "isolation", "warp", "sel_patch", "sel_universal"],
    ["combined", "isolation", "warp", "margin", "sel_patch", "sel_universal",
     "conc_patch"],
]

def shipped_tests(s: dict[str, np.ndarray], combined: np.ndarray | None = None,
                  threshold: float = 2.5, warn: float = 2.0, cut: float = 1.0,
                  warp_ratio: float = 4.0) -> np.ndarray:
    """detect.class_scores from the raw statistics: the largest of combined / threshold,
    the patch test and the warp test, each as a ratio to its cut (above 1 = flagged);
    `combined` replaces the combined index when given."""
    comb = s["combined"] if combined is None else combined
    patch = np.minimum(s["patch"] / warn, s["isolation"] / cut)
    warp = np.minimum.reduce([s["warp"] / threshold, s["warp_isolation"] / cut,
                              s["warp_ratio"] / warp_ratio])
    return np.maximum.reduce([comb / threshold, patch, warp])


def with_margin(weight: float) -> Rule:
    """detect.class_scores with the MM-BD margin term (before the cut)."""
    return lambda s: shipped_tests(s) + weight * s["margin"]


def selectivity(s: dict[str, np.ndarray]) -> np.ndarray:
    """Mean of the patch and full-image triggers' selectivity (a log ratio)."""
    return (s["sel_patch"] + s["sel_universal"]) / 2


def with_selectivity(weight: float) -> Rule:
    return lambda s: shipped_tests(s) + weight * selectivity(s)


def vetoed(floor: float) -> Rule:
    """The norm tests, with a class whose selectivity is below `floor` never flagged."""
    return lambda s: np.where(selectivity(s) < floor, 0.0, shipped_tests(s))


def gated_margin(s: dict[str, np.ndarray], gate: float) -> np.ndarray:
    """The MM-BD margin index where the class's triggers are selective (> gate), else 0:
    an honest class that is easy to push far above the others (a big margin) is also one
    whose triggers are made of its own features (negative selectivity)."""
    return np.where(selectivity(s) > gate, np.maximum(s["margin"], 0.0), 0.0)


def veto_and_margin_rule(floor: float, gate: float, calibration: list[tuple[dict, dict]]
                         ) -> Rule:
    """max(norm tests vetoed below selectivity `floor`, gated margin / M), M fitted on the
    calibration half: the largest gated margin of any class of a clean calibration model
    (so the margin term alone flags none of them), plus 10 %."""
    scale = margin_scale(gate, calibration)
    return lambda s: np.maximum(vetoed(floor)(s), gated_margin(s, gate) / scale)


def leave_one_out_fpr(floor: float, gate: float, calibration: list[tuple[dict, dict]]
                      ) -> float:
    """The margin scale is fitted to the largest clean calibration margin, so its FPR on
    calibration is 0 by construction. Fitted without each clean model in turn, how often
    is that model flagged? (Calibration data only: this is how the margin test is judged
    before the validation half is looked at.)"""
    clean = [(e, r) for e, r in calibration if not e["attack"]]
    hits = 0
    for i, (_, record) in enumerate(clean):
        rule = veto_and_margin_rule(floor, gate, [p for j, p in enumerate(clean) if j != i])
        hits += float(np.max(rule(class_stats(record)))) > 1.0
    return hits / max(1, len(clean))


def margin_scale(gate: float, calibration: list[tuple[dict, dict]]) -> float:
    """1.1 x the largest gated margin index of any class of a clean calibration model."""
    clean = [gated_margin(class_stats(r), gate).max() for e, r in calibration
             if not e["attack"]]
    return 1.1 * max(clean, default=1.0)


SHIPPED = "shipped tests (norms)"  # the default policy's rule: its cut is 1, not fitted

RULES: dict[str, Rule] = {
    SHIPPED: shipped_tests,
    "shipped tests, combined := (combined + margin) / 2":
        lambda s: shipped_tests(s, (s["combined"] + s["margin"]) / 2),
    "shipped tests, every test x min(1, margin / 2)":
        lambda s: shipped_tests(s) * np.clip(s["margin"] / 2, 0, 1),
    **{f"shipped tests + {w:g} x margin": with_margin(w) for w in (0.1, 0.2, 0.3, 0.4, 0.6)},
    **{f"shipped tests + {w:g} x selectivity": with_selectivity(w)
       for w in (0.1, 0.2, 0.3, 0.5)},
    **{f"shipped tests, 0 where selectivity < {v:g}": vetoed(v) for v in (-1.0, -0.5, -0.3, 0.0)},
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
    "selectivity (patch, universal mean)": lambda s: (s["sel_patch"] + s["sel_universal"]) / 2,
    "norms + selectivity": lambda s: s["combined"] + (s["sel_patch"] + s["sel_universal"]) / 2,
}


def class_rows(scans: list[tuple[dict, dict]], names: list[str]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per class of every scan: the named statistics, and 1 for a backdoor's true target."""
    xs, ys = [], []
    for entry, record in scans:
        stats = class_stats(record)
        if any(n not in stats for n in names):
            continue
        xs.append(np.stack([stats[n] for n in names], 1))
        y = np.zeros(len(xs[-1]))
        if entry["attack"]:
            y[entry["target"]] = 1.0
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 3000
                 ) -> np.ndarray:
    """L2-penalised logistic regression by gradient descent (weights, bias last); the
    positives are weighted up to balance them with the many honest classes."""
    xb = np.c_[np.clip(x, -20, 20), np.ones(len(x))]
    w = np.zeros(xb.shape[1])
    weight = np.where(y > 0, (y == 0).sum() / max(1, (y > 0).sum()), 1.0)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-xb @ w))
        grad = xb.T @ (weight * (p - y)) / weight.sum() + l2 * np.r_[w[:-1], 0] / len(x)
        w -= 0.5 * grad
    return w


def logistic_rule(names: list[str], calibration: list[tuple[dict, dict]]) -> Rule:
    """A rule fitted on the calibration half only: the per-class logit of a logistic
    regression on `names`."""
    x, y = class_rows(calibration, names)
    w = fit_logistic(x, y)
    return lambda s: np.c_[np.clip(np.stack([s[n] for n in names], 1), -20, 20),
                           np.ones(len(s[names[0]]))] @ w


def scores(rule: Rule, scans: list[tuple[dict, dict]]
           ) -> tuple[list[float], list[float], int, int] | None:
    """(backdoored models' scores, clean models' scores, right targets, backdoored) under
    `rule`; None when a scan lacks a statistic the rule reads."""
    pos, neg, right = [], [], 0
    for entry, record in scans:
        try:
            values = rule(class_stats(record))
        except KeyError:
            return None
        if entry["attack"]:
            pos.append(float(np.max(values)))
            right += int(np.argmax(values)) == entry["target"]
        else:
            neg.append(float(np.max(values)))
    return pos, neg, right, len(pos)


def choose_threshold(pos: list[float], neg: list[float], max_fpr: float = 0.05) -> float:
    """The cut a rule gets on the calibration half: the lowest that keeps FPR <= max_fpr
    (flag score > cut), halfway to the next score below so it is not fitted to a point."""
    ranked = sorted(set(pos) | set(neg), reverse=True)
    cut = ranked[0] if ranked else 0.0
    for i, t in enumerate(ranked):
        if sum(n >= t for n in neg) / max(1, len(neg)) > max_fpr:
            break
        below = ranked[i + 1] if i + 1 < len(ranked) else t - 1.0
        cut = (t + below) / 2
    return cut


def evaluate(rule: Rule, scans: list[tuple[dict, dict]], cut: float) -> tuple[str, ...]:
    got = scores(rule, scans)
    if got is None or not (got[0] or got[1]):
        return ("-",) * 5
    pos, neg, right, n_pos = got
    auc, tpr5 = roc_auc(pos, neg), tpr_at_fpr(pos, neg)
    tpr = sum(p > cut for p in pos) / len(pos) if pos else None
    fpr = sum(n > cut for n in neg) / len(neg) if neg else None
    return (f"{auc:.3f}" if auc is not None else "-",
            f"{100 * tpr5:.0f} %" if tpr5 is not None else "-",
            "-" if tpr is None else f"{100 * tpr:.0f} %",
            "-" if fpr is None else f"{100 * fpr:.0f} %",
            f"{right}/{n_pos}" if n_pos else "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="fewshot")
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    scans: dict[str, list[tuple[dict, dict]]] = {"calibration": [], "validation": []}
    for e in manifest():
        if not usable_model(e):
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
    print("| rule | cut (from cal.) | cal. ROC-AUC | cal. TPR @ FPR<=5 % | cal. TPR at the "
          "cut | cal. FPR at the cut | cal. right target | val. ROC-AUC | val. TPR @ FPR<=5 % "
          "| val. TPR at the cut | val. FPR at the cut | val. right target |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rules = dict(RULES)
    for names in LOGISTIC:
        try:
            rules["logistic: " + ", ".join(names)] = logistic_rule(names,
                                                                   scans["calibration"])
        except ValueError:  # no scan has every statistic yet
            continue
    fixed_cut = {SHIPPED}
    for floor in (-1.0, -0.5, -0.3, 0.0):  # the norm tests at their own cut, vetoed
        name = f"shipped tests at cut 1, 0 where selectivity < {floor:g}"
        rules[name] = vetoed(floor)
        fixed_cut.add(name)
    for floor in (-0.5, -0.3, 0.0):
        for gate in (0.0, 0.5):
            name = (f"veto below selectivity {floor:g}, margin gated at selectivity > "
                    f"{gate:g} (scale {margin_scale(gate, scans['calibration']):.2f}; "
                    f"cal. leave-one-out FPR "
                    f"{100 * leave_one_out_fpr(floor, gate, scans['calibration']):.0f} %)")
            try:
                rules[name] = veto_and_margin_rule(floor, gate, scans["calibration"])
            except KeyError:
                continue
            fixed_cut.add(name)
    for name, rule in rules.items():
        got = scores(rule, scans["calibration"])
        if got is None:
            continue
        cut = 1.0 if name in fixed_cut else choose_threshold(got[0], got[1])
        print(f"| {name} | {cut:.2f} | " + " | ".join(
            evaluate(rule, scans["calibration"], cut)
            + evaluate(rule, scans["validation"], cut)) + " |")


if __name__ == "__main__":
    main()
