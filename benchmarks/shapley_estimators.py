"""Shapley estimators side by side on one backdoored zoo model, measured in one run.

    python benchmarks/shapley_estimators.py [--model cnn_badnets] [--true-trigger]
        [--permutations 20] [--noise-floor] [--reference-permutations 80]
        [--budget-ratio 3] [--rows plain,threshold,eps-greedy] [--seed-offset K]
        [--save VALUES.npz]
    python benchmarks/shapley_estimators.py --compare A.npz B.npz

The utility is the scan pipeline's: mean target probability of the trigger-stamped few-shot
images (non-target classes, plus shifted copies, the trigger at the scan's gain) with only
the coalition's channels on. The trigger is the reversed one (trigger reverse + detection,
as `scanner.api.scan` does) or, with --true-trigger, the zoo's own trigger. Rows:

* plain: truncated Monte Carlo without discarding (epsilon=1, truncation=0: every
  permutation runs to the last channel) — the reference ranking;
* threshold: discarding threshold only (epsilon=1, truncation=0.1);
* eps-greedy: ε-greedy starts + threshold (epsilon=0.2, truncation=0.1), the default;
* with --noise-floor, plain again with another seed: how far two plain estimates agree;
* with --reference-permutations N, plain with N permutations and another seed: a more
  precise ranking that every row (plain included) is compared with.

Overlaps are |top-k(row) ∩ top-k(reference)| / k, the reference being plain unless
--reference-permutations is given; ratios are plain / row in the same run.

By default every row runs --permutations permutations. With --budget-ratio R the two
speed-up rows instead run as many permutations as fit in 1/R of plain's forward passes
(the question the speed-ups answer: the same ranking for a fraction of the cost).

Long runs are costly (600 permutations of plain: 35–50 min at one thread), so they can
run as separate processes: --save writes every row's values, --seed-offset K draws every
row's permutations with seed + K (the trigger is still reversed with --seed), and
--compare A.npz B.npz prints the overlap of every row saved in A and B with B's plain row,
running nothing (both files must be for the same model, trigger and stamped images: the
script checks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
FEWSHOT = SAMPLES / "data" / "fewshot.npz"


@dataclass(frozen=True)
class Variant:
    name: str
    epsilon: float
    truncation: float
    seed_offset: int = 0


VARIANTS = (Variant("plain", 1.0, 0.0), Variant("threshold", 1.0, 0.1),
            Variant("eps-greedy", 0.2, 0.1))
NOISE_FLOOR = Variant("plain (seed+1)", 1.0, 0.0, seed_offset=1)


@dataclass(frozen=True)
class Trigger:
    source: str  # "true" or "reversed (<family>)"
    target: int
    stamp: object  # Callable[[np.ndarray], np.ndarray] on pixel-space images


def zoo_entry(name: str) -> dict:
    entries = json.loads((SAMPLES / "zoo.json").read_text())
    entry = next((e for e in entries if e["name"] == name), None)
    if entry is None or not (SAMPLES / entry["model"]).is_file():
        sys.exit(f"{name}: not in samples/zoo.json or not built yet")
    if not entry.get("attack"):
        sys.exit(f"{name}: a clean model; pick a backdoored one")
    return entry


def true_trigger(entry: dict) -> Trigger:
    from scanner.attacks import Attack

    attack = Attack(entry["attack"], dict(entry.get("params") or {}))
    return Trigger("true", int(entry["target"]), attack.apply)


def reversed_trigger(model, prep, images, device, seed: int) -> Trigger:
    from scanner.api import Predictor, ScanOptions
    from scanner.autodiff import GradientProgram
    from scanner.detect import detect
    from scanner.policy import Policy
    from scanner.reverse import ReverseConfig, reverse_triggers

    n_classes = int(Predictor(model, prep, device.requested)(images.pixels[:1]).shape[1])
    program = GradientProgram(model.proto, device=device)
    policy = Policy()  # the scan's step budget
    result = reverse_triggers(program, prep, images, n_classes,
                              ReverseConfig(steps=policy.detection.reverse_steps), seed)
    verdict = detect(result, policy.detection.anomaly_threshold,
                     policy.detection.warn_threshold)
    if not verdict.detection.flagged_targets:
        sys.exit("detection flagged no class on this model; use --true-trigger")
    target = verdict.detection.flagged_targets[0]
    trig = verdict.triggers[target]
    # the scan stamps a stronger copy of the minimal reversed trigger (ScanOptions)
    gain = ScanOptions().trigger_gain
    return Trigger(f"reversed ({trig.family}, gain {gain:g})", int(target),
                   lambda pixels: trig.apply(pixels, gain=gain))


def compare(paths: list[Path]) -> int:
    """Overlap of every row saved in the files with the last file's plain row."""
    from scanner.shapley import topk_overlap

    rows, setups = {}, []
    for path in paths:
        if not path.is_file():
            sys.exit(f"{path}: no such file")
        with np.load(path) as saved:
            setups.append(json.loads(str(saved["setup"])))
            rows.update({(path.name, *k.split(";")): saved[k]
                         for k in saved.files if k != "setup"})
    if any(s != setups[0] for s in setups):
        sys.exit(f"not the same model, trigger and images: {setups}")
    ref_key = next((k for k in rows if k[:2] == (paths[-1].name, "plain")), None)
    if ref_key is None:
        sys.exit(f"{paths[-1]}: no plain row saved")
    ref_top = np.argsort(-rows[ref_key], kind="stable")
    print(f"Model {setups[0]['model']}, trigger {setups[0]['trigger']} towards class "
          f"{setups[0]['target']}; reference: {ref_key[0]}'s plain row.")
    print()
    print("| file | estimator | permutations | seed | top-5 overlap | top-10 overlap | "
          "top-20 overlap |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for key, values in rows.items():
        top = np.argsort(-values, kind="stable")
        print(f"| {' | '.join(key)} | " + " | ".join(f"{topk_overlap(top, ref_top, k):.2f}"
                                                   for k in (5, 10, 20)) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn_badnets", help="a backdoored zoo model")
    parser.add_argument("--true-trigger", action="store_true",
                        help="use the zoo's trigger instead of reversing one")
    parser.add_argument("--permutations", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=20, help="ε-greedy head size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-floor", action="store_true",
                        help="also run plain with another seed (plain-vs-plain overlap)")
    parser.add_argument("--budget-ratio", type=float, default=0.0,
                        help="give threshold and eps-greedy 1/R of plain's forward passes")
    parser.add_argument("--reference-permutations", type=int, default=0,
                        help="compare every row with plain run this long (another seed)")
    parser.add_argument("--rows", default=",".join(v.name for v in VARIANTS),
                        help="which of plain, threshold, eps-greedy to run")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="draw every row's permutations with seed + K")
    parser.add_argument("--save", type=Path, help="write every row's values to this .npz")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"),
                        help="overlap of the rows saved in A and B with B's plain; runs nothing")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args.compare)
    asked = set(args.rows.split(","))
    rows = [v for v in VARIANTS if v.name in asked]
    unknown = asked - {v.name for v in VARIANTS}
    if unknown or not rows:
        parser.error(f"--rows: choose from {', '.join(v.name for v in VARIANTS)}")
    if args.budget_ratio and rows[0].name != "plain":
        parser.error("--budget-ratio needs the plain row (its passes set the budget)")

    from scanner.api import model_preprocess
    from scanner.data import load_images, shifted
    from scanner.graph.activations import discover_activations
    from scanner.graph.load import load_model
    from scanner.graph.prefix import CoalitionEvaluator
    from scanner.runtime import resolve_device
    from scanner.shapley import ShapleyConfig, Utility, estimate, topk_overlap

    entry = zoo_entry(args.model)
    device = resolve_device("cpu")
    model = load_model(SAMPLES / entry["model"])
    prep = model_preprocess(model)
    images = load_images(FEWSHOT, prep)
    layers = discover_activations(model.proto)
    t0 = time.perf_counter()
    trigger = true_trigger(entry) if args.true_trigger else \
        reversed_trigger(model, prep, images, device, args.seed)
    reverse_seconds = time.perf_counter() - t0
    others = images.subset(np.flatnonzero(images.labels != trigger.target))
    stamped = trigger.stamp(shifted(others, 4).pixels)  # as scanner.api._repair
    evaluator = CoalitionEvaluator(model.proto, layers, prep.to_model(stamped), device)
    utility = Utility(trigger.target)

    variants = [*rows, NOISE_FLOOR] if args.noise_floor else rows
    reference = Variant(f"reference: plain, {args.reference_permutations} permutations, "
                        "seed+2", 1.0, 0.0, seed_offset=2)
    if args.reference_permutations:
        variants.append(reference)
    results = {}
    seeds = {v.name: args.seed + args.seed_offset + v.seed_offset for v in variants}
    budgeted = {"threshold", "eps-greedy"} if args.budget_ratio else set()
    for v in variants:
        permutations = (args.reference_permutations if v is reference
                        else args.permutations)
        max_passes = None
        if v.name in budgeted:  # plain ran first: its passes set the budget
            max_passes = int(results["plain"].forward_passes / args.budget_ratio)
            permutations = 100 * args.permutations  # the budget ends the run
        cfg = ShapleyConfig(permutations=permutations, epsilon=v.epsilon,
                            top_k=args.top_k, truncation=v.truncation, max_passes=max_passes)
        results[v.name] = estimate(evaluator, utility, cfg, seed=seeds[v.name])
        r = results[v.name]
        print(f"{v.name}: {r.forward_passes} passes, {r.seconds:.1f} s", flush=True)

    if args.save:
        setup = {"model": args.model, "trigger": trigger.source, "target": trigger.target,
                 "seed": args.seed, "stamped": hashlib.sha256(stamped.tobytes()).hexdigest()}
        np.savez(args.save, setup=json.dumps(setup), **{
            f"{name};{r.permutations};{seeds[name]}": r.values for name, r in results.items()})
    plain = results[variants[0].name]  # plain unless --rows leaves it out
    ref = reference if args.reference_permutations else variants[0]
    ref_name = "the reference" if ref is reference else ref.name
    ref_top = results[ref.name].top(max(20, args.top_k))
    print()
    print(f"Model {args.model} ({evaluator.n_channels} channels), trigger {trigger.source} "
          f"towards class {trigger.target} (zoo target {entry['target']}; found in "
          f"{reverse_seconds:.1f} s), {len(stamped)} stamped rows, v(all) = "
          f"{plain.v_all:.3f}, seed {args.seed}; overlaps against {ref_name}.")
    print()
    print("| estimator | ε | truncation | permutations | forward passes | seconds | "
          "mean depth | top-5 overlap | top-10 overlap | top-20 overlap | passes ratio | "
          "speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        r = results[v.name]
        top = r.top(max(20, args.top_k))
        print(f"| {v.name} | {v.epsilon:g} | {v.truncation:g} | {r.permutations} | "
              f"{r.forward_passes} | "
              f"{r.seconds:.1f} | {r.mean_depth:.1f} | {topk_overlap(top, ref_top, 5):.2f} | "
              f"{topk_overlap(top, ref_top, 10):.2f} | {topk_overlap(top, ref_top, 20):.2f} | "
              f"{plain.forward_passes / max(1, r.forward_passes):.1f}x | "
              f"{plain.seconds / max(1e-9, r.seconds):.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
