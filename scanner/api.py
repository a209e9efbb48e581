"""The Python API the CLI wraps: evaluate (red-team metrics) and scan (the gate)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .attacks import Attack
from .autodiff import GradientProgram
from .data import ImageSet, Preprocess, load_images, resolve_preprocess, shifted
from .detect import Verdict as DetectVerdict
from .detect import detect, most_suspicious, score
from .errors import (
    DataError,
    Inconclusive,
    ModelRefused,
    UsageError,
    internal_error,
    out_of_memory,
)
from .findings import ChannelValue, ClassReverse, LayerInfo, Repair, ScanResult, Verdict
from .graph.activations import discover, discovery_findings
from .graph.batch import any_batch
from .graph.export import sanitize, save_atomic
from .graph.load import LoadedModel, load_model
from .graph.prefix import CoalitionEvaluator
from .graph.quantized import QUANTIZED_HINT, quantized
from .policy import Catalog, DetectionPolicy, Policy, RepairPolicy, load_catalog, load_policy
from .progress import Progress
from .prune import PruneConfig, PrunePlan, plan
from .reverse import ReverseConfig, ReversedTrigger, SynthesisConfig, reverse_triggers, synthesize
from .runtime import Device, make_session, resolve_device, run_batched
from .shapley import ShapleyConfig, ShapleyResult, Utility, estimate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    clean_acc: float
    asr: float | None
    n_images: int
    n_attack_images: int


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
    """Point `model.runnable` at a copy that takes any batch size (graph.batch)."""
    relaxed = any_batch(model.analysed, prep.input_shape)
    model.batch_free = None if relaxed is model.analysed else relaxed


class Predictor:
    """Logits of the unmodified model for pixel-space images; one session, many calls."""

    def __init__(self, model: LoadedModel, prep: Preprocess, device: str = "cpu",
                 graph: onnx.ModelProto | None = None) -> None:
        self.session = make_session(graph or model.runnable, resolve_device(device))
        self.input_name, _ = model.image_input()
        self.prep = prep

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return run_batched(self.session, {self.input_name: self.prep.to_model(pixels)})


def evaluate(model_path: str | Path, data_path: str | Path, attack: Attack | None = None,
             target: int | None = None, overrides: dict | None = None,
             device: str = "cpu") -> EvalResult:
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
        shipped = any_batch(model.proto, prep.input_shape)
    else:
        batchable(model, prep)
    data: ImageSet = load_images(data_path, prep)
    predict = Predictor(model, prep, device, shipped)
    logits = predict(data.pixels)
    if logits.ndim != 2:
        raise DataError(f"model output has shape {list(logits.shape)}; expected [N, classes]")
    n_classes = logits.shape[1]
    _check_labels(data_path, data, n_classes)
    clean_acc = float((logits.argmax(1) == data.labels).mean())
    if attack is None:
        return EvalResult(clean_acc, None, len(data), 0)
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
    return EvalResult(clean_acc, float(hits.mean()), len(data), int(keep.sum()))


# ----------------------------------------------------------------------------- scan


@dataclass(frozen=True)
class ScanOptions:
    data: Path | None = None  # few-shot images; None with data_free=True
    data_free: bool = False
    out: Path | None = None  # write the sanitized model here when a backdoor is repaired
    policy: str | Path = "default"
    method: str = "shapley"  # shapley | clp | fp
    device: str = "auto"
    seed: int = 0
    layers: tuple[str, ...] | None = None  # activation tensors (or node names) to score
    overrides: dict | None = None  # preprocessing overrides
    # the step budget is the policy's (detection.reverse_steps, .second_view_steps): a
    # ScanOptions that changes `steps` here is refused rather than silently overridden
    reverse: ReverseConfig = ReverseConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    prune_order: str = "greedy"
    permutations: int | None = None  # override the policy's Shapley sample budget
    epsilon: float | None = None
    stable_rounds: int = 0  # > 0: stop sampling once the top-k set is stable this many rounds
    # The reversed trigger is the *smallest* that works; a real one is stronger, and pruning
    # until the minimal one fails can leave the real one working (cnn_trojan: true ASR 52%
    # after such a repair, 21% with gain 2). Shapley values and the stop rule use a copy
    # this much stronger.
    trigger_gain: float = 2.0
    quiet: bool = False


def scan(model_path: str | Path, options: ScanOptions = ScanOptions(),
         progress: Progress | None = None) -> ScanResult:
    """Scan one model: load and vet it, reverse triggers, detect, and repair if asked.

    Never raises for a problem with the model or data: refusals and errors end up in the
    result (verdict ERROR / INCONCLUSIVE) so a multi-model gate still reports every model.
    A UsageError (bad policy, bad option) is raised: nothing can be scanned with it.
    """
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

    if opts.method != "shapley":
        _run_baseline(result, model, scored, prep, opts, policy, catalog, progress, device,
                      n_classes)
        return

    t = time.perf_counter()
    # every reverse runs on a program without the BN-statistics head: with bn_weight 0 the
    # head changes nothing but costs 40 % of each step; synthesis builds its own
    program = GradientProgram(model.runnable, device=device)
    if opts.data_free:
        images, bn_layers = _synthesise(result, model, prep, n_classes, opts, catalog,
                                        progress, device)
        result.timings["synthesis"] = time.perf_counter() - t
        t = time.perf_counter()
    else:
        if opts.data is None:
            raise DataError("give --data with clean images (1 per class is enough) "
                            "or --data-free")
        images = _clean_images(opts.data, prep, n_classes, policy.detection)
        bn_layers = 0
        _check_clean_accuracy(predict, images, policy.detection)
    progress.stage("reversing triggers")
    det = policy.detection
    verdict = _reverse_and_detect(program, prep, images, n_classes, opts, det,
                                  opts.data_free, bn_layers, progress, det.reverse_steps)
    verdict.detection.views = {"synthesised" if opts.data_free else "few-shot":
                               _decision_score(verdict, det)}
    result.timings["reverse"] = time.perf_counter() - t
    if not verdict.detection.flagged_targets and not opts.data_free and det.synthesised_view:
        verdict = _second_view(result, model, program, prep, n_classes, opts, det,
                               verdict, catalog, device, progress)
    result.detection = verdict.detection
    _detection_findings(result, verdict, catalog, images, det)
    if not verdict.detection.flagged_targets:
        result.verdict = Verdict.CLEAN
        return
    result.verdict = Verdict.BACKDOOR
    if not policy.repair.enabled:
        return
    target, *others = verdict.detection.flagged_targets
    _repair(result, model, scored, prep, images, target, verdict.triggers, others, opts,
            policy, catalog, progress, device)


def _synthesise(result: ScanResult, model: LoadedModel, prep: Preprocess,
                n_classes: int, opts: ScanOptions, catalog: Catalog, progress: Progress,
                device: Device, stage: str = "synthesising data (data-free)"
                ) -> tuple[ImageSet, int]:
    progress.stage(stage)
    program = GradientProgram(model.runnable, bn_stats=True, device=device)
    images, bn_layers = synthesize(program, prep, n_classes, opts.synthesis, opts.seed,
                                   progress)
    if not bn_layers:
        result.findings.append(catalog.make(
            "SS203", "data-free synthesis used the class logit and smoothness prior only: "
            "the model has no BatchNormalization statistics to match"))
    return images, bn_layers


def _reverse_and_detect(program: GradientProgram, prep: Preprocess, images: ImageSet,
                        n_classes: int, opts: ScanOptions, det: DetectionPolicy,
                        synthetic: bool, bn_layers: int, progress: Progress,
                        steps: int) -> DetectVerdict:
    cfg = replace(opts.reverse, steps=steps)
    reversed_ = reverse_triggers(program, prep, images, n_classes, cfg, opts.seed, progress)
    return detect(reversed_, det.anomaly_threshold, det.warn_threshold,
                  det.isolation_threshold, synthetic, bn_layers, det.warp_ratio)


def _second_view(result: ScanResult, model: LoadedModel, program: GradientProgram,
                 prep: Preprocess, n_classes: int, opts: ScanOptions, det: DetectionPolicy,
                 first: DetectVerdict, catalog: Catalog, device: Device,
                 progress: Progress) -> DetectVerdict:
    """The few-shot images flagged nothing: look again on inputs synthesised from the model.

    One real image per class can hide a full-image backdoor: from them honest classes are
    nearly as easy to reach as the target (resnet_blended, README "Detection"), while on
    inputs synthesised from the model's BatchNormalization statistics the target stands
    out. Only models with BN statistics get this view (without them synthesis has no real
    prior). Two views are two chances for an honest class to look anomalous, so a flag from
    this one counts only on the class the few-shot view came closest to flagging (its
    largest per-class decision score): both views must point at the same target.
    """
    if not program.bn_layers:  # counted with or without the BN-statistics head
        return first
    t = time.perf_counter()
    synthetic, bn_layers = _synthesise(
        result, model, prep, n_classes, opts, catalog, progress, device,
        "second view: the few-shot images flagged nothing, synthesising inputs")
    progress.stage("reversing triggers on synthesised inputs")
    second = _reverse_and_detect(program, prep, synthetic, n_classes, opts, det, True,
                                 bn_layers, progress, det.second_view_steps)
    top = most_suspicious(first.detection, det.warn_threshold, det.isolation_threshold,
                          det.warp_ratio)
    views = {**first.detection.views,
             "synthesised": _decision_score(second, det, [] if top is None else [top])}
    passes = first.detection.forward_passes + second.detection.forward_passes
    if top in second.detection.flagged_targets:
        chosen = second.keep_only(top)
        passes += _refine_trigger(chosen, top, program, prep, synthetic, n_classes, opts,
                                  det, progress)
    else:
        chosen = first
    chosen.detection.views = views
    chosen.detection.forward_passes = passes
    result.timings["second_view"] = time.perf_counter() - t
    return chosen


def _refine_trigger(verdict: DetectVerdict, target: int, program: GradientProgram,
                    prep: Preprocess, images: ImageSet, n_classes: int, opts: ScanOptions,
                    det: DetectionPolicy, progress: Progress) -> int:
    """The second view decides on a short budget (its target stands out early), but a
    repair planned with a trigger that few steps made is costly (resnet_blended: 10.9
    points of accuracy with its 50-step trigger, 5.4 refined, both before the plan gave
    back channels it did not need; README "Repair, measured").
    Reverse the flagged family for the flagged class alone at the first view's budget, and
    plan with that trigger if it works. Returns the forward passes spent."""
    if det.second_view_steps >= det.reverse_steps:
        return 0
    flagged = verdict.triggers[target]
    progress.stage("refining the flagged class's trigger for the repair")
    cfg = replace(opts.reverse, steps=det.reverse_steps, families=(flagged.family,))
    run = reverse_triggers(program, prep, images, n_classes, cfg, opts.seed, progress,
                           targets=[target])
    refined = run.triggers[(flagged.family, target)]
    if refined.asr >= cfg.asr_goal:
        verdict.triggers[target] = refined
        verdict.refined[target] = cfg.steps
    return run.forward_passes


def _decision_score(verdict: DetectVerdict, det: DetectionPolicy,
                    classes: list[int] | None = None) -> float:
    return score(verdict.detection, det.warn_threshold, det.isolation_threshold, classes,
                 det.warp_ratio)


_KIND = {"patch": "a patch-like", "universal": "a full-image", "warp": "an image-warping"}


def _why_flagged(c: ClassReverse, reason: str, policy: DetectionPolicy) -> str:
    """The test that flagged the class, with the numbers it compared."""
    if reason == "combined":
        return f"anomaly index {c.anomaly_index:.2f} > {policy.anomaly_threshold:g}"
    fam, cut = (("patch", policy.warn_threshold) if reason == "patch"
                else ("warp", policy.anomaly_threshold))
    index = c.patch_anomaly_index if reason == "patch" else c.warp_anomaly_index
    alone = c.patch_isolation if reason == "patch" else c.warp_isolation
    text = (f"{fam} anomaly index {index:.2f} > {cut:g}, {alone:.2f} robust σ from the next "
            f"class ≥ {policy.isolation_threshold:g}")
    if reason == "warp":
        text += (f", {c.warp_ratio:.1f} times below the median class's ≥ "
                 f"{policy.warp_ratio:g}")
    return text


def _detection_findings(result: ScanResult, verdict: DetectVerdict, catalog: Catalog,
                        images: ImageSet, policy: DetectionPolicy) -> None:
    det = verdict.detection
    by_class = {c.target: c for c in det.classes}
    second = ("; found on inputs synthesised from the model, on the class the few-shot "
              "images came closest to flagging"
              if list(det.views) == ["few-shot", "synthesised"] and det.data_free else "")
    for t in det.flagged_targets:
        trig = verdict.triggers[t]
        index = by_class[t].anomaly_index
        refined = (f"; the trigger shown and repaired with was then reversed for this class "
                   f"alone, {verdict.refined[t]} steps" if t in verdict.refined else "")
        result.findings.append(catalog.make(
            "SS201", f"backdoor towards class {t}: {_KIND[trig.family]} reversed trigger "
            f"flips {100 * trig.asr:.0f}% of other classes' images "
            f"({_why_flagged(by_class[t], verdict.reasons[t], policy)}){second}{refined}",
            location=f"class {t}", target=t, anomaly_index=index, family=trig.family,
            test=verdict.reasons[t], reversed_asr=trig.asr))
        det.families[t] = trig.family
        if trig.family == "warp":
            magnitude = np.hypot(trig.pattern[0], trig.pattern[1])
            det.masks[t] = magnitude / max(float(magnitude.max()), 1e-12)
        elif trig.mask is not None:
            det.masks[t], det.patterns[t] = trig.mask, trig.pattern
        else:
            det.masks[t] = np.abs(trig.pattern).mean(0)
            det.patterns[t] = np.clip(0.5 + trig.pattern, 0, 1)
        example = images.pixels[np.flatnonzero(images.labels != t)[:1]]
        det.examples[t] = trig.apply(example)[0]
    for t in verdict.suspicious:
        index = by_class[t].anomaly_index
        result.findings.append(catalog.make(
            "SS202", f"class {t} is unusually easy to reach (anomaly index {index:.2f}, "
            f"flag threshold {det.threshold:g})", location=f"class {t}", target=t,
            anomaly_index=index))


def _repair(result: ScanResult, model: LoadedModel, layers: list[LayerInfo], prep: Preprocess,
            images: ImageSet, target: int, triggers: dict[int, ReversedTrigger],
            other_targets: list[int], opts: ScanOptions, policy: Policy, catalog: Catalog,
            progress: Progress, device: Device) -> None:
    t = time.perf_counter()
    # shifted copies: the utilities average over more rows, so they are less noisy
    # (FINDINGS 5); the clean cost (a divergence, see prune.py) gets the most
    stamped = _stamped(images, target, triggers[target], opts.trigger_gain)
    clean = shifted(images, 8)
    clean_pixels, clean_labels = clean.pixels, clean.labels
    backdoor_eval = CoalitionEvaluator(model.runnable, layers, prep.to_model(stamped), device)
    clean_eval = backdoor_eval.with_images(prep.to_model(clean_pixels))
    sp = policy.shapley
    cfg = ShapleyConfig(permutations=opts.permutations or sp.permutations,
                        epsilon=sp.epsilon if opts.epsilon is None else opts.epsilon,
                        top_k=sp.top_k, truncation=sp.truncation,
                        stable_rounds=opts.stable_rounds)
    progress.stage(f"Shapley values towards class {target}")
    utility = Utility(target)
    values = estimate(backdoor_eval, utility, cfg, opts.seed, progress=progress)
    result.timings["shapley"] = time.perf_counter() - t
    t = time.perf_counter()
    progress.stage("choosing channels to zero")
    rp = policy.repair
    pcfg = PruneConfig(target_asr=rp.target_asr, target_probability=rp.target_probability,
                       max_channel_fraction=rp.max_channel_fraction,
                       max_clean_drop=rp.max_clean_drop, order=opts.prune_order,
                       give_back=not opts.data_free)
    chosen = plan(backdoor_eval, clean_eval, clean_labels, utility, values, pcfg)
    _record_repair(result, model, layers, backdoor_eval, values, chosen, target,
                   backdoor_eval.forward_passes + clean_eval.forward_passes, cfg, opts,
                   catalog, rp)
    if other_targets and chosen.channels:
        _check_other_targets(result, backdoor_eval, prep, images, chosen.channels, target,
                             {t: triggers[t] for t in other_targets}, opts, catalog, rp)
    result.timings["prune"] = time.perf_counter() - t


def _stamped(images: ImageSet, target: int, trigger: ReversedTrigger, gain: float
             ) -> np.ndarray:
    """The trigger on the images of the other classes and 4 shifted copies of each."""
    others = images.subset(np.flatnonzero(images.labels != target))
    return trigger.apply(shifted(others, 4).pixels, gain=gain)


def _check_other_targets(result: ScanResult, evaluator: CoalitionEvaluator, prep: Preprocess,
                         images: ImageSet, channels: list[int], target: int,
                         triggers: dict[int, ReversedTrigger], opts: ScanOptions,
                         catalog: Catalog, rp: RepairPolicy) -> None:
    """The repair is planned for the most anomalous flagged class. Another flagged class's
    backdoor may live in other channels: its reversed trigger is tested on the repaired
    model, and SS304 says when it still works."""
    assert result.repair is not None
    coalitions = np.ones((2, evaluator.n_channels), np.float32)
    coalitions[1, channels] = 0.0  # row 0: the model as shipped, row 1: repaired
    kind = "synthesised" if opts.data_free else "few-shot"
    for t, trigger in triggers.items():
        stamped = evaluator.with_images(
            prep.to_model(_stamped(images, t, trigger, opts.trigger_gain)))
        before, after = (stamped.logits(coalitions).argmax(-1) == t).mean(-1)
        result.repair.forward_passes += stamped.forward_passes
        if after > rp.target_asr:
            result.findings.append(catalog.make(
                "SS304", f"class {t} was flagged too, and the repair was planned for class "
                f"{target}: on the repaired model class {t}'s reversed trigger still flips "
                f"{100 * after:.0f}% of the {kind} images of other classes (before: "
                f"{100 * before:.0f}%)", location=f"class {t}", target=t,
                reversed_asr_before=float(before), reversed_asr_after=float(after)))


def _record_repair(result: ScanResult, model: LoadedModel, layers: list[LayerInfo],
                   evaluator: CoalitionEvaluator, values: ShapleyResult, chosen: PrunePlan,
                   target: int, passes: int, cfg: ShapleyConfig, opts: ScanOptions,
                   catalog: Catalog, rp: RepairPolicy) -> None:
    def channel_value(flat: int, pruned: bool) -> ChannelValue:
        layer, ch = evaluator.channel(flat)
        return ChannelValue(layer.name, ch, float(values.values[flat]),
                            float(chosen.clean.get(flat, 0.0)), pruned)

    pruned = [channel_value(c, True) for c in chosen.channels]
    pruned_set = set(chosen.channels)
    top = [channel_value(int(c), int(c) in pruned_set) for c in values.top(20)]
    repair = Repair(
        target=target, channels_total=evaluator.n_channels, pruned=pruned, top_channels=top,
        reversed_asr_before=chosen.asr_before, reversed_asr_after=chosen.asr_after,
        fewshot_acc_before=chosen.clean_acc_before, fewshot_acc_after=chosen.clean_acc_after,
        permutations=values.permutations, forward_passes=passes, estimator=values.estimator,
        target_reached=chosen.target_reached, target_probability_before=chosen.backdoor_before,
        target_probability_after=chosen.backdoor_after,
        given_back=[channel_value(c, False) for c in chosen.given_back])
    result.repair = repair
    _finish_repair(result, model, repair, opts, catalog, rp)


def _finish_repair(result: ScanResult, model: LoadedModel, repair: Repair, opts: ScanOptions,
                   catalog: Catalog, rp: RepairPolicy) -> None:
    """Findings for the repair and the sanitized export (shared by every method)."""
    if not repair.pruned:
        result.findings.append(catalog.make(
            "SS302", f"no channel set within budget removes the backdoor towards class "
            f"{repair.target}; model not repaired", location=f"class {repair.target}"))
        return
    if not repair.target_reached:
        result.findings.append(catalog.make(
            "SS302", f"after zeroing {len(repair.pruned)} channels the reversed trigger still "
            f"works on {100 * repair.reversed_asr_after:.0f}% of few-shot images at mean "
            f"target probability {repair.target_probability_after or 0:.3f} (target: at "
            f"most {100 * rp.target_asr:.0f}%, and at most {rp.target_probability:g} above "
            "clean images of other classes)",
            location=f"class {repair.target}"))
    drop = repair.fewshot_acc_before - repair.fewshot_acc_after
    if drop > rp.max_clean_drop + 1e-9:
        result.findings.append(catalog.make(
            "SS303", f"repair lowers few-shot clean accuracy by {100 * drop:.1f} points",
            location=f"class {repair.target}"))
    if opts.out is not None:
        zeroed: dict[str, list[int]] = {}
        for c in repair.pruned:
            zeroed.setdefault(c.layer, []).append(c.channel)
        sanitized = sanitize(model.proto, zeroed, {
            "shapscan.method": repair.estimator, "shapscan.target": str(repair.target),
            "shapscan.source_sha256": model.sha256}, layer_graph=model.layer_graph)
        save_atomic(sanitized, opts.out)
        repair.output_path = str(opts.out)
    result.findings.append(catalog.make(
        "SS301", f"zeroed {len(repair.pruned)} of {repair.channels_total} channels "
        f"({100 * repair.pruned_fraction:.2f}%); reversed trigger success "
        f"{100 * repair.reversed_asr_before:.0f}% -> {100 * repair.reversed_asr_after:.0f}%"
        + (f"; sanitized model written to {opts.out}" if repair.output_path else "")
        + ("; data-free: clean behaviour was only checked on synthesised inputs, measure the "
           "repaired model's accuracy on real data before deploying it"
           if opts.data_free and opts.method == "shapley" else ""),
        location=f"class {repair.target}"))


def _run_baseline(result: ScanResult, model: LoadedModel, layers: list[LayerInfo],
                  prep: Preprocess, opts: ScanOptions, policy: Policy, catalog: Catalog,
                  progress: Progress, device: Device, n_classes: int) -> None:
    from .baselines import run_baseline

    t = time.perf_counter()
    progress.stage(f"baseline {opts.method}")
    images = None
    if opts.data is not None:
        images = _clean_images(opts.data, prep, n_classes, policy.detection)
    repair = run_baseline(opts.method, model, layers, prep, images, policy, device)
    result.timings["baseline"] = time.perf_counter() - t
    result.repair = repair
    result.verdict = Verdict.REPAIR_ONLY
    if repair.pruned:
        _finish_repair(result, model, repair, opts, catalog, policy.repair)


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


def _clean_images(path: Path, prep: Preprocess, n_classes: int, det: DetectionPolicy
                  ) -> ImageSet:
    """The --data images, checked for what every method needs: labels of this model and
    enough of its classes (SS207), and at least two of them."""
    images = load_images(path, prep)
    _check_labels(path, images, n_classes)
    _check_class_coverage(images, n_classes, det)
    if len(images.classes()) < 2:
        raise DataError(f"{path}: need images of at least 2 classes")
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
