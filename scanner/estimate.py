"""How long a scan will take, said before the long stages start when the model is large.

Trigger reverse is the first long stage, and the others scale with the same thing (what
one image costs the model), so the forecast times one gradient pass over a few of the
scan's own images and multiplies: steps x rows per step x seconds per row. On the sample
zoo a scan that finds a backdoor and repairs it took 2-3 times its reverse (cnn_badnets
88 s for a 29 s reverse, resnet_badnets 214 s for 108 s, on busy cores); a clean few-shot
scan with its second view on synthesised inputs about 1.5-2 times.
"""

from __future__ import annotations

import time

import numpy as np

from .autodiff import GradientProgram
from .context import ScanContext
from .data import ImageSet, Preprocess
from .progress import Progress, duration
from .reverse import FAMILIES, ReverseConfig

ANNOUNCE_OVER_S = 60.0  # forecast a reverse at least this long: "large"
PROBE_ROWS = 64  # a quarter of a zoo reverse step: small batches overstate the per-row cost
WHOLE_SCAN = (2.0, 3.0)  # the whole scan / the reverse, on the sample zoo (see above)


def reverse_rows(labels: np.ndarray, n_classes: int, cfg: ReverseConfig) -> int:
    """Rows of one reverse step: for every family and class, the images of other classes
    it is reversed on (at most reverse.py's per-class share)."""
    families = len(cfg.families or FAMILIES)
    limit = max(cfg.min_images, cfg.max_rows // max(1, families * n_classes))
    others = len(labels) - np.bincount(labels, minlength=n_classes)[:n_classes]
    return int(families * np.minimum(others, limit).sum())


def row_seconds(program: GradientProgram, prep: Preprocess, images: ImageSet,
                n_classes: int) -> float:
    """Seconds one image costs a gradient pass (the second of two timed runs: the first
    pays for allocations)."""
    idx = np.resize(np.arange(len(images)), PROBE_ROWS)
    x = prep.to_model(images.pixels[idx])
    weights = np.zeros((len(idx), n_classes), np.float32)
    weights[np.arange(len(idx)), images.labels[idx]] = 1.0 / len(idx)
    program.run(x, weights)
    start = time.perf_counter()
    program.run(x, weights)
    return (time.perf_counter() - start) / len(idx)


def forecast_reverse(program: GradientProgram, prep: Preprocess, images: ImageSet,
                     n_classes: int, cfg: ReverseConfig, steps: int) -> float:
    """Seconds the first view's trigger reverse will take (at most: it stops early once
    every trigger has stopped shrinking)."""
    return (row_seconds(program, prep, images, n_classes)
            * reverse_rows(images.labels, n_classes, cfg) * steps)


def announce(progress: Progress, reverse_s: float, model: str) -> bool:
    """Say the forecast when the model is large; True when it was said."""
    if reverse_s < ANNOUNCE_OVER_S:
        return False
    low, high = (duration(k * reverse_s) for k in WHOLE_SCAN)
    progress.announce(f"{model}: a long scan ahead: trigger reverse alone will take about "
                      f"{duration(reverse_s)} on this machine as it is now, the whole scan "
                      f"about {low} to {high} if a backdoor is found and repaired")
    return True


def announce_if_large(ctx: ScanContext) -> None:
    """Before the trigger reverse: time one gradient pass over a few of the scan's images
    and say how long the scan will take when that is long (a quiet scan skips the probe)."""
    if not ctx.progress.enabled or ctx.program is None or ctx.images is None:
        return
    reverse_s = forecast_reverse(ctx.program, ctx.prep, ctx.images, ctx.n_classes,
                                 ctx.opts.reverse, ctx.policy.detection.reverse_steps)
    announce(ctx.progress, reverse_s, ctx.model.path.name)
