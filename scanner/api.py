"""The Python API the CLI wraps: evaluate (red-team metrics) and scan (the gate)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .attacks import Attack
from .autodiff import GradientProgram
from .context import ScanContext, ScanOptions
from .data import ImageSet, Preprocess, load_images, resolve_preprocess
from .detection import (  # noqa: F401  (_refine_trigger, _why_flagged: tests import them here)
    _refine_trigger,
    _why_flagged,
    find_backdoor,
    synthesise_inputs,
)
from .errors import (
    DataError,
    Inconclusive,
    ModelRefused,
    OutOfTime,
    UsageError,
    internal_error,
    out_of_memory,
)
from .estimate import check_time
from .findings import LayerInfo, ScanResult, Verdict
from .graph.activations import discover, discovery_findings
from .graph.batch import any_batch
from .graph.load import LoadedModel, load_model
from .graph.logits import flat_logits
from .graph.quantized import QUANTIZED_HINT, quantized
from .policy import Catalog, DetectionPolicy, Policy, load_catalog, load_policy
from .progress import Progress
from .repair import (  # noqa: F401  (_check_other_targets: tests import it here)
    _check_other_targets,
    finish_repair,
    repair,
)
from .reverse import ReverseConfig
from .runtime import make_session, resolve_device, run_batched

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    clean_acc: float
    asr: float | None
    n_images: int
    n_attack_images: int
    resized: dict[str, int] = field(default_factory=dict)  # --resize: "HxW" -> images


MAX_IMAGE_VALUES = 1 << 22  # C*H*W of one input; every stage runs hundreds of rows at once


def model_preprocess(model: LoadedModel, overrides: dict | None = None) -> Preprocess:
    name, shape = model.image_input()
    inits = {i.name for i in model.analysed.graph.initializer}
    inputs = [i for i in model.analysed.graph.input if i.name not in inits]  # inputs[0]: image
    if len(inputs) > 1:
        raise Inconclusive(f"inconclusive: the model has {len(inputs)} inputs "
                           f"({', '.join(i.name for i in inputs)}); shapscan scans image "
                           "classifiers with one input")
    elem = inputs[0].type.tensor_type.elem_type  # float16 inputs are float32 in the copy
    if elem != onnx.TensorProto.FLOAT:
        raise Inconclusive(f"inconclusive: the image input {name!r} is "
                           f"{onnx.TensorProto.DataType.Name(elem).lower()}; shapscan runs "
                           "models with a float32 image input")
    prep = resolve_preprocess(model.path, model.metadata, shape, overrides)
    if min(prep.height, prep.width) <= 0:
        raise DataError(f"the model's input {name} {shape} does not fix the image height and "
                        f"width: give them as \"height\" and \"width\" in "
                        f"{model.path.stem}.preprocess.json beside the model")
    if prep.channels * prep.height * prep.width > MAX_IMAGE_VALUES:
        raise Inconclusive(f"inconclusive: an input of {prep.channels}x{prep.height}x"
                           f"{prep.width} values is more than shapscan scans "
                           f"({MAX_IMAGE_VALUES:,} per image)")
    return prep


def batchable(model: LoadedModel, prep: Preprocess) -> None:
    """Point `model.runnable` at a copy that takes any batch size (graph.batch) and whose
    first output is [N, classes] (graph.logits)."""
    relaxed = flat_logits(any_batch(model.analysed, prep.input_shape))
    model.batch_free = None if relaxed is model.analysed else relaxed


class Predictor:
    """Logits of the unmodified model for pixel-space images; one session, many calls.
    A scan keeps it from loading to the end and runs it a few times (the class count, the
    clean-accuracy check): its session has no memory arena, which would hold the largest
    run's memory all along (1.5 GB of a 224x224 MobileNetV2's 1,000-class scan)."""

    def __init__(self, model: LoadedModel, prep: Preprocess, device: str = "cpu",
                 graph: onnx.ModelProto | None = None) -> None:
        self.session = make_session(graph or model.runnable, resolve_device(device),
                                    arena=False)
        self.input_name, _ = model.image_input()
        self.prep = prep

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return run_batched(self.session, {self.input_name: self.prep.to_model(pixels)})


def evaluate(model_path: str | Path, data_path: str | Path, attack: Attack | None = None,
             target: int | None = None, overrides: dict | None = None,
             device: str = "cpu", resize: bool = False) -> EvalResult:
    """Clean accuracy, and the attack success rate of `attack` towards `target`.

    ASR counts images whose true label is not the target and that the triggered input
    sends to the target.
    """
    model = load_model(model_path)
    prep = model_preprocess(model, overrides)
    shipped = None
    if model.layer_graph is not None:
        # a QDQ model's float copy drops the int8 rounding: measure the integer graph that
        # ships (its float copy, which batchable would relax, is never run here)
        shipped = flat_logits(any_batch(model.proto, prep.input_shape))
    else:
        batchable(model, prep)
    data: ImageSet = load_images(data_path, prep, resize)
    predict = Predictor(model, prep, device, shipped)
    logits = predict(data.pixels)
    if logits.ndim != 2:
        raise DataError(f"model output has shape {list(logits.shape)}; expected [N, classes]")
    n_classes = logits.shape[1]
    _check_labels(data_path, data, n_classes)
    clean_acc = float((logits.argmax(1) == data.labels).mean())
    if attack is None:
        return EvalResult(clean_acc, None, len(data), 0, data.resized)
    if target is None:
        raise DataError("an attack needs --target")
    if not 0 <= target < n_classes:
        raise UsageError(f"attack target {target} is not a class of this model "
                         f"(0..{n_classes - 1})")
    keep = data.labels != target
    if not keep.any():
        raise DataError(f"{data_path}: every image is of the target class {target}; the "
                        "attack success rate needs images of other classes")
    triggered = attack.apply(data.pixels[keep])
    hits = predict(triggered).argmax(1) == target
    return EvalResult(clean_acc, float(hits.mean()), len(data), int(keep.sum()), data.resized)


# ----------------------------------------------------------------------------- scan


def scan(model_path: str | Path, options: ScanOptions | None = None,
         progress: Progress | None = None) -> ScanResult:
    """Scan one model: load and vet it, reverse triggers, detect, and repair if asked.

    Never raises for a problem with the model or data: refusals and errors end up in the
    result (verdict ERROR / INCONCLUSIVE) so a multi-model gate still reports every model.
    A UsageError (bad policy, bad option) is raised: nothing can be scanned with it.
    """
    options = options or ScanOptions()
    policy = load_policy(options.policy)
    if options.reverse.steps != ReverseConfig.steps:  # refused before any work is done
        raise UsageError("the trigger-reverse step budget is set by the policy "
                         "(detection.reverse_steps, detection.second_view_steps), "
                         "not by ScanOptions.reverse.steps")
    progress = progress or Progress(enabled=not options.quiet)
    result = ScanResult(model_path=str(model_path), method=options.method, seed=options.seed,
                        tool_version=__version__)
    catalog = load_catalog()
    try:
        _scan_into(result, Path(model_path), options, policy, catalog, progress)
    except (ModelRefused, Inconclusive) as exc:
        result.verdict = Verdict.ERROR if isinstance(exc, ModelRefused) else Verdict.INCONCLUSIVE
        text = str(exc)
        if exc.rule_id:
            text = text.removeprefix(f"{exc.rule_id}: ")
            result.findings.append(catalog.make(exc.rule_id, text, exc.location))
            text = f"{exc.rule_id}: {text}"
        (result.errors if isinstance(exc, ModelRefused) else result.skipped).append(text)
    except DataError as exc:
        result.verdict = Verdict.ERROR
        result.errors.append(str(exc))
    except UsageError:
        raise
    except Exception as exc:  # a bug: this model's result says so, the other models still run
        log.debug("internal error scanning %s", model_path, exc_info=True)
        oom = out_of_memory(exc)
        if oom is not None:
            result.verdict = Verdict.INCONCLUSIVE
            result.skipped.append(str(oom))
        else:
            result.verdict = Verdict.ERROR
            result.errors.append(internal_error(exc))
    finally:
        progress.close()
    result.findings = policy.apply(result.findings)
    return result


def _scan_into(result: ScanResult, path: Path, opts: ScanOptions, policy: Policy,
               catalog: Catalog, progress: Progress) -> None:
    """The pipeline, top to bottom; each stage reads and fills the one ScanContext."""
    started = progress.clock()
    ctx = _load(result, path, opts, policy, catalog, progress)
    ctx.started = started
    if opts.method != "shapley":
        _run_baseline(ctx)
        return
    _gather_images(ctx)  # with the forecast of the long stages (estimate.check_time)
    ctx.verdict = find_backdoor(ctx)
    # detection's gradient session is done with (the re-scan builds its own): released, so
    # that its memory (about 1.1 GB after 840-row steps at 224x224) is not held during the
    # repair
    ctx.program = None
    if not ctx.verdict.detection.flagged_targets:
        result.verdict = Verdict.CLEAN
        return
    result.verdict = Verdict.BACKDOOR
    if policy.repair.enabled:
        _repair_in_time(ctx)


def _repair_in_time(ctx: ScanContext) -> None:
    """Repair, stopped when the scan reaches detection.max_minutes (the forecast before the
    reverse covers detection; the repair's Shapley values, plan, recovery and re-scan grow
    with the images, the channels and the image size, and at 224x224 on a CPU take hours).
    A repair stopped is not done: no repair in the result, nothing for --out, SS306."""
    try:
        with ctx.within_limit():
            repair(ctx)
    except OutOfTime as stopped:
        ctx.result.repair = None
        ctx.result.findings.append(ctx.catalog.make(
            "SS306", f"the repair was stopped when the scan reached detection.max_minutes = "
            f"{ctx.policy.detection.max_minutes:g} ({stopped.args[0] or 'repair'}): the "
            "model was not repaired, and nothing is written to --out", stage=stopped.args[0]))


def _load(result: ScanResult, path: Path, opts: ScanOptions, policy: Policy,
          catalog: Catalog, progress: Progress) -> ScanContext:
    """Load and vet the model, find its activation layers, its preprocessing and classes."""
    t0 = time.perf_counter()
    progress.stage(f"loading {path.name}")
    model = load_model(path, allowed_domains=policy.load.allowed_domains,
                       max_bytes=policy.load.max_model_bytes)
    result.findings.extend(model.findings)
    found = discover(model.analysed)
    result.findings.extend(discovery_findings(found))
    layers = found.layers
    result.model = model.summary(layers)
    if not layers:
        raise Inconclusive("inconclusive: no activation layers to scan"
                           + (f" ({QUANTIZED_HINT})" if quantized(model.proto) else ""),
                           rule_id="SS204")
    scored = _select_layers(layers, opts.layers)
    prep = model_preprocess(model, opts.overrides)
    batchable(model, prep)
    device = resolve_device(opts.device)
    result.device = device.name
    predict = Predictor(model, prep, device.requested)  # one session for the checks below
    n_classes = _n_classes(predict, prep)
    result.timings["load"] = time.perf_counter() - t0
    return ScanContext(opts=opts, policy=policy, catalog=catalog, progress=progress,
                       result=result, model=model, layers=scored, prep=prep, device=device,
                       n_classes=n_classes, predict=predict)


def _gather_images(ctx: ScanContext) -> None:
    """The images to reverse triggers on: the checked few-shot images, or inputs
    synthesised from the model (data-free)."""
    # every reverse runs on a program without the BN-statistics head: with bn_weight 0 the
    # head changes nothing but costs 40 % of each step; synthesis builds its own
    ctx.program = GradientProgram(ctx.model.runnable, device=ctx.device,
                                  max_bytes=ctx.policy.load.max_batch_bytes)
    if ctx.opts.data_free:
        # the forecast (and SS210's limit) comes before synthesis, the first long stage
        check_time(ctx)
        with ctx.timed("synthesis"):
            ctx.images, ctx.bn_layers = synthesise_inputs(ctx)
        return
    if ctx.opts.data is None:
        raise DataError("give --data with clean images (1 per class is enough) "
                        "or --data-free")
    ctx.images = _clean_images(ctx)
    _check_clean_accuracy(ctx.predict, ctx.images, ctx.policy.detection)
    check_time(ctx)


def _run_baseline(ctx: ScanContext) -> None:
    from .baselines import run_baseline
    from .baselines.finetune import finetune_repair

    with ctx.timed("baseline"):
        ctx.progress.stage(f"baseline {ctx.opts.method}")
        images = None
        if ctx.opts.data is not None:
            images = _clean_images(ctx)
        recovered = None
        if ctx.opts.method == "ft":
            if images is None:
                raise DataError("fine-tuning trains on clean images: give --data")
            repair, recovered = finetune_repair(ctx.model, ctx.layers, ctx.prep, images,
                                                ctx.policy, ctx.device, ctx.opts.seed)
        else:
            repair = run_baseline(ctx.opts.method, ctx.model, ctx.layers, ctx.prep, images,
                                  ctx.policy, ctx.device)
    ctx.result.repair = repair
    ctx.result.verdict = Verdict.REPAIR_ONLY
    if repair.pruned or recovered is not None:
        finish_repair(ctx, repair, recovered)


def _select_layers(layers: list[LayerInfo], wanted: tuple[str, ...] | None) -> list[LayerInfo]:
    if not wanted:
        return layers
    chosen = [la for la in layers if la.name in wanted or la.node in wanted]
    missing = set(wanted) - {la.name for la in chosen} - {la.node for la in chosen}
    if missing:
        raise UsageError(f"--layers: no activation layer named {', '.join(sorted(missing))} "
                         "(see `shapscan inspect`)")
    return chosen


def _check_labels(path: str | Path, images: ImageSet, n_classes: int) -> None:
    if images.labels.max() >= n_classes:
        raise DataError(f"{path}: label {int(images.labels.max())} is out of range "
                        f"for a model with {n_classes} classes")


def _clean_images(ctx: ScanContext) -> ImageSet:
    """The --data images, checked for what every method needs: labels of this model and
    enough of its classes (SS207), and at least two of them; SS208 when --resize resized
    them."""
    path, prep = ctx.opts.data, ctx.prep
    assert path is not None
    images = load_images(path, prep, ctx.opts.resize)
    _check_labels(path, images, ctx.n_classes)
    _check_class_coverage(images, ctx.n_classes, ctx.policy.detection)
    if len(images.classes()) < 2:
        raise DataError(f"{path}: need images of at least 2 classes")
    if images.resized:
        count = sum(images.resized.values())
        ctx.result.findings.append(ctx.catalog.make(
            "SS208", f"{count} of {len(images)} clean images were resized from "
            f"{', '.join(sorted(images.resized))} to {prep.height}x{prep.width} (--resize, "
            "bilinear): the verdict rests on resized images", count=count,
            sizes=dict(images.resized)))
    return images


def _check_class_coverage(images: ImageSet, n_classes: int, det: DetectionPolicy) -> None:
    missing = np.setdiff1d(np.arange(n_classes), images.classes())
    covered = n_classes - len(missing)
    # the share in integers: 0.55 * 100 is 55.00000000000001 in floats
    needed = math.ceil(round(det.min_class_coverage * n_classes, 6))
    if covered >= needed:
        return
    shown = ", ".join(str(int(c)) for c in missing[:5])
    if len(missing) > 5:
        shown += f" and {len(missing) - 5} more"
    raise Inconclusive(
        f"inconclusive: the clean images cover {covered} of the model's {n_classes} classes "
        f"(missing {shown}; the policy asks for at least {needed}): without images of every class "
        "the trigger sizes are not comparable; add them or scan --data-free", rule_id="SS207")


def _check_clean_accuracy(predict: Predictor, images: ImageSet, det: DetectionPolicy) -> None:
    logits = predict(images.pixels)
    acc = float((logits.argmax(1) == images.labels).mean())
    if acc < det.min_clean_accuracy:
        raise Inconclusive(
            f"inconclusive: the model classifies {100 * acc:.0f}% of the {len(images)} clean "
            f"images correctly (the policy asks for {100 * det.min_clean_accuracy:.0f}%): "
            "check the preprocessing (--scale/--mean/--std/--layout) and the labels",
            rule_id="SS206")


def _n_classes(predict: Predictor, prep: Preprocess) -> int:
    probe = predict(
        np.zeros((1, prep.channels, prep.height, prep.width), np.float32))
    if probe.ndim != 2 or probe.shape[1] < 2:
        raise Inconclusive(f"inconclusive: model output has shape {list(probe.shape)}; "
                           "shapscan scans classifiers with [N, classes] outputs")
    return int(probe.shape[1])
