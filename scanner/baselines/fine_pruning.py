"""Fine-Pruning (Liu et al., RAID 2018), the pruning half, on the few-shot images.

Backdoor neurons tend to be dormant on clean inputs. Channels of the last convolutional
activation layer are ranked by their mean activation on clean images and pruned, least
active first, as long as clean accuracy stays within budget. The fine-tuning half of the
paper needs a training set and a trainer; a few-shot ONNX gate has neither, so it is left
out (the comparison in DESIGN.md uses FP without fine-tuning as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..data import SHIFTS, ImageSet, Preprocess, shifted
from ..findings import LayerInfo
from ..graph.prefix import CoalitionEvaluator
from ..runtime import Device, make_session, run_batched


# 1-pixel and 2-pixel translations: cheap label-preserving copies that turn 1 image per
# class into enough rows for an accuracy that moves in steps finer than 10 points
@dataclass(frozen=True)
class FinePruningConfig:
    max_clean_drop: float = 0.10  # absolute drop of few-shot accuracy allowed
    max_fraction: float = 0.8  # at most this share of the layer's channels
    shifts: int = 8  # shifted copies of each few-shot image (at most len(SHIFTS))


@dataclass(frozen=True)
class FinePruningResult:
    layer: LayerInfo
    mean_activation: np.ndarray  # [C] on the clean (shifted) images
    order: np.ndarray  # channels, least active first
    pruned: np.ndarray  # order[:n]
    acc_curve: np.ndarray  # [max_n + 1] accuracy on the shifted set with order[:n] zeroed
    fewshot_acc_before: float  # on the unshifted few-shot images
    fewshot_acc_after: float
    forward_passes: int


def last_conv_layer(layers: list[LayerInfo]) -> LayerInfo | None:
    """The last feature-map (rank 4) activation layer in topological order."""
    return next((layer for layer in reversed(layers) if layer.rank == 4), None)


def mean_activation(proto: onnx.ModelProto, layer: LayerInfo, model_input: np.ndarray,
                    device: Device | None = None) -> np.ndarray:
    """Per-channel mean of `layer` over the images (and spatial positions)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]  # only the activation is needed: ORT prunes the head
    known = [v for v in (*proto.graph.value_info, *proto.graph.output) if v.name == layer.name]
    probe.graph.output.append(known[0] if known else onnx.helper.make_tensor_value_info(
        layer.name, onnx.TensorProto.FLOAT, None))
    session = make_session(probe, device)
    inits = {i.name for i in proto.graph.initializer}
    name = next(i.name for i in proto.graph.input if i.name not in inits)
    acts = run_batched(session, {name: model_input}, output=layer.name)
    axes = tuple(a for a in range(acts.ndim) if a != layer.axis)
    return acts.mean(axis=axes).astype(np.float64)


def fine_prune(proto: onnx.ModelProto, layers: list[LayerInfo], prep: Preprocess,
               images: ImageSet, device: Device | None = None,
               cfg: FinePruningConfig = FinePruningConfig()) -> FinePruningResult | None:
    """Prune the last conv activation layer by dormancy; None when the model has none."""
    layer = last_conv_layer(layers)
    if layer is None:
        return None
    rows = shifted(images, min(cfg.shifts, len(SHIFTS)))
    x = prep.to_model(rows.pixels)
    means = mean_activation(proto, layer, x, device)
    order = np.argsort(means, kind="stable")
    max_n = int(np.floor(cfg.max_fraction * layer.channels))
    coalitions = np.ones((max_n + 1, layer.channels), np.float32)
    for n in range(1, max_n + 1):
        coalitions[n, order[:n]] = 0.0
    evaluator = CoalitionEvaluator(proto, [layer], x, device)
    logits = evaluator.logits(coalitions)  # [max_n + 1, rows, classes]
    correct = logits.argmax(-1) == rows.labels[None]
    acc = correct.mean(-1)
    k = len(images)
    acc_orig = correct[:, :k].mean(-1)  # the unshifted images come first
    ok = ((acc[0] - acc <= cfg.max_clean_drop + 1e-9)
          & (acc_orig[0] - acc_orig <= cfg.max_clean_drop + 1e-9))
    # the paper stops at the first pruning step that costs too much accuracy
    bad = np.flatnonzero(~ok)
    n = int(bad[0] - 1) if len(bad) else max_n
    return FinePruningResult(layer, means, order, order[:n], acc, float(acc_orig[0]),
                             float(acc_orig[n]),
                             len(rows) + evaluator.forward_passes)
