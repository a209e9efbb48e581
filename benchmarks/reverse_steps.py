"""How the few-shot verdict depends on the trigger-reverse step budget, in one run per seed.

    python benchmarks/reverse_steps.py                       # seeds 0,1,2, every zoo model
    python benchmarks/reverse_steps.py --seeds 0 --models cnn_clean,resnet_blended

A few-shot scan reverses triggers on the clean images (the first view) and, when those flag
no class, again on inputs synthesised from the model (the second view), 120 and 50 steps
by default (policy keys `detection.reverse_steps` and `detection.second_view_steps`); a
class the second view flags then has its trigger refined alone, which does not change the
verdict. This script runs
both views once per model and seed, always including the second view, keeping the
triggers as they stood after each step in `--steps` (`reverse_triggers(snapshots=...)`:
exactly what a run of that many steps returns). It then draws the scan's verdict for every
pair (first-view steps, second-view steps) with the policy's rules, as `scanner.api.scan`
does, and prints:

* how many (model, seed) verdicts are right for each pair;
* the seconds that pair would cost a model that both views find clean (the cost the
  reverse + detect goal of issue #5 is about), from this run's per-step times of the
  cheapest clean model;
* per model and seed, the second view's decision score at the class the first view
  (full budget) came closest to flagging, at each step count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import FEWSHOT, zoo_models  # noqa: E402

STEPS = (40, 50, 60, 75, 90, 100, 110, 120, 135, 150)


def views(path: Path, seed: int, steps: tuple[int, ...]) -> dict:
    """Both views' verdict inputs at every step count, and what each view cost."""
    from scanner.api import _clean_images, model_preprocess
    from scanner.autodiff import GradientProgram
    from scanner.detect import class_scores, detect, most_suspicious
    from scanner.graph.load import load_model
    from scanner.policy import load_policy
    from scanner.reverse import ReverseConfig, reverse_triggers, synthesize

    det = load_policy("default").detection
    model = load_model(path)
    prep = model_preprocess(model)
    program = GradientProgram(model.runnable)
    cfg = ReverseConfig(steps=max(steps))
    images = _clean_images(FEWSHOT, prep, 10, det)

    def run(pixels, synthetic: bool, bn_layers: int) -> tuple[dict, float]:
        t = time.perf_counter()
        result = reverse_triggers(program, prep, pixels, 10, cfg, seed, snapshots=set(steps))
        seconds = (time.perf_counter() - t) / result.steps
        final, out = result.triggers, {}
        for k in steps:
            # a run that stopped early (converged) returns its final triggers for longer budgets
            result.triggers = result.snapshots.get(k, final)
            v = detect(result, det.anomaly_threshold, det.warn_threshold,
                       det.isolation_threshold, synthetic, bn_layers, det.warp_ratio)
            out[k] = (v.detection.flagged_targets,
                      most_suspicious(v.detection, det.warn_threshold,
                                      det.isolation_threshold, det.warp_ratio),
                      class_scores(v.detection.classes, det.anomaly_threshold,
                                   det.warn_threshold, det.isolation_threshold,
                                   det.warp_ratio))
        return out, seconds

    first, first_step = run(images, False, 0)
    rec = {"first": first, "first_step": first_step, "second": None}
    if program.bn_layers and det.synthesised_view:
        t = time.perf_counter()
        synthetic, bn_layers = synthesize(GradientProgram(model.runnable, bn_stats=True), prep,
                                          10, seed=seed)
        rec["synthesis"] = time.perf_counter() - t
        rec["second"], rec["second_step"] = run(synthetic, True, bn_layers)
    return rec


def verdict(rec: dict, k1: int, k2: int) -> list[int]:
    flagged, top, _ = rec["first"][k1]
    if flagged or rec["second"] is None:
        return flagged
    return [top] if top in rec["second"][k2][0] else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)),
                        help="step counts to evaluate (the largest is run)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = tuple(sorted(int(s) for s in args.steps.split(",")))
    zoo = zoo_models()
    if args.models:
        wanted = set(args.models.split(","))
        zoo = [m for m in zoo if m.name in wanted]
    runs = []
    for seed in seeds:
        for zm in zoo:
            rec = views(zm.path, seed, steps)
            runs.append((zm, seed, rec))
            print(f"{zm.name} seed {seed}: first view {rec['first_step']:.3f} s/step, "
                  f"second {rec.get('second_step', 0):.3f} s/step", file=sys.stderr, flush=True)

    def right(zm, rec, k1, k2) -> bool:
        v = verdict(rec, k1, k2)
        return v == [] if zm.target is None else bool(v) and v[0] == zm.target

    # cost of a model both views find clean, from the cheapest clean model's step times
    clean = [rec for zm, _, rec in runs if zm.target is None and rec["second"] is not None]
    cheap = min(clean, key=lambda r: r["first_step"] + r["second_step"]) if clean else None
    print(f"\nRight verdicts of {len(runs)} (models x seeds {seeds}); rows: first-view steps, "
          "columns: second-view steps")
    print("| first \\ second | " + " | ".join(map(str, steps)) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for k1 in steps:
        cells = [str(sum(right(zm, rec, k1, k2) for zm, _, rec in runs)) for k2 in steps]
        print(f"| {k1} | " + " | ".join(cells) + " |")
    if cheap is not None:
        print("\nSeconds a clean model's reverse + detect would take (this run's step times, "
              f"synthesis {cheap['synthesis']:.1f} s)")
        print("| first \\ second | " + " | ".join(map(str, steps)) + " |")
        print("|---" * (len(steps) + 1) + "|")
        first, second = cheap["first_step"], cheap["second_step"]
        for k1 in steps:
            cells = [f"{k1 * first + cheap['synthesis'] + k2 * second:.0f}" for k2 in steps]
            print(f"| {k1} | " + " | ".join(cells) + " |")
    full = max(steps)
    print(f"\nSecond view's decision score at the class the first view ({full} steps) came "
          "closest to flagging (above 1 flags); verdict at full budget")
    print("| model | seed | " + " | ".join(map(str, steps)) + " | verdict |")
    print("|---|---" + "|---:" * len(steps) + "|---|")
    for zm, seed, rec in runs:
        top = rec["first"][full][1]
        if rec["second"] is None or top is None:
            cells = ["-"] * len(steps)
        else:
            cells = [f"{rec['second'][k][2].get(top, -np.inf):.2f}" for k in steps]
        v = verdict(rec, full, full)
        mark = "right" if right(zm, rec, full, full) else "**wrong**"
        print(f"| {zm.name} | {seed} | " + " | ".join(cells) + f" | {v or '-'} {mark} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
