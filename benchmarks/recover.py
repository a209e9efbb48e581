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
import dataclasses
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
from zoo import FEWSHOT, ZooModel, measure, zoo_models  # noqa: E402

from scanner.recover import RecoverConfig  # noqa: E402

WORST = ("cnn_sig", "cnn_blended", "silunet_trojan", "silunet_wanet", "cnn_badnets",
         "resnet_blended")


@dataclass
class Row:
    model: str
    stage: str
    acc: float
    asr: float | None
    channels: int
    seconds: float


def triggers_for(model_path: Path, targets: list[int], steps: int) -> list:
    from scanner.api import model_preprocess
    from scanner.autodiff import GradientProgram
    from scanner.data import load_images
    from scanner.graph.load import load_model
    from scanner.reverse import ReverseConfig, reverse_triggers

    loaded = load_model(model_path)
    prep = model_preprocess(loaded)
    images = load_images(FEWSHOT, prep)
    program = GradientProgram(loaded.runnable)
    n_classes = int(images.labels.max()) + 1
    rev = reverse_triggers(program, prep, images, n_classes, ReverseConfig(steps=steps),
                           seed=0, targets=targets)
    return [t for (_, target), t in rev.triggers.items() if target in targets]


def zeroed_and_triggers(zm: ZooModel, cache: Path) -> tuple[Path, dict, list]:
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
    extra = {"keep_incomplete": True} if "keep_incomplete" in {
        f.name for f in dataclasses.fields(ScanOptions)} else {}
    policy = cache / "no-rescan.toml"
    # zeroed at the budget the default gives a plan that recovery follows, then recovered
    # here (not by the scan), so that settings can be compared on the same zeroed model
    budget = load_policy("default").repair.recover.max_channel_fraction
    policy.write_text(f'extends = "default"\n[repair]\nrescan = false\n'
                      f'max_channel_fraction = {budget}\n[repair.recover]\nenabled = false\n')
    t = time.perf_counter()
    result = scan(zm.path, ScanOptions(data=FEWSHOT, out=out, quiet=True, policy=policy,
                                       **extra))
    meta = {"seconds": time.perf_counter() - t,
            "flagged": [int(c) for c in (result.detection.flagged_targets
                                         if result.detection else [])],
            "channels": len(result.repair.pruned) if result.repair and out.is_file() else 0}
    trigs = triggers_for(zm.path, meta["flagged"], load_policy("default").detection
                         .reverse_steps) if meta["flagged"] else []
    trig_path.write_bytes(pickle.dumps(trigs))
    meta_path.write_text(json.dumps(meta))
    return out, meta, trigs


def run_model(zm: ZooModel, cache: Path, args: argparse.Namespace, log) -> list[Row]:
    from scanner.api import model_preprocess
    from scanner.data import load_images
    from scanner.graph.load import load_model
    from scanner.recover import RecoverConfig, recover

    rows = []
    acc, asr = measure(zm.path, zm)
    rows.append(Row(zm.name, "original", acc, asr, 0, 0.0))
    log(rows[-1])
    out, meta, trigs = zeroed_and_triggers(zm, cache)
    zeroed_path = out if out.is_file() else zm.path
    acc, asr = measure(zeroed_path, zm)
    rows.append(Row(zm.name, "zeroed", acc, asr, meta["channels"], meta["seconds"]))
    log(rows[-1])
    if not meta["flagged"] or args.steps == 0:  # --steps 0: fill the cache only
        return rows
    loaded = load_model(zm.path)
    prep = model_preprocess(loaded)
    images = load_images(FEWSHOT, prep)
    cfg = replace(RecoverConfig(), steps=args.steps, lr=args.lr,
                  label_weight=args.label_weight, temperature=args.temperature,
                  adversarial_share=args.adversarial, unlearn_weight=args.unlearn_weight,
                  ops=tuple(args.params.split(",")) if args.params else RecoverConfig.ops)
    synth = None
    if args.synthesised:
        from scanner.autodiff import GradientProgram
        from scanner.reverse import SynthesisConfig, synthesize
        program = GradientProgram(loaded.runnable, bn_stats=True)
        synth = synthesize(program, prep, 10, SynthesisConfig(per_class=args.synthesised))[0]
    stages = [] if args.finetune_only else [
        ("zeroed+recovered", onnx.load(str(zeroed_path)), meta["channels"])]
    if args.finetune_alone or args.finetune_only:
        stages.append(("fine-tuned alone", loaded.proto, 0))
    for stage, start, n in stages:
        res = recover(loaded.proto, start, prep, images, trigs, cfg,
                      targets=meta["flagged"], synthesised=synth)
        path = cache / f"{zm.name}.{stage}.{os.getpid()}.onnx"
        onnx.save(res.model, str(path))
        acc, asr = measure(path, zm)
        rows.append(Row(zm.name, stage, acc, asr, n, res.seconds))
        log(rows[-1], f"loss {res.loss_first:.3f} -> {res.loss_last:.3f}")
    return rows


def fmt(row: Row) -> str:
    asr = "-" if row.asr is None else f"{100 * row.asr:.1f}"
    return (f"| {row.model} | {row.stage} | {100 * row.acc:.1f} | {asr} | {row.channels} | "
            f"{row.seconds:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(WORST))
    parser.add_argument("--steps", type=int, default=RecoverConfig.steps)
    parser.add_argument("--lr", type=float, default=RecoverConfig.lr)
    parser.add_argument("--synthesised", type=int, default=0,
                        help="BN-synthesised inputs per class added to the pool")
    parser.add_argument("--label-weight", type=float, default=RecoverConfig.label_weight)
    parser.add_argument("--temperature", type=float, default=RecoverConfig.temperature)
    parser.add_argument("--unlearn-weight", type=float, default=RecoverConfig.unlearn_weight)
    parser.add_argument("--params", help="comma-separated op types whose parameters train "
                        "(default: all of RecoverConfig.ops)")
    parser.add_argument("--adversarial", type=float, default=RecoverConfig.adversarial_share,
                        help="share of each batch stamped with the adversarial perturbation")
    parser.add_argument("--no-finetune-alone", dest="finetune_alone", action="store_false")
    parser.add_argument("--finetune-only", action="store_true",
                        help="only the fine-tuning-alone baseline (no zeroed+recovered row)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the zeroed models and reversed triggers here between runs")
    args = parser.parse_args(argv)
    wanted = [m.strip() for m in args.models.split(",")]
    models = [m for m in zoo_models() if m.name in wanted]
    print("| model | stage | clean acc % | true ASR % | channels zeroed | seconds |\n"
          "|---|---|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory(prefix="shapscan-recover-") as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for zm in models:
            run_model(zm, cache, args, lambda r, *extra: print(
                fmt(r), *(f"<!-- {e} -->" for e in extra), flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
