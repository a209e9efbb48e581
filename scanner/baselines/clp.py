"""CLP: data-free channel Lipschitzness pruning (Zheng et al., ECCV 2022).

A backdoor channel must turn a small trigger into a large activation, so its upper channel
Lipschitz constant (UCLC) stands out within its layer. For an output channel k of a Conv,
optionally followed by BatchNormalization, UCLC_k is the largest singular value of the
kernel W_k reshaped to [C_in, kh·kw] and scaled by |γ_k| / sqrt(var_k + ε). Channels with
UCLC_k > mean + u·std of their layer are pruned. Only weights are read: no images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..findings import LayerInfo
from ..graph.activations import find_activations, graph_index


@dataclass(frozen=True)
class LayerLipschitz:
    layer: LayerInfo
    conv: str  # the Conv node the kernel comes from
    batchnorm: str | None  # the BatchNormalization node between Conv and activation, if any
    uclc: np.ndarray  # [C] upper channel Lipschitz constant
    threshold: float  # mean + u·std of `uclc`

    @property
    def pruned(self) -> np.ndarray:
        return np.flatnonzero(self.uclc > self.threshold)


def constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers, Constant-node outputs and Identity copies of either: the tensors whose
    values the file fixes (exporters without constant folding route weights via Identity)."""
    graph_inputs = {i.name for i in proto.graph.input}
    # an initializer that is also a graph input can be overridden by a feed: not constant
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
              if t.name not in graph_inputs}
    for node in proto.graph.node:  # topological order: an Identity's source comes first
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def channel_lipschitz(kernel: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """UCLC of every output channel of a Conv kernel [C_out, C_in/groups, kh, kw].

    `scale` is the per-channel BatchNormalization factor γ / sqrt(var + ε) when a BN follows.
    """
    kernel = np.asarray(kernel, np.float64)
    rows = kernel.reshape(kernel.shape[0], kernel.shape[1], -1)  # [C_out, C_in, kh·kw]
    # batched SVD: the largest singular value of each channel's [C_in, kh·kw] matrix
    uclc = np.linalg.svd(rows, compute_uv=False)[:, 0]
    if scale is not None:
        uclc = uclc * np.abs(np.asarray(scale, np.float64))
    return uclc


def _bn_scale(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> np.ndarray | None:
    names = list(node.input[1:5])
    if len(names) < 4 or any(n not in values for n in names):
        return None
    gamma, _, _, var = (values[n] for n in names)
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    return gamma / np.sqrt(var + eps)


def layer_lipschitz(proto: onnx.ModelProto, layers: Sequence[LayerInfo], u: float = 3.0
                    ) -> list[LayerLipschitz]:
    """UCLC per channel for each of `layers` fed by Conv[-BatchNormalization]; others
    (after a residual Add, a Gemm, a Concat) are skipped: their channels have no kernel."""
    wanted = {layer.name for layer in layers}
    producer, _ = graph_index(proto.graph)
    values = constants(proto)
    out: list[LayerLipschitz] = []
    for act in find_activations(proto):
        if act.layer.name not in wanted:
            continue
        node = producer.get(act.pre)
        batchnorm = None
        scale = None
        if node is not None and node.op_type == "BatchNormalization":
            scale = _bn_scale(node, values)
            if scale is None:
                continue
            batchnorm = node
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Conv" or node.input[1] not in values:
            continue
        kernel = values[node.input[1]]
        if kernel.ndim < 3 or kernel.shape[0] != act.layer.channels:
            continue
        uclc = channel_lipschitz(kernel, scale)
        # torch's default unbiased std, as in the authors' code
        std = float(uclc.std(ddof=1)) if len(uclc) > 1 else 0.0
        out.append(LayerLipschitz(act.layer, node.name, batchnorm.name if batchnorm else None,
                                  uclc, float(uclc.mean()) + u * std))
    return out
