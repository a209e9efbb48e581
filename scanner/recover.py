"""Recovery after zeroing: fine-tune the remaining parameters in onnxruntime.

Zeroing the channels that carry a backdoor also costs clean behaviour, most on small nets.
Recovery trains the zeroed model's weights, biases and BN scale/bias (never the zeroed
channels: their entries are frozen at zero) towards

- the ORIGINAL model's soft predictions (distillation at a temperature) on clean inputs:
  the few-shot images, augmented (shifts, optional horizontal flips, noise, mixup between
  them), and BN-synthesised inputs when the caller has them;
- the same clean prediction on those inputs stamped with every reversed trigger
  (unlearning: a stamped image must keep what the original said about the clean one).

Parameters are graph inputs of a training copy (`autodiff.params`); the values are written
back into the zeroed model's own initializers, so its graph, opset, I/O and dtype stay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .autodiff.params import TRAINABLE_SLOTS, ParameterProgram, trainable_parameters
from .data import ImageSet, Preprocess
from .errors import Inconclusive
from .graph.load import LoadedModel
from .graph.quantized import quantized
from .optim import Adam
from .reverse import ReversedTrigger
from .runtime import Device
from .shapley import softmax

log = logging.getLogger(__name__)
REFUSED_RULE = "SS205"  # the gradient rule: recovery cannot differentiate/train this model


@dataclass(frozen=True)
class RecoverConfig:
    steps: int = 300
    lr: float = 3e-4  # Adam
    batch: int = 64  # clean rows a step (as many stamped rows again, at most)
    ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "BatchNormalization",
                            "LayerNormalization")  # whose parameters are trained
    temperature: float = 2.0  # distillation temperature
    unlearn_weight: float = 1.0  # weight of a stamped row against a clean one
    stamped_share: float = 0.5  # stamped rows per clean row
    trigger_gain: tuple[float, float] = (1.0, 2.0)  # stamped with a gain drawn from this
    shift: int = 3  # largest translation, pixels (zero fill)
    flip: bool = False  # horizontal flips: only where the data allows it
    noise: float = 0.03  # std of Gaussian pixel noise
    mixup: float = 0.4  # Beta(a, a) mixing of a row with another (0: off)
    # share of the one-hot (mixed) label in each row's target; the rest is the original's
    # softened prediction
    label_weight: float = 0.0
    # Adversarial unlearning (I-BAU style): per flagged class a universal perturbation,
    # started from its reversed universal trigger and kept within that trigger's L2 norm
    # times the largest gain, is pushed each step up the student's loss; its stamped rows
    # (this share of the batch) are trained back. The reversed triggers were found on the
    # original model: this one follows the student as it changes. 0: off.
    adversarial_share: float = 0.0
    adversarial_lr: float = 0.1  # ascent step, as a share of the radius
    # honest rows (neither mixed image of a flagged class) are distilled with this share of
    # the flagged classes' mass in the original's prediction (0: removed)
    flagged_mass: float = 0.0
    # ... after capping it at what the original gives the un-augmented source images: the
    # mass a trigger-like augmentation adds goes, the honest share stays
    flagged_cap: bool = False
    # share of each batch drawn from the flagged classes' images (0: as many as any class)
    flagged_share: float = 0.0
    seed: int = 0


@dataclass
class RecoveryResult:
    model: onnx.ModelProto
    steps: int
    seconds: float
    parameters: int  # trainable values
    frozen: int  # of them, held at zero (zeroed channels)
    loss_first: float
    loss_last: float
    history: list[float] = field(default_factory=list)
    # the trained initializers by name: `write_back` puts them into another copy of the
    # zeroed graph (the scan's batch-free float copy for its re-scan, the export)
    values: dict[str, np.ndarray] = field(default_factory=dict)


def recoverable(model: onnx.ModelProto) -> str | None:
    """Why recovery cannot train this model, or None. Half-precision and quantized (QDQ)
    weights would need a float32 master copy and re-quantization: refused."""
    if quantized(model):
        return "the model is quantized (QDQ/integer ops): recovery trains float weights only"
    half = [t.name for t in model.graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)]
    if half:
        return f"the model stores its weights in half precision ({half[0]}, ...)"
    return None


def untrainable(model: LoadedModel) -> str | None:
    """Why the scan cannot train `model`'s weights, or None: `recoverable`'s reasons, and a
    model analysed through a float copy (trained weights would not be the shipped graph's)."""
    return recoverable(model.proto) or (
        "the model is analysed through a float copy" if model.layer_graph else None)


def frozen_entries(original: onnx.ModelProto, zeroed: onnx.ModelProto,
                   params: Sequence[str]) -> dict[str, np.ndarray]:
    """Per parameter, a boolean mask of the entries recovery must hold at zero.

    The export zeroes a channel by folding it into the producing layer: the out-channel
    slice of a Conv/Gemm/MatMul weight (and its bias entry), or the BN scale and bias. A
    channel is cut when its slice is zero in the zeroed model and was not in the
    original; its bias / BN partner entry is frozen with it (a bias that happened to be 0
    would otherwise bring the channel back). Any other entry the export changed is
    frozen too."""
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in zeroed.graph.initializer}
    wanted = set(params)
    frozen = {p: np.zeros(after[p].shape, bool) for p in params}
    for p in params:
        if p in before and before[p].shape == after[p].shape:
            frozen[p] |= (before[p] != after[p]) & (after[p] == 0)
    for node in zeroed.graph.node:
        slots = TRAINABLE_SLOTS.get(node.op_type)
        if not slots:
            continue
        names = [node.input[s] if s < len(node.input) else "" for s in slots]
        axis = _channel_axis(node)
        if axis is None or names[0] not in wanted or names[0] not in before:
            continue
        w0, w1 = before[names[0]], after[names[0]]
        if w0.shape != w1.shape or w1.ndim == 0:
            continue
        other = tuple(i for i in range(w1.ndim) if i != axis % w1.ndim)
        cut = np.all(w1 == 0, axis=other) & np.any(w0 != 0, axis=other)
        if not cut.any():
            continue
        index = [slice(None)] * w1.ndim
        index[axis % w1.ndim] = cut
        frozen[names[0]][tuple(index)] = True
        partner = names[1]
        if partner in wanted and after[partner].shape == cut.shape:
            frozen[partner] |= cut
    return frozen


def _channel_axis(node: onnx.NodeProto) -> int | None:
    """The out-channel axis of the first trainable operand (weight or BN scale)."""
    if node.op_type in ("Conv", "BatchNormalization"):
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None  # MatMul's slot 0 may be the activations; LayerNorm has no channels to cut


@dataclass
class Batch:
    pixels: np.ndarray  # [n, C, H, W] in [0, 1]
    first: np.ndarray  # pool row each was made from
    second: np.ndarray  # pool row mixed in (== first where not mixed)
    share: np.ndarray  # weight of `first` in the mix (1 where not mixed)


def augment(pixels: np.ndarray, n: int, cfg: RecoverConfig, rng: np.random.Generator,
            p: np.ndarray | None = None) -> Batch:
    """`n` augmented rows drawn from `pixels` (NCHW in [0, 1]), row i with probability
    p[i] (uniform by default)."""
    first = rng.choice(len(pixels), n, p=p) if p is not None else rng.integers(
        0, len(pixels), n)
    x = _translate(pixels[first], rng.integers(-cfg.shift, cfg.shift + 1, size=(n, 2)))
    if cfg.flip:
        flip = rng.random(n) < 0.5
        x[flip] = x[flip][..., ::-1]
    second, share = first.copy(), np.ones(n, np.float32)
    if cfg.mixup > 0:
        mixed = rng.random(n) < 0.5
        lam = rng.beta(cfg.mixup, cfg.mixup, n).astype(np.float32)
        share = np.where(mixed, np.maximum(lam, 1 - lam), 1.0).astype(np.float32)
        partner = rng.permutation(n)
        second = np.where(mixed, first[partner], first)
        s = share[:, None, None, None]
        x = np.where(mixed[:, None, None, None], s * x + (1 - s) * x[partner], x)
    if cfg.noise > 0:
        x = x + rng.normal(0.0, cfg.noise, x.shape).astype(np.float32)
    return Batch(np.clip(x, 0.0, 1.0).astype(np.float32), first, second, share)


def _translate(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    h, w = x.shape[2:]
    for i, (dy, dx) in enumerate(shifts.tolist()):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def recover(original: onnx.ModelProto, zeroed: onnx.ModelProto, prep: Preprocess,
            clean: ImageSet, triggers: Sequence[ReversedTrigger],
            cfg: RecoverConfig = RecoverConfig(), *, targets: Sequence[int] = (),
            synthesised: ImageSet | None = None, device: Device | None = None,
            progress: Callable[[int, int], None] | None = None) -> RecoveryResult:
    """Fine-tune `zeroed` (the original with channels zeroed; may be the original itself
    for fine-tuning alone) and return it with its trained initializers written back.

    `clean` and `synthesised`: labelled pixels (NCHW in [0, 1]); `triggers`: the reversed
    triggers to unlearn (none: distillation only); `targets`: the flagged classes."""
    start = time.perf_counter()
    why = recoverable(zeroed)
    if why:
        raise Inconclusive(f"recovery refused: {why}", rule_id=REFUSED_RULE)
    params = trainable_parameters(zeroed, cfg.ops)
    if not params:
        raise Inconclusive("recovery refused: no float Conv/Gemm/MatMul/BatchNormalization "
                           "parameters to train", rule_id=REFUSED_RULE)
    rng = np.random.default_rng(cfg.seed)
    pool = clean if synthesised is None else ImageSet(
        np.concatenate([clean.pixels, synthesised.pixels]),
        np.concatenate([clean.labels, synthesised.labels]))
    adversaries = _adversaries(triggers, targets, cfg) if cfg.adversarial_share > 0 else []
    n_adv = int(round(cfg.batch * cfg.adversarial_share)) if adversaries else 0
    student = ParameterProgram(zeroed, params, input_grad=bool(n_adv), device=device)
    teacher = ParameterProgram(original, [], device=device)
    values = {t.name: numpy_helper.to_array(t).astype(np.float32).copy()
              for t in zeroed.graph.initializer if t.name in set(params)}
    frozen = frozen_entries(original, zeroed, params)
    keep = {p: (~frozen[p]).astype(np.float32) for p in params}
    adam = Adam([values[p] for p in params], lr=cfg.lr)
    inv_t = 1.0 / cfg.temperature
    n_stamp = int(round(cfg.batch * cfg.stamped_share)) if triggers else 0
    history: list[float] = []
    draw = _draw(pool.labels, targets, cfg.flagged_share)
    reference = softmax(teacher.run(prep.to_model(pool.pixels),
                                     np.zeros((len(pool), 1), np.float32), {}).logits
                         / cfg.temperature) if cfg.flagged_cap else None
    for step in range(1, cfg.steps + 1):
        b = augment(pool.pixels, cfg.batch, cfg, rng, draw)
        # the teacher's CE head is unused: zero targets broadcast over the classes
        logits = teacher.run(prep.to_model(b.pixels), np.zeros((cfg.batch, 1), np.float32),
                             {}).logits
        soft = _targets(logits, b, pool.labels, targets, cfg, reference)
        rows, weights = [b.pixels], [soft]
        if n_stamp:
            which = rng.integers(0, cfg.batch, n_stamp)
            stamped = np.empty((n_stamp, *b.pixels.shape[1:]), np.float32)
            for j, trig in enumerate(rng.integers(0, len(triggers), n_stamp).tolist()):
                gain = float(rng.uniform(*cfg.trigger_gain))
                stamped[j] = triggers[trig].apply(b.pixels[which[j]:which[j] + 1], gain)[0]
            rows.append(stamped)
            weights.append(cfg.unlearn_weight * soft[which])
        if n_adv:
            adv_rows = rng.integers(0, cfg.batch, n_adv)
            adv_of = rng.integers(0, len(adversaries), n_adv)
            deltas = np.stack([adversaries[a].delta for a in adv_of.tolist()])
            rows.append(np.clip(b.pixels[adv_rows] + deltas, 0.0, 1.0))
            weights.append(cfg.unlearn_weight * soft[adv_rows])
        res = student.run(prep.to_model(np.concatenate(rows)),
                          np.concatenate(weights) / cfg.batch, values, inv_t)
        if n_adv and res.input_grad is not None:
            g = prep.grad_to_pixels(res.input_grad[-n_adv:])
            for a, adv in enumerate(adversaries):
                adv.ascend(g[adv_of == a].sum(axis=0), cfg.adversarial_lr)
        history.append(float(res.ce.sum()))
        adam.step([g * keep[p] for p, g in zip(params, res.grads, strict=True)])
        for p in params:
            values[p][frozen[p]] = 0.0
        if progress:
            progress(step, cfg.steps)
    model = write_back(zeroed, values, describe(cfg))
    return RecoveryResult(model, cfg.steps, time.perf_counter() - start,
                          int(sum(v.size for v in values.values())),
                          int(sum(f.sum() for f in frozen.values())),
                          history[0] if history else 0.0, history[-1] if history else 0.0,
                          history, values)


@dataclass
class _Adversary:
    """A universal perturbation kept in an L2 ball; ascends the student's loss."""

    delta: np.ndarray  # [C, H, W] pixels
    radius: float

    def ascend(self, grad: np.ndarray, lr: float) -> None:
        norm = float(np.linalg.norm(grad))
        if norm > 0:
            self.delta += (lr * self.radius / norm) * grad.astype(np.float32)
        size = float(np.linalg.norm(self.delta))
        if size > self.radius:
            self.delta *= self.radius / size


def _adversaries(triggers: Sequence[ReversedTrigger], targets: Sequence[int],
                 cfg: RecoverConfig) -> list[_Adversary]:
    out = []
    for t in targets:
        universal = [tr for tr in triggers if tr.target == t and tr.family == "universal"]
        if universal:
            start = universal[0].pattern.astype(np.float32).copy()
            out.append(_Adversary(start, float(np.linalg.norm(start)) * cfg.trigger_gain[1]))
    return out


def _targets(logits: np.ndarray, b: Batch, labels: np.ndarray, flagged: Sequence[int],
             cfg: RecoverConfig, reference: np.ndarray | None = None) -> np.ndarray:
    """What each row is trained towards: the original model's softened prediction, with
    the flagged classes' mass scaled by `flagged_mass` (0: removed) where neither mixed
    image belongs to them, after capping it at the un-augmented images' (`reference`,
    with `flagged_cap`): the original is backdoored, and its dark knowledge leans towards
    the target on trigger-like inputs. Blended with the mixed labels (`label_weight`)."""
    k = logits.shape[1]
    soft = softmax(logits / cfg.temperature)
    flagged = [t for t in flagged if 0 <= t < k]
    if flagged and (cfg.flagged_mass < 1.0 or reference is not None):
        honest = ~np.isin(labels[b.first], flagged) & ~np.isin(labels[b.second], flagged)
        cell = np.ix_(honest, flagged)
        if reference is not None:
            s = b.share[honest, None]
            cap = (s * reference[np.ix_(b.first[honest], flagged)]
                   + (1 - s) * reference[np.ix_(b.second[honest], flagged)])
            soft[cell] = np.minimum(soft[cell], cap)
        soft[cell] *= cfg.flagged_mass
        soft /= np.maximum(soft.sum(axis=1, keepdims=True), 1e-12)
    onehot = np.eye(k, dtype=np.float32)
    mixed = (b.share[:, None] * onehot[labels[b.first] % k]
             + (1 - b.share[:, None]) * onehot[labels[b.second] % k])
    return ((1 - cfg.label_weight) * soft + cfg.label_weight * mixed).astype(np.float32)


def _draw(labels: np.ndarray, flagged: Sequence[int], share: float) -> np.ndarray | None:
    """Per pool row, the probability a batch row is made from it: `share` spread over the
    flagged classes' rows, the rest over the others (None: uniform)."""
    mine = np.isin(labels, list(flagged))
    if share <= 0 or not mine.any() or mine.all():
        return None
    return np.where(mine, share / mine.sum(), (1 - share) / (~mine).sum())


RECOVER_KEY = "shapscan.recover"  # metadata_props: how the weights were fine-tuned


@dataclass(frozen=True)
class Recovered:
    """What the scan keeps of a recovery: the trained initializers and how they were made."""

    values: dict[str, np.ndarray]
    description: str


def describe(cfg: RecoverConfig) -> str:
    return (f"steps={cfg.steps} lr={cfg.lr:g} temperature={cfg.temperature:g} "
            f"label_weight={cfg.label_weight:g} unlearn_weight={cfg.unlearn_weight:g}")


def write_back(zeroed: onnx.ModelProto, values: dict[str, np.ndarray],
               description: str) -> onnx.ModelProto:
    """A copy of `zeroed` with the initializers in `values` replaced (same names, dtypes
    and dims) and RECOVER_KEY in its metadata."""
    model = onnx.ModelProto()
    model.CopyFrom(zeroed)
    for i, t in enumerate(model.graph.initializer):
        if t.name in values:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(values[t.name].astype(dtype).reshape(t.dims), t.name))
    meta = {p.key: p for p in model.metadata_props}
    if RECOVER_KEY in meta:
        meta[RECOVER_KEY].value = description
    else:
        model.metadata_props.add(key=RECOVER_KEY, value=description)
    return model
