"""The scan's detection stage: reverse triggers on its views, decide, and say why.

detect.py holds the statistics (anomaly indices, the verdict); this module runs them the
way a scan does: the first view on the scan's own images, a second view on synthesised
inputs when the few-shot images flag nothing, a refined trigger for a class only the
second view flagged, and the SS201/SS202 findings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx

from .autodiff import GradientProgram
from .autodiff.masks import MaskGradientProgram
from .context import ScanContext, ScanOptions
from .data import ImageSet, Preprocess
from .detect import (
    MIN_CONVERGED,
    EvidenceRule,
    class_scores,
    detect,
    most_suspicious,
    reached_goal,
    score,
    selectivity,
)
from .detect import Verdict as DetectVerdict
from .errors import OutOfTime
from .evidence import Evidence, MarginConfig, max_margins, selectivities
from .findings import ClassReverse, ScanResult, Shortlist
from .policy import Catalog, DetectionPolicy
from .progress import Progress, duration
from .reverse import (
    ReverseConfig,
    ReverseResult,
    ScreenConfig,
    reverse_triggers,
    screen,
    sweep,
    synthesize,
)
from .wording import reversed_reach


def find_backdoor(ctx: ScanContext) -> DetectVerdict:
    """Reverse and detect on the scan's images (and a second view if they flag nothing);
    the detection goes into the result with its findings."""
    assert ctx.images is not None and ctx.program is not None
    det = ctx.policy.detection
    with ctx.timed("reverse"):
        ctx.progress.stage("reversing triggers")
        verdict = reverse_and_detect(ctx, ctx.program, ctx.images, ctx.opts.data_free,
                                     ctx.bn_layers, det.reverse_steps)
        verdict.detection.views = {ctx.view: _decision_score(verdict, det)}
    if not verdict.detection.flagged_targets and not ctx.opts.data_free \
            and det.synthesised_view and ctx.program.bn_layers:  # BN layers: see _second_view
        verdict = _second_view_in_time(ctx, verdict)
    ctx.result.detection = verdict.detection
    _detection_findings(ctx.result, verdict, ctx.catalog, ctx.images, det)
    shortlist = verdict.detection.shortlist
    if shortlist is not None:
        how = ("found easiest to reach" if shortlist.screen == "classes" else
               "found label-free triggers sending images to")
        ctx.result.findings.append(ctx.catalog.make(
            "SS211", f"{len(shortlist.candidates) + len(shortlist.reference)} of the model's "
            f"{shortlist.classes} classes were reversed in full: the {len(shortlist.candidates)} "
            f"a {shortlist.screen_steps}-step {shortlist.screen} screen {how} "
            f"({', '.join(map(str, shortlist.candidates))}) and {len(shortlist.reference)} "
            f"random others as the yardstick ({_yardstick_words(shortlist)}); a backdoor "
            "towards a class the screen ranked low is not seen",
            candidates=list(shortlist.candidates), reference=list(shortlist.reference),
            screen=shortlist.screen, yardstick=dict(shortlist.yardstick)))
    return verdict


def _yardstick_words(shortlist: Shortlist) -> str:
    """'the triggers of 14 (patch), 20 (universal) of them reached the reverse's goal and
    set the median and spread; ...'"""
    counts = ", ".join(f"{n} ({fam})" for fam, n in shortlist.yardstick.items())
    return (f"the triggers of {counts} of them reached the reverse's goal and set the "
            f"median and spread; a family where fewer than {MIN_CONVERGED} did is measured "
            "against all of them")


def synthesise_inputs(ctx: ScanContext, stage: str = "synthesising data (data-free)"
                      ) -> tuple[ImageSet, int]:
    """One input per class from the model alone; returns them and the BN layers matched."""
    ctx.progress.stage(stage)
    program = GradientProgram(ctx.model.runnable, bn_stats=True, device=ctx.device,
                              max_bytes=ctx.policy.load.max_batch_bytes)
    images, bn_layers = synthesize(program, ctx.prep, ctx.n_classes, ctx.opts.synthesis,
                                   ctx.opts.seed, ctx.progress, synthesis_classes(ctx))
    if not bn_layers:
        ctx.result.findings.append(ctx.catalog.make(
            "SS203", "data-free synthesis used the class logit and smoothness prior only: "
            "the model has no BatchNormalization statistics to match"))
    return images, bn_layers


def reverse_and_detect(ctx: ScanContext, program: GradientProgram, images: ImageSet,
                       synthetic: bool, bn_layers: int, steps: int,
                       model: onnx.ModelProto | None = None,
                       include: Sequence[int] = ()) -> DetectVerdict:
    """Reverse, gather the evidence and decide, on `program`; `model` is the graph it was
    built from (the scanned model's, unless the re-scan passes the repaired one).
    `include`: classes reversed in full even when a screen would not choose them (the
    re-scan's repaired targets, the second view's one class that can count)."""
    det = ctx.policy.detection
    cfg = replace(ctx.opts.reverse, steps=steps, max_rows=det.reverse_rows)
    reversed_, shortlist = reverse_classes(ctx, program, images, cfg, include)
    found = (gather_evidence(ctx, program, images, reversed_, model) if det.evidence
             else None)
    verdict = detect(reversed_, det.anomaly_threshold, det.warn_threshold,
                     det.isolation_threshold, synthetic, bn_layers, det.warp_ratio, found,
                     evidence_rule(det))
    if shortlist is not None:
        shortlist = replace(shortlist, yardstick={
            fam: int(reached.sum()) for fam, reached in reached_goal(reversed_).items()})
    verdict.detection.shortlist = shortlist
    return verdict


def shortlisted(ctx: ScanContext) -> bool:
    """Whether this model has so many classes that a screen chooses which to reverse."""
    over = ctx.policy.detection.shortlist_over
    return bool(over) and ctx.n_classes > over


def synthesis_classes(ctx: ScanContext) -> np.ndarray:
    """The classes data-free synthesis makes inputs for: all, or on a many-class model
    `detection.synthesised_classes` of them at random (at least shortlist +
    reference_classes): the triggers are reversed on inputs of other classes, which need
    not be of every class, and synthesis then costs what it costs on a model of that many
    classes."""
    if not shortlisted(ctx):
        return np.arange(ctx.n_classes)
    det = ctx.policy.detection
    count = min(ctx.n_classes, max(det.synthesised_classes,
                                   det.shortlist + det.reference_classes))
    return np.sort(np.random.default_rng(ctx.opts.seed).choice(ctx.n_classes, count,
                                                               replace=False))


def reverse_classes(ctx: ScanContext, program: GradientProgram, images: ImageSet,
                    cfg: ReverseConfig, include: Sequence[int] = ()
                    ) -> tuple[ReverseResult, Shortlist | None]:
    """Reverse every class's triggers, or on a many-class model (`shortlisted`) screen
    them all and reverse the screen's candidates (and `include`) and a random reference
    sample."""
    if not shortlisted(ctx):
        return reverse_triggers(program, ctx.prep, images, ctx.n_classes, cfg,
                                ctx.opts.seed, ctx.progress), None
    det = ctx.policy.detection
    sc_cfg = ScreenConfig(steps=det.screen_steps, images=det.screen_images,
                          candidates=det.shortlist, reference=det.reference_classes,
                          restarts=det.sweep_restarts, sweep_images=det.sweep_images)
    if det.screen == "sweep":
        sc_cfg = replace(sc_cfg, steps=det.sweep_steps)
        ctx.progress.stage(f"sweeping label-free triggers over {ctx.n_classes} classes")
        found = sweep(program, ctx.prep, images, ctx.n_classes, cfg, sc_cfg, ctx.opts.seed,
                      ctx.progress)
        shown_images = min(det.sweep_images, len(images))
    else:
        ctx.progress.stage(f"screening the triggers of all {ctx.n_classes} classes")
        found = screen(program, ctx.prep, images, ctx.n_classes, cfg, sc_cfg, ctx.opts.seed,
                       ctx.progress)
        shown_images = sc_cfg.images
    candidates = found.candidates + [int(t) for t in include if t not in found.candidates]
    reference = [t for t in found.reference if t not in candidates]
    ctx.progress.stage(f"reversing triggers: {len(candidates)} candidates and "
                       f"{len(reference)} reference classes")
    run = reverse_triggers(program, ctx.prep, images, ctx.n_classes, cfg, ctx.opts.seed,
                           ctx.progress, targets=candidates + reference)
    run.reference = reference
    run.forward_passes += found.forward_passes
    return run, Shortlist(ctx.n_classes, candidates, reference, sc_cfg.steps, shown_images,
                          found.seconds, det.screen)


def gather_evidence(ctx: ScanContext, program: GradientProgram, images: ImageSet,
                    reversed_: ReverseResult, model: onnx.ModelProto | None = None
                    ) -> Evidence:
    """evidence.py's statistics for every class of this view, on `model` (default: the
    scanned model's runnable graph)."""
    ctx.progress.stage("weighing the evidence (selectivity, max margins)")
    masks = MaskGradientProgram(model or ctx.model.runnable, ctx.layers, ctx.device,
                                max_bytes=ctx.policy.load.max_batch_bytes)
    select, passes = selectivities(masks, ctx.prep, images, reversed_.triggers,
                                   ctx.n_classes)
    margins = None
    steps = ctx.policy.detection.margin_steps
    if steps:
        margins, more = max_margins(program, ctx.prep, ctx.n_classes,
                                    MarginConfig(steps=steps), ctx.opts.seed,
                                    reversed_.targets)
        passes += more
    return Evidence(margins, passes, select)


def _second_view_in_time(ctx: ScanContext, first: DetectVerdict) -> DetectVerdict:
    """The second view, within detection.max_minutes: not started when its forecast
    (estimate.second_view_s) is over the time left, stopped if it runs past the limit
    anyway; then the verdict is the few-shot images' alone, and SS213 says so."""
    from .estimate import second_view_s  # estimate imports this module

    limit = ctx.policy.detection.max_minutes
    if not limit or ctx.row_s is None:
        return _second_view(ctx, first)
    left = ctx.started + 60 * limit - ctx.progress.clock()
    need = second_view_s(ctx)
    if need > left:
        _one_view(ctx, f"the second view was not run: it was forecast at {duration(need)} "
                  f"on this machine, and {duration(max(0.0, left))} of detection.max_minutes "
                  f"= {limit:g} was left", "forecast")
        return first
    try:
        with ctx.within_limit():
            return _second_view(ctx, first)
    except OutOfTime as stopped:
        _one_view(ctx, f"the second view was stopped when the scan reached "
                  f"detection.max_minutes = {limit:g} ({stopped.args[0]})", "stopped")
        return first


def _one_view(ctx: ScanContext, what: str, why: str) -> None:
    ctx.result.findings.append(ctx.catalog.make(
        "SS213", f"{what}: the verdict rests on the few-shot images alone, which can hide a "
        "full-image backdoor that inputs synthesised from the model show", reason=why))
    ctx.progress.stage("second view skipped: over detection.max_minutes (SS213)")


def _second_view(ctx: ScanContext, first: DetectVerdict) -> DetectVerdict:
    """The few-shot images flagged nothing: look again on inputs synthesised from the model.

    One real image per class can hide a full-image backdoor: from them honest classes are
    nearly as easy to reach as the target (resnet_blended, README "Detection"), while on
    inputs synthesised from the model's BatchNormalization statistics the target stands
    out. Only models with BN statistics get this view (without them synthesis has no real
    prior). Two views are two chances for an honest class to look anomalous, so a flag from
    this one counts only on the class the few-shot view came closest to flagging (its
    largest per-class decision score): both views must point at the same target.
    """
    assert ctx.program is not None
    det = ctx.policy.detection
    with ctx.timed("second_view"):
        synthetic, bn_layers = synthesise_inputs(
            ctx, "second view: the few-shot images flagged nothing, synthesising inputs")
        ctx.second_images, ctx.second_bn_layers = synthetic, bn_layers
        top = most_suspicious(first.detection, det.warn_threshold, det.isolation_threshold,
                              det.warp_ratio, evidence_rule(det))
        ctx.progress.stage("reversing triggers on synthesised inputs")
        # a many-class scan's screen on these inputs must not pass over the one class
        # whose flag would count
        second = reverse_and_detect(ctx, ctx.program, synthetic, True, bn_layers,
                                    det.second_view_steps, include=[] if top is None else [top])
        views = {**first.detection.views,
                 "synthesised": _decision_score(second, det, [] if top is None else [top])}
        passes = first.detection.forward_passes + second.detection.forward_passes
        if top in second.detection.flagged_targets:
            chosen = second.keep_only(top)
            passes += _refine_trigger(chosen, top, ctx.program, ctx.prep, synthetic,
                                      ctx.n_classes, ctx.opts, det, ctx.progress)
        else:
            chosen = first
        chosen.detection.views = views
        chosen.detection.forward_passes = passes
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
    cfg = replace(opts.reverse, steps=det.reverse_steps, families=(flagged.family,),
                  max_rows=det.reverse_rows)
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
                 det.warp_ratio, evidence_rule(det))


_KIND = {"patch": "a patch-like", "universal": "a full-image", "warp": "an image-warping"}


def evidence_rule(det: DetectionPolicy) -> EvidenceRule | None:
    """The policy's use of the evidence beside the norms; None when it is not gathered."""
    if not det.evidence:
        return None
    return EvidenceRule(det.selectivity_floor, det.margin_scale or None, det.margin_gate)


def _why_flagged(c: ClassReverse, reason: str, policy: DetectionPolicy,
                 decision: float) -> str:
    """The test that flagged the class, with the numbers it compared."""
    text = _test_passed(c, reason, policy, decision)
    sel = selectivity(c)
    if reason != "evidence" and sel is not None and policy.evidence \
            and math.isfinite(policy.selectivity_floor):
        text += f"; selectivity {sel:.2f} ≥ {policy.selectivity_floor:g}"
    return text


def _test_passed(c: ClassReverse, reason: str, policy: DetectionPolicy,
                 decision: float) -> str:
    if reason == "evidence":
        return (f"MM-BD max-margin index {c.margin_index:.2f} > {policy.margin_scale:g} "
                f"(ratio {decision:.2f}), its triggers selective ({selectivity(c):.2f} > "
                f"{policy.margin_gate:g}); the norm tests alone did not flag it")
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
    decision = class_scores(det.classes, det.threshold, policy.warn_threshold,
                            policy.isolation_threshold, policy.warp_ratio,
                            evidence_rule(policy))
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
            f"{reversed_reach(trig, det.data_free)} "
            f"({_why_flagged(by_class[t], verdict.reasons[t], policy, decision[t])})"
            f"{second}{refined}",
            location=f"class {t}", target=t, anomaly_index=index, family=trig.family,
            test=verdict.reasons[t], reversed_asr=trig.asr))
        det.families[t] = trig.family
        det.reasons[t] = verdict.reasons[t]  # the HTML chart marks a patch or warp test
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
        why = ("; not flagged: a reference class (the yardstick), which the screen did not "
               "rank among its candidates" if t in det.yardstick_classes else "")
        result.findings.append(catalog.make(
            "SS202", f"class {t} is unusually easy to reach (anomaly index {index:.2f}, "
            f"flag threshold {det.threshold:g}){why}", location=f"class {t}", target=t,
            anomaly_index=index))
