"""Recovery after zeroing on the sample zoo: what fine-tuning buys over zeroing alone.

    python benchmarks/recover.py [--cache DIR] [--models a,b] [--steps N] [--lr X] [--synthesised N]

Per backdoored zoo model (1 clean image per class, samples/data/fewshot.npz):
1. `scanner.api.scan` zeroes channels (the default policy with recovery off, at the channel
   budget the default gives a plan recovery follows) and writes the zeroed model;
2. the triggers are reversed on the few-shot images as the scan does (same seed and step
   budget), every family, for the classes the scan flagged;
3. `scanner.recover.recover` fine-tunes the zeroed model (distillation from the original
   on augmented few-shot images, unlearning the reversed triggers);
4. the same recovery on the original model (fine-tuning alone, no zeroing) as a baseline.
Each model is measured on samples/data/test.npz: clean accuracy, and the ASR of the TRUE
trigger (samples/zoo.json) on test images whose label is not the target. Seconds: the
scan's wall time; recovery's own.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zoo import FEWSHOT, TEST_SET, zoo_models  # noqa: E402

from scanner.recover import RecoverConfig  # noqa: E402

WORST = ("cnn_sig", "cnn_blended", "silunet_trojan", "silunet_wanet", "cnn_badnets",
         "resnet_blended")


@dataclass(frozen=True)
class Subject:
    """A backdoored model and the data it is recovered and measured with."""

    name: str
    path: Path
    attack: str | None
    target: int | None
    params: dict
    fewshot: Path = FEWSHOT
    test: Path = TEST_SET


def zoo_subjects() -> list[Subject]:
    return [Subject(z.name, z.path, z.attack, z.target, z.params) for z in zoo_models()]


def corpus_subjects(split: str) -> list[Subject]:
    """The development corpus's backdoored models of one split (benchmarks/corpus)."""
    root = Path(__file__).resolve().parent.parent
    corpus = Path(__file__).resolve().parent / "corpus"
    entries = json.loads((corpus / "manifest.json").read_text())["models"]
    return [Subject(e["name"], corpus / e["model"], e["attack"], e["target"], e["params"],
                    root / e["fewshot"], root / e["test"])
            for e in entries if e["attack"] and e["split"] == split
            and (corpus / e["model"]).is_file()]


@dataclass
class Row:
    model: str
    stage: str
    acc: float
    asr: float | None
    channels: int
    seconds: float
    target_recall: float | None = None  # the attack target's own test images


def measure(path: Path, s: Subject) -> tuple[float, float | None, float | None]:
    """Clean accuracy, true ASR, and the recall of the target class on clean test images
    (what unlearning towards "not the target" can cost)."""
    from scanner.api import Predictor, batchable, evaluate, model_preprocess
    from scanner.attacks import Attack
    from scanner.data import load_images
    from scanner.graph.load import load_model

    attack = Attack(s.attack, dict(s.params)) if s.attack else None
    result = evaluate(path, s.test, attack, s.target if attack else None)
    recall = None
    if s.target is not None:
        model = load_model(path)
        prep = model_preprocess(model)
        batchable(model, prep)
        data = load_images(s.test, prep)
        own = data.labels == s.target
        recall = float((Predictor(model, prep, "cpu")(data.pixels[own]).argmax(1)
                        == s.target).mean())
    return result.clean_acc, result.asr, recall


def triggers_for(model_path: Path, fewshot: Path, targets: list[int], steps: int) -> list:
    from scanner.api import batchable, model_preprocess
    from scanner.autodiff import GradientProgram
    from scanner.data import load_images
    from scanner.graph.load import load_model
    from scanner.reverse import ReverseConfig, reverse_triggers

    loaded = load_model(model_path)
    prep = model_preprocess(loaded)
    batchable(loaded, prep)
    images = load_images(fewshot, prep)
    program = GradientProgram(loaded.runnable)
    n_classes = int(images.labels.max()) + 1
    rev = reverse_triggers(program, prep, images, n_classes, ReverseConfig(steps=steps),
                           seed=0, targets=targets)
    return [t for (_, target), t in rev.triggers.items() if target in targets]


def zeroed_and_triggers(zm: Subject, cache: Path, repair_set: tuple[str, ...] = ()
                        ) -> tuple[Path, dict, list]:
    """The scan's zeroed model and the reversed triggers of its flagged classes, cached
    per model (so recovery settings can be compared without re-scanning)."""
    from scanner.api import ScanOptions, scan
    from scanner.policy import load_policy

    out, meta_path, trig_path = (cache / f"{zm.name}.zeroed.onnx", cache / f"{zm.name}.json",
                                 cache / f"{zm.name}.triggers.pkl")
    if meta_path.is_file():
        return out, json.loads(meta_path.read_text()), pickle.loads(trig_path.read_bytes())
    # the zeroed model is wanted even when the plan missed its target (keep_incomplete);
    # the re-scan does not change it and is skipped
    policy = cache / "no-rescan.toml"
    # zeroed at the budget the default gives a plan that recovery follows, then recovered
    # here (not by the scan), so that settings can be compared on the same zeroed model
    budget = load_policy("default").repair.recover.max_channel_fraction
    policy.write_text(f'extends = "default"\n[repair]\nrescan = false\n'
                      f'max_channel_fraction = {budget}\n' + "".join(
                          f"{kv}\n" for kv in repair_set) + '[repair.recover]\nenabled = false\n')
    t = time.perf_counter()
    result = scan(zm.path, ScanOptions(data=zm.fewshot, out=out, quiet=True, policy=policy,
                                       keep_incomplete=True))
    meta = {"seconds": time.perf_counter() - t,
            "flagged": [int(c) for c in (result.detection.flagged_targets
                                         if result.detection else [])],
            "channels": len(result.repair.pruned) if result.repair and out.is_file() else 0}
    trigs = triggers_for(zm.path, zm.fewshot, meta["flagged"], load_policy("default").detection
                         .reverse_steps) if meta["flagged"] else []
    trig_path.write_bytes(pickle.dumps(trigs))
    meta_path.write_text(json.dumps(meta))
    return out, meta, trigs


def run_model(zm: Subject, cache: Path, args: argparse.Namespace, log) -> list[Row]:
    from scanner.api import batchable, model_preprocess
    from scanner.data import load_images
    from scanner.graph.load import load_model
    from scanner.recover import RecoverConfig, recover

    rows = []
    acc, asr, recall = measure(zm.path, zm)
    rows.append(Row(zm.name, "original", acc, asr, 0, 0.0, recall))
    log(rows[-1])
    out, meta, trigs = zeroed_and_triggers(zm, cache, tuple(args.repair_set))
    zeroed_path = out if out.is_file() else zm.path
    acc, asr, recall = measure(zeroed_path, zm)
    rows.append(Row(zm.name, "zeroed", acc, asr, meta["channels"], meta["seconds"], recall))
    log(rows[-1])
    if not meta["flagged"] or args.steps == 0:  # --steps 0: fill the cache only
        return rows
    loaded = load_model(zm.path)
    prep = model_preprocess(loaded)
    batchable(loaded, prep)  # recovery trains batches, as the scan does on this copy
    zeroed = load_model(zeroed_path)
    batchable(zeroed, prep)
    images = load_images(zm.fewshot, prep)
    cfg = replace(RecoverConfig(), steps=args.steps, lr=args.lr,
                  label_weight=args.label_weight, temperature=args.temperature,
                  adversarial_share=args.adversarial, unlearn_weight=args.unlearn_weight,
                  flagged_mass=args.flagged_mass,
                  flagged_share=args.flagged_share, flagged_cap=args.flagged_cap,
                  ops=tuple(args.params.split(",")) if args.params else RecoverConfig.ops)
    synth = None
    if args.synthesised:
        from scanner.autodiff import GradientProgram
        from scanner.reverse import SynthesisConfig, synthesize
        program = GradientProgram(loaded.runnable, bn_stats=True)
        synth = synthesize(program, prep, int(images.labels.max()) + 1,
                           SynthesisConfig(per_class=args.synthesised))[0]
    stages = [] if args.finetune_only else [
        ("zeroed+recovered", zeroed.runnable, meta["channels"])]
    if args.finetune_alone or args.finetune_only:
        stages.append(("fine-tuned alone", loaded.runnable, 0))
    for stage, start, n in stages:
        res = recover(loaded.runnable, start, prep, images, trigs, cfg,
                      targets=meta["flagged"], synthesised=synth)
        path = cache / f"{zm.name}.{stage}.{os.getpid()}.onnx"
        onnx.save(res.model, str(path))
        acc, asr, recall = measure(path, zm)
        rows.append(Row(zm.name, stage, acc, asr, n, res.seconds, recall))
        log(rows[-1], f"loss {res.loss_first:.3f} -> {res.loss_last:.3f}")
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def fmt(row: Row) -> str:
    return (f"| {row.model} | {row.stage} | {100 * row.acc:.1f} | {_pct(row.asr)} | "
            f"{_pct(row.target_recall)} | {row.channels} | {row.seconds:.1f} |")


def summary(rows: list[Row]) -> str:
    """Per stage: median and worst drop (points) and true ASR over the models it ran on."""
    import numpy as np

    base = {r.model: r for r in rows if r.stage == "original"}
    lines = ["| stage | models | drop median / worst | ASR median / worst | "
             "target recall drop median / worst |", "|---|---:|---:|---:|---:|"]
    for stage in dict.fromkeys(r.stage for r in rows if r.stage != "original"):
        got = [r for r in rows if r.stage == stage]
        drop = [100 * (base[r.model].acc - r.acc) for r in got]
        asr = [100 * (r.asr or 0.0) for r in got]
        rec = [100 * (base[r.model].target_recall - r.target_recall) for r in got
               if r.target_recall is not None and base[r.model].target_recall is not None]
        lines.append(f"| {stage} | {len(got)} | {np.median(drop):.1f} / {max(drop):.1f} | "
                     f"{np.median(asr):.1f} / {max(asr):.1f} | "
                     + (f"{np.median(rec):.1f} / {max(rec):.1f} |" if rec else "- |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(WORST),
                        help="comma-separated names (prefixes with --corpus)")
    parser.add_argument("--corpus", choices=("calibration", "validation"),
                        help="the development corpus's backdoored models of this split "
                        "instead of the sample zoo")
    parser.add_argument("--steps", type=int, default=RecoverConfig.steps)
    parser.add_argument("--lr", type=float, default=RecoverConfig.lr)
    parser.add_argument("--synthesised", type=int, default=0,
                        help="BN-synthesised inputs per class added to the pool")
    parser.add_argument("--label-weight", type=float, default=RecoverConfig.label_weight)
    parser.add_argument("--temperature", type=float, default=RecoverConfig.temperature)
    parser.add_argument("--unlearn-weight", type=float, default=RecoverConfig.unlearn_weight)
    parser.add_argument("--flagged-mass", type=float, default=RecoverConfig.flagged_mass,
                        help="share of the flagged classes' predicted mass kept on rows of "
                        "other classes")
    parser.add_argument("--flagged-cap", action="store_true",
                        help="cap the flagged classes' mass at the un-augmented images' first")
    parser.add_argument("--flagged-share", type=float, default=RecoverConfig.flagged_share,
                        help="share of each batch made from the flagged classes' images")
    parser.add_argument("--params", help="comma-separated op types whose parameters train "
                        "(default: all of RecoverConfig.ops)")
    parser.add_argument("--adversarial", type=float, default=RecoverConfig.adversarial_share,
                        help="share of each batch stamped with the adversarial perturbation")
    parser.add_argument("--no-finetune-alone", dest="finetune_alone", action="store_false")
    parser.add_argument("--finetune-only", action="store_true",
                        help="only the fine-tuning-alone baseline (no zeroed+recovered row)")
    parser.add_argument("--repair-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [repair] policy setting for the zeroing scan (repeatable); "
                        "give each its own --cache")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the zeroed models and reversed triggers here between runs")
    args = parser.parse_args(argv)
    wanted = [m.strip() for m in args.models.split(",")]
    if args.corpus:
        models = [m for m in corpus_subjects(args.corpus)
                  if any(m.name.startswith(w) for w in wanted)]
    else:
        models = [m for m in zoo_subjects() if m.name in wanted]
    print("| model | stage | clean acc % | true ASR % | target recall % | channels zeroed | "
          "seconds |\n|---|---|---:|---:|---:|---:|---:|", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="shapscan-recover-") as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for zm in models:
            rows += run_model(zm, cache, args, lambda r, *extra: print(
                fmt(r), *(f"<!-- {e} -->" for e in extra), flush=True))
    print("\n" + summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
