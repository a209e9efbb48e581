"""How long a scan will take, said before the long stages start when the model is large.

Trigger reverse is the first long stage, and the others scale with the same thing (what
one image costs the model), so the forecast times two reverse steps on a few of the scan's
own images and multiplies: steps x rows per step x seconds per row, plus the evidence
stage's rows after the reverse. On the sample
zoo a scan that finds a backdoor and repairs it took 2-3 times its reverse (cnn_badnets
88 s for a 29 s reverse, resnet_badnets 214 s for 108 s, on busy cores); a clean few-shot
scan with its second view on synthesised inputs about 1.5-2 times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from .autodiff import GradientProgram
from .context import ScanContext
from .data import ImageSet, Preprocess
from .detection import shortlisted, synthesis_classes
from .errors import Inconclusive
from .evidence import OWN_COPIES, SELECTIVITY_ROWS, MarginConfig
from .progress import Progress, duration
from .reverse import FAMILIES, ReverseConfig, reverse_triggers

ANNOUNCE_OVER_S = 60.0  # forecast a reverse at least this long: "large"
PROBE_ROWS = 64  # a quarter of a zoo reverse step: small batches overstate the per-row cost
SLOW_ROW_S = 0.25  # a single row this slow is timed alone (see row_seconds)
WHOLE_SCAN = (2.0, 3.0)  # the whole scan / the reverse, on the sample zoo (see above)


def reverse_rows(labels: np.ndarray, n_classes: int, cfg: ReverseConfig,
                 targets: int | None = None) -> int:
    """Rows of one reverse step: for every family and class (the first `targets` classes
    stand for a shortlist), the images of other classes it is reversed on (at most
    reverse.py's per-class share)."""
    families = len(cfg.families or FAMILIES)
    count = n_classes if targets is None else min(targets, n_classes)
    limit = max(cfg.min_images, cfg.max_rows // max(1, families * count))
    others = len(labels) - np.bincount(labels, minlength=n_classes)[:count]
    return int(families * np.minimum(others, limit).sum())


def row_seconds(program: GradientProgram, prep: Preprocess, images: ImageSet,
                n_classes: int) -> float:
    """Seconds one row of a reverse step costs: the gradient pass and the trigger
    families' numpy work (stamping, their gradients: at 224x224 that was as much again as
    the pass), from the second of two real reverse steps on about PROBE_ROWS rows (the
    first pays for allocations). A model whose single gradient row takes SLOW_ROW_S or
    more is timed on that one row alone: a 64-row probe of a 224x224 VGG-19 would itself
    take minutes, and beside its pass the numpy work is small (a batch of one overstates
    the per-row cost a little, which errs towards the limit)."""
    one = _probe(program, prep, images, n_classes, 1)
    if one >= SLOW_ROW_S:
        return one
    return _step_probe(program, prep, images, n_classes)


def _probe(program: GradientProgram, prep: Preprocess, images: ImageSet, n_classes: int,
           rows: int) -> float:
    idx = np.resize(np.arange(len(images)), rows)
    x = prep.to_model(images.pixels[idx])
    weights = np.zeros((len(idx), n_classes), np.float32)
    weights[np.arange(len(idx)), images.labels[idx] % n_classes] = 1.0 / len(idx)
    program.run(x, weights)
    start = time.perf_counter()
    program.run(x, weights)
    return (time.perf_counter() - start) / len(idx)


def _step_probe(program: GradientProgram, prep: Preprocess, images: ImageSet,
                n_classes: int) -> float:
    cfg = ReverseConfig(steps=2, max_rows=PROBE_ROWS)
    families = len(cfg.families)
    targets = list(range(min(n_classes, max(1, PROBE_ROWS // (families * cfg.min_images)))))
    ticks: list[float] = []
    run = reverse_triggers(program, prep, images, n_classes, cfg, targets=targets,
                           progress=lambda step, total: ticks.append(time.perf_counter()))
    if len(ticks) < 2 or not run.forward_passes:  # no rows (one class only): the pass alone
        return _probe(program, prep, images, n_classes, PROBE_ROWS)
    return (ticks[1] - ticks[0]) * cfg.steps / run.forward_passes


@dataclass(frozen=True)
class Forecast:
    synthesis_s: float  # data-free synthesis (0 on a few-shot scan)
    reverse_s: float  # the first view's trigger reverse

    @property
    def total_s(self) -> float:
        return self.synthesis_s + self.reverse_s


def forecast(ctx: ScanContext, labels: np.ndarray, per_row: float,
             synthesis: bool | None = None, steps: int | None = None) -> Forecast:
    """Seconds of the data-free synthesis (when the scan makes its images, or `synthesis`)
    and of a reverse of `steps` (default: the first view's) on images with `labels` (at
    most: the reverse stops early once every trigger has stopped shrinking), under the
    context's policy, at `per_row` seconds a reverse row (`row_seconds`)."""
    det = ctx.policy.detection
    steps = det.reverse_steps if steps is None else steps
    synthesis_s = 0.0
    if ctx.opts.data_free if synthesis is None else synthesis:
        # the BN-statistics head costs about 40 % more per row (GradientProgram's note)
        synthesis_s = 1.4 * per_row * len(labels) * ctx.opts.synthesis.steps
    full = replace(ctx.opts.reverse, max_rows=det.reverse_rows)
    if shortlisted(ctx):  # the screen, then the full reverse of a few classes
        rows = reverse_rows(labels, ctx.n_classes, full,
                            det.shortlist + det.reference_classes) * steps
        if det.screen == "sweep":  # reverse.sweep: restarts x images rows per family
            rows += (len(full.families) * det.sweep_restarts
                     * min(det.sweep_images, len(labels)) * det.sweep_steps)
        else:  # a screening run takes `screen_images` images per class (reverse.screen)
            screening = replace(full, max_rows=0, min_images=det.screen_images)
            rows += reverse_rows(labels, ctx.n_classes, screening) * det.screen_steps
    else:
        rows = reverse_rows(labels, ctx.n_classes, full) * steps
    return Forecast(synthesis_s, per_row * (rows + evidence_rows(ctx, labels)))


def evidence_rows(ctx: ScanContext, labels: np.ndarray) -> int:
    """Rows of the evidence stage after the reverse (detection.gather_evidence), priced
    like reverse rows: per reversed class, the MM-BD margin search (restarts x (steps + 1))
    and per family the selectivity test (3 x up to 20 images of other classes, 2 x the
    class's own images and their shifted copies). On the 1,000-class 224x224 MobileNetV2
    it was about 5 minutes that the forecast did not count."""
    det = ctx.policy.detection
    if not det.evidence:
        return 0
    classes = (min(ctx.n_classes, det.shortlist + det.reference_classes) if shortlisted(ctx)
               else ctx.n_classes)
    per_class = np.bincount(labels, minlength=ctx.n_classes)
    own = (1 + OWN_COPIES) * int(np.sort(per_class)[::-1][:classes].sum())
    others = int(np.minimum(len(labels) - per_class, SELECTIVITY_ROWS)[:classes].sum())
    families = len(ctx.opts.reverse.families or FAMILIES)
    margins = MarginConfig().restarts * (det.margin_steps + 1) * classes if det.margin_steps else 0
    return margins + families * (3 * others + 2 * own)


def second_view_s(ctx: ScanContext) -> float:
    """Seconds the second view (detection._second_view: synthesis, then a reverse of
    `second_view_steps` on the synthesised inputs) will take, at the row time check_time
    measured."""
    assert ctx.row_s is not None
    labels = np.repeat(synthesis_classes(ctx), ctx.opts.synthesis.per_class)
    return forecast(ctx, labels, ctx.row_s, synthesis=True,
                    steps=ctx.policy.detection.second_view_steps).total_s


def scan_labels(ctx: ScanContext) -> np.ndarray:
    """The labels of the images the first view reverses on: the few-shot images', or those
    data-free synthesis will make (`synthesis_classes`, under the context's policy)."""
    if ctx.opts.data_free:
        return np.repeat(synthesis_classes(ctx), ctx.opts.synthesis.per_class)
    assert ctx.images is not None
    return ctx.images.labels


def _noise(prep: Preprocess, labels: np.ndarray) -> ImageSet:
    pixels = np.random.default_rng(0).random(
        (min(len(labels), PROBE_ROWS), prep.channels, prep.height, prep.width))
    return ImageSet(pixels.astype(np.float32), labels[:len(pixels)])


def check_time(ctx: ScanContext) -> Forecast | None:
    """Before the long stages: forecast them; when the forecast is over the policy's
    `detection.max_minutes`, take the fast plan ([detection.fast]: the context's policy
    is replaced, and SS212 says so) if that fits, else stop as inconclusive (SS210); say
    the forecast when it is long. None when neither applies (no limit, and a quiet scan:
    no probe is run)."""
    det = ctx.policy.detection
    limit = det.max_minutes
    if not limit and not ctx.progress.enabled:
        return None
    assert ctx.program is not None
    labels = scan_labels(ctx)
    images = ctx.images if ctx.images is not None else _noise(ctx.prep, labels)
    per_row = ctx.row_s = row_seconds(ctx.program, ctx.prep, images, ctx.n_classes)
    fc = forecast(ctx, labels, per_row)
    fast = None
    if limit and fc.total_s > 60 * limit and det.fast.enabled:
        thorough, policy = fc, ctx.policy
        ctx.policy = replace(policy, detection=det.fast_plan())
        fast = forecast(ctx, scan_labels(ctx), per_row)
        if fast.total_s > 60 * limit:
            ctx.policy = policy
        else:
            fc = fast
            ctx.result.findings.append(ctx.catalog.make(
                "SS212", f"the thorough plan was forecast at {_said(thorough)} on this "
                f"machine, over detection.max_minutes = {limit:g}: the fast plan was taken "
                f"({_said(fast)}): a label-free sweep screens the {ctx.n_classes} classes, "
                f"{det.fast.shortlist} candidates and {det.fast.reference_classes} reference "
                f"classes are reversed in full on at most {det.fast.reverse_rows} rows a step"
                + ("" if ctx.policy.detection.evidence or not det.evidence else
                   "; the evidence beside the trigger norms (MM-BD margins, selectivity), "
                   "which this policy's decision does not use, is not gathered"),
                thorough_s=round(thorough.total_s, 1), fast_s=round(fast.total_s, 1)))
            ctx.progress.stage("the thorough plan would take longer than the policy allows: "
                               "taking the fast plan (SS212)")
    if limit and fc.total_s > 60 * limit:
        also = "" if fast is None else f"; the fast plan: {_said(fast)}"
        raise Inconclusive(
            f"inconclusive: this scan would take longer than the policy allows: "
            f"{_said(fc)} on this machine ({ctx.n_classes} classes){also}, over "
            f"detection.max_minutes = {limit:g}; raise the limit in a policy file, or scan on "
            "a GPU (--device cuda)", rule_id="SS210")
    if ctx.progress.enabled:
        announce(ctx.progress, fc.reverse_s, ctx.model.path.name)
    return fc


def _said(fc: Forecast) -> str:
    what = f"data-free synthesis about {duration(fc.synthesis_s)}, then " if fc.synthesis_s else ""
    return f"{what}trigger reverse about {duration(fc.reverse_s)}"


def announce(progress: Progress, reverse_s: float, model: str) -> bool:
    """Say the forecast when the model is large; True when it was said."""
    if reverse_s < ANNOUNCE_OVER_S:
        return False
    low, high = (duration(k * reverse_s) for k in WHOLE_SCAN)
    progress.announce(f"{model}: a long scan ahead: trigger reverse alone will take about "
                      f"{duration(reverse_s)} on this machine as it is now, the whole scan "
                      f"about {low} to {high} if a backdoor is found and repaired")
    return True
