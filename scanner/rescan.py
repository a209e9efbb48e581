"""Re-scan a repaired model: the detector again, on the views the scan used.

The plan stops when the reversed trigger it planned with no longer works on the scan's
images; that says nothing of a trigger reversed afresh on the repaired model, which finds
whatever the zeroing left (the SiLU CNN, MLP and Clip CNN of FINDINGS "What models outside
samples/ showed" kept 88-99 % true ASR after a plan that had run out of budget). A class
flagged again makes the repair incomplete (repair.py), so it is never written as safe.
"""

from __future__ import annotations

import numpy as np

from .autodiff import GradientProgram
from .context import ScanContext
from .detection import reverse_and_detect
from .findings import ClassReverse, Repair, Rescan
from .graph.export import sanitize
from .recover import Recovered, write_back


def zeroed_channels(repair: Repair) -> dict[str, list[int]]:
    """Layer -> the channels the repair zeroes, in the form sanitize takes."""
    zeroed: dict[str, list[int]] = {}
    for c in repair.pruned:
        zeroed.setdefault(c.layer, []).append(c.channel)
    return zeroed


def rescan(ctx: ScanContext, repair: Repair, recovered: Recovered | None = None) -> Rescan:
    """Reverse and detect on the repaired model, every class, with the images of each view
    the scan used and at that view's step budget. On the first view every flag counts; the
    second view (synthesised inputs, run when the few-shot images flagged nothing) counts,
    as in the scan, only a flag on the class both views pointed at: the repair's target."""
    assert ctx.images is not None and ctx.result.detection is not None
    ctx.progress.stage("re-scanning the repaired model")
    det = ctx.policy.detection
    # the batch-free float copy the scan ran, zeroed as the export will be (checked there)
    repaired = sanitize(ctx.model.runnable, zeroed_channels(repair), verify=False)
    if recovered is not None:  # the fine-tuned weights the export will carry
        repaired = write_back(repaired, recovered.values, recovered.description)
    program = GradientProgram(repaired, device=ctx.device,
                              max_bytes=ctx.policy.load.max_batch_bytes)
    # a many-class scan's screen may pass over a repaired target: reverse it regardless
    flagged_before = ctx.result.detection.flagged_targets
    first = reverse_and_detect(ctx, program, ctx.images, ctx.opts.data_free, ctx.bn_layers,
                               det.reverse_steps, repaired, flagged_before)
    views, passes = [ctx.view], first.detection.forward_passes
    anomaly = {c.target: c.anomaly_index for c in first.detection.classes}
    flagged = list(first.detection.flagged_targets)
    flagging_view = first  # the view the scan's flags came from, on the repaired model
    if "synthesised" in ctx.result.detection.views and ctx.second_images is not None:
        ctx.progress.stage("re-scanning the repaired model on synthesised inputs")
        second = reverse_and_detect(ctx, program, ctx.second_images, True,
                                    ctx.second_bn_layers, det.second_view_steps, repaired,
                                    flagged_before)
        views.append("synthesised")
        passes += second.detection.forward_passes
        if repair.target in second.detection.flagged_targets and repair.target not in flagged:
            flagged.append(repair.target)
            anomaly[repair.target] = next(c.anomaly_index for c in second.detection.classes
                                          if c.target == repair.target)
        flagging_view = second  # the first view flagged nothing: the flags came from here
    assert ctx.verdict is not None
    family = ctx.verdict.triggers[repair.target].family
    before = _sizes(ctx.result.detection.classes, family)
    after = _sizes(flagging_view.detection.classes, family)
    others = [s for t, s in after.items() if t != repair.target and s is not None]
    return Rescan(views=views, flagged_targets=flagged,
                  anomaly_indices={t: float(anomaly[t]) for t in flagged},
                  forward_passes=passes, target_family=family,
                  target_size_before=before.get(repair.target),
                  target_size_after=after.get(repair.target),
                  others_median_after=float(np.median(others)) if others else None)


SIZE_FIELD = {"patch": "mask_l1", "universal": "universal_norm", "warp": "warp_norm"}


def _sizes(classes: list[ClassReverse], family: str) -> dict[int, float | None]:
    """Each class's reversed trigger size in `family` (None where it was not reversed)."""
    field = SIZE_FIELD.get(family)
    return {c.target: None if field is None or getattr(c, field) is None
            else float(getattr(c, field)) for c in classes}
