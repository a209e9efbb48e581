"""Detection evidence beside the trigger norms, for what a norm cannot tell apart: a class
that is small to reach because of a backdoor, or because it is easy (FINDINGS; issue #21's
checkerboard on the object, where the bag and shirt classes of the same clean model were
smaller still).

* Selectivity. A backdoor rides on channels that the target's own images do not need
  (the premise of every pruning defence); an honest easy class's reversed trigger is made
  of the class's own features. Zeroing the top channels of a class's reversed trigger (by
  their first-order support, `autodiff.masks`) shows which: the trigger's target
  probability falls while the class's own images keep theirs (positive log ratio), or both
  fall together (negative). A policy can veto a class below a floor
  (detect.EvidenceRule; detection.selectivity_floor). Off by default: on the corpus a
  floor of -0.5 cut the false positives (31 -> 19 % calibration, 33 -> 0 % validation)
  but it vetoes real ResNet backdoors (the sample resnet_badnets' target sits at -0.97:
  residual paths carry its trigger past the zeroed channels).
* Max margin (MM-BD, Wang et al., S&P 2024). Without any data: for each class, how far its
  logit can be pushed above every other class's over the whole input box. A backdoor
  target's logit has a path that beats every other class for any input. Measured on the
  corpus it ranks the true target first more often than the norms do, but honest classes
  (Fashion-MNIST's sandal, some shapes) reach margins as large, so it is reported and
  available as a test (detection.margin_scale), not on by default.

A third candidate, the concentration of a trigger's channel support in its top 1 % of
channels (a backdoor on a few channels, an easy class on many), was measured and dropped:
ROC-AUC 0.48 on the calibration half (benchmarks/README.md, corpus_rules.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .autodiff import GradientProgram
from .autodiff.masks import MaskGradientProgram
from .data import ImageSet, Preprocess, shifted
from .optim import Adam
from .reverse import ReversedTrigger
from .shapley import softmax

PRUNE_SHARE = 0.02  # channels the selectivity test zeroes, as a share of all
OWN_COPIES = 8  # shifted copies of the class's own images in the selectivity test
SELECTIVITY_ROWS = 20  # images of other classes each trigger is stamped on there
EPS = 1e-4  # probabilities are compared as log ratios; this keeps a 0 finite


@dataclass(frozen=True)
class Evidence:
    max_margin: np.ndarray | None  # [classes]: the largest logit margin reached per class
    forward_passes: int = 0
    # (family, class) -> `selectivities` of zeroing the trigger's top channels
    selectivity: dict[tuple[str, int], float] = field(default_factory=dict)


def selectivities(program: MaskGradientProgram, prep: Preprocess, images: ImageSet,
                  triggers: dict[tuple[str, int], ReversedTrigger], n_classes: int,
                  rows_per_target: int = SELECTIVITY_ROWS, prune_share: float = PRUNE_SHARE
                  ) -> tuple[dict[tuple[str, int], float], int]:
    """Selectivity of every reversed trigger (see the module doc).

    Each trigger is stamped on up to `rows_per_target` images of the other classes; the
    support of channel c is the mean over those images of d margin / d mask_c on the
    stamped image minus the same on the clean image, margin = logit_target − logit_label.
    The top `prune_share` of channels by that support are zeroed, and the statistic is
    log(own after / own before) − log(stamped after / stamped before) of the target's
    probability, "own" being the class's images with shifted copies. Returns it per
    (family, class) and the image passes spent."""
    select: dict[tuple[str, int], float] = {}
    passes = 0
    rng = np.random.default_rng(0)
    k = max(1, int(np.ceil(prune_share * program.n_channels)))
    for (family, t), trig in sorted(triggers.items()):
        others = np.flatnonzero(images.labels != t)
        if len(others) > rows_per_target:
            others = np.sort(rng.choice(others, rows_per_target, replace=False))
        # the shifted copies of this class's images only: of every image at once they
        # were 9 copies of the whole set (5.4 GB for 1,000 images at 224x224)
        mine = images.labels == t
        own = shifted(ImageSet(images.pixels[mine], images.labels[mine]), OWN_COPIES).pixels
        if not len(others) or not len(own):
            continue
        clean = images.pixels[others]
        labels = images.labels[others]
        weights = np.zeros((len(others), n_classes), np.float32)
        weights[:, t] = 1.0
        weights[np.arange(len(others)), labels] -= 1.0
        stamped = trig.apply(clean)
        n = len(others)
        x = prep.to_model(np.concatenate([stamped, clean, own]))
        w = np.concatenate([weights, weights, np.zeros((len(own), n_classes), np.float32)])
        logits, grads = program.run(x, w)
        support = grads[:n].mean(0) - grads[n:2 * n].mean(0)
        coalition = np.ones(program.n_channels, np.float32)
        coalition[np.argsort(-support, kind="stable")[:k]] = 0.0
        after, _ = program.run(prep.to_model(np.concatenate([stamped, own])),
                               w[:n + len(own)] * 0, coalition)
        passes += len(x) + n + len(own)
        ratio = [np.log((softmax(a)[:, t].mean() + EPS) / (softmax(b)[:, t].mean() + EPS))
                 for a, b in ((after[n:], logits[2 * n:]), (after[:n], logits[:n]))]
        select[(family, t)] = float(ratio[0] - ratio[1])
    return select, passes


@dataclass(frozen=True)
class MarginConfig:
    steps: int = 100
    lr: float = 0.1
    restarts: int = 2


def max_margins(program: GradientProgram, prep: Preprocess, n_classes: int,
                cfg: MarginConfig = MarginConfig(), seed: int = 0,
                classes: Sequence[int] | None = None) -> tuple[np.ndarray, int]:
    """MM-BD: for each class (of `classes`, default all), the largest margin
    logit_t − max_{k≠t} logit_k found by gradient ascent over pixels in [0, 1] (a sigmoid
    parameterisation) from `restarts` random starts. Returns the margins [n_classes], NaN
    for a class not searched, and the image passes spent."""
    rng = np.random.default_rng(seed)
    c, h, w = prep.channels, prep.height, prep.width
    searched = np.arange(n_classes) if classes is None else np.asarray(classes, int)
    targets = np.tile(searched, cfg.restarts)
    param = rng.normal(0, 1.0, (len(targets), c, h, w)).astype(np.float32)
    adam = Adam([param], lr=cfg.lr)
    best = np.full(n_classes, -np.inf)
    best[np.setdiff1d(np.arange(n_classes), searched)] = np.nan
    rows = np.arange(len(targets))
    own = np.eye(n_classes, dtype=bool)[targets]
    eye = np.eye(n_classes, dtype=np.float32)
    rival = None
    for _ in range(cfg.steps):
        pixels = 1 / (1 + np.exp(-param))
        x = prep.to_model(pixels)
        if rival is None:
            rival = np.where(own, -np.inf, program.run(x, eye[targets]).logits).argmax(1)
        # CE weights e_target − e_rival sum to 0: the program's gradient is then exactly
        # −d (logit_target − logit_rival) / d input, so descending it widens the margin
        res = program.run(x, eye[targets] - eye[rival])
        rival = np.where(own, -np.inf, res.logits).argmax(1)
        np.maximum.at(best, targets, res.logits[rows, targets] - res.logits[rows, rival])
        adam.step([prep.grad_to_pixels(res.grad) * pixels * (1 - pixels)])
    return best, (cfg.steps + 1) * len(targets)
