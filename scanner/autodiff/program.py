"""One ONNX graph that runs forward, loss heads and backward: what trigger reverse calls.

Loss = sum_n CE_n + bn_weight * BN-statistics loss. Both heads are built in the graph, and
their cotangents are written in closed form (the softmax cross-entropy gradient; the
batch mean/variance gradient) and seeded into the backward pass, so one session.run
returns logits, per-row CE, the BN loss and d loss / d input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, version_converter

from ..budget import row_bytes, rows_per_run
from ..errors import DataError, Inconclusive
from ..graph.load import default_opset
from ..graph.walk import first_input
from ..runtime import Device, make_session
from .backward import attach, backprop, dependents, float_type
from .context import VJPContext
from .rules_nn import windows_overlap

TARGET_INPUT = "shapscan/target_weights"
BN_WEIGHT_INPUT = "shapscan/bn_weight"
CE_OUTPUT = "shapscan/ce"
BN_LOSS_OUTPUT = "shapscan/bn_loss"
GRAD_OUTPUT = "shapscan/grad"
MAX_RUN_VALUES = 1 << 22  # input values per session run (16 MiB of float32)


@dataclass
class GradResult:
    logits: np.ndarray  # [N, K] (before the model's own Softmax, if it ends in one)
    ce: np.ndarray  # [N] cross-entropy per row against its target weights
    bn_loss: float  # BN-statistics loss (0 without bn_stats)
    grad: np.ndarray  # d (sum ce + bn_weight * bn_loss) / d input, shaped like the input


@dataclass(frozen=True)
class ProgramGraph:
    model: onnx.ModelProto
    input_name: str
    logits_name: str
    bn_layers: int


def image_input(proto: onnx.ModelProto) -> str:
    image = first_input(proto)
    if image is None:
        raise Inconclusive("model has no graph input to differentiate", rule_id="SS205")
    return image.name


def inference_bn_nodes(proto: onnx.ModelProto, x: str) -> list[onnx.NodeProto]:
    """BatchNormalization nodes (inference mode) whose input depends on `x`."""
    dep = dependents(proto.graph, x)
    return [n for n in proto.graph.node if n.op_type == "BatchNormalization"
            and n.input[0] in dep and len([o for o in n.output if o]) == 1]


def build_program(proto: onnx.ModelProto, bn_stats: bool = False) -> ProgramGraph:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    model = _with_scatter_add(model)
    x = image_input(model)
    dtype = float_type(model, x)
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    ctx = VJPContext(model, dtype)
    logits = classifier_logits(model, ctx)
    model.graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, elem, ["N", "K"]))
    model.graph.input.append(helper.make_tensor_value_info(BN_WEIGHT_INPUT, elem, []))

    logp = ctx.op("LogSoftmax", [logits], axis=1)
    picked = ctx.reduce("ReduceSum", ctx.op("Mul", [TARGET_INPUT, logp]), [1], keepdims=False)
    ce = ctx.op("Neg", [picked])
    mass = ctx.reduce("ReduceSum", TARGET_INPUT, [1], keepdims=True)
    # d/dlogits sum_n CE_n = softmax * sum_k T - T
    seeds = {logits: ctx.op("Sub", [ctx.op("Mul", [ctx.op("Exp", [logp]), mass]),
                                    TARGET_INPUT])}

    bn_nodes = inference_bn_nodes(model, x)
    if bn_stats and bn_nodes:
        losses = []
        for node in bn_nodes:
            loss, dz = _bn_head(ctx, node)
            losses.append(loss)
            z = node.input[0]
            seeds[z] = ctx.op("Add", [seeds[z], dz]) if z in seeds else dz
        bn_loss = ctx.add_all(losses)
    else:
        bn_loss = ctx.const(np.array(0.0))

    grad = backprop(model, ctx, x, seeds)
    for src, dst in ((ce, CE_OUTPUT), (bn_loss, BN_LOSS_OUTPUT), (grad, GRAD_OUTPUT)):
        ctx.nodes.append(helper.make_node("Identity", [src], [dst], name=dst))
    attach(model, ctx)
    del model.graph.output[:]
    model.graph.output.extend([
        helper.make_tensor_value_info(logits, elem, None),
        helper.make_tensor_value_info(CE_OUTPUT, elem, None),
        helper.make_tensor_value_info(BN_LOSS_OUTPUT, elem, None),
        helper.make_tensor_value_info(GRAD_OUTPUT, elem, None)])
    return ProgramGraph(model, x, logits, len(bn_nodes))


def _with_scatter_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """The backward of a MaxPool whose windows overlap (ResNet's 3x3 stride-2 stem) scatters
    with ScatterElements(reduction="add"), opset 16. An older model gets its program built
    on a copy converted to opset 17; the model itself (masks, export) is left as it is. If
    the conversion fails the MaxPool rule says why the op cannot be differentiated."""
    if (default_opset(model) or 0) >= 16 or not any(
            windows_overlap(n) for n in model.graph.node if n.op_type == "MaxPool"):
        return model
    try:
        return version_converter.convert_version(model, 17)
    except Exception:  # noqa: BLE001  the converter raises many types; the rule will refuse
        return model


RESHAPING_OPS = ("Flatten", "Reshape", "Squeeze", "Identity")


def classifier_logits(model: onnx.ModelProto, ctx: VJPContext) -> str:
    """`_logits_of`, refused (SS205, inconclusive) unless it is [N, K]."""
    logits = _logits_of(model, ctx)
    shape = ctx.static_shape(logits)
    if shape is not None and len(shape) != 2:
        raise Inconclusive(f"model output {logits} is not [N, K] (rank {len(shape)})",
                           rule_id="SS205", location=logits)
    return logits


def _logits_of(model: onnx.ModelProto, ctx: VJPContext) -> str:
    """The first output, or the input of the Softmax/LogSoftmax that produces it: a
    probability output would otherwise get a second softmax in the CE head. The softmax
    may sit behind reshapes (SqueezeNet: Softmax over [N, K], then Reshape to [N, K, 1, 1],
    read through graph.logits' Flatten); its input is taken when that is [N, K] itself."""
    out = model.graph.output[0].name
    producers = {o: n for n in model.graph.node for o in n.output}
    name = out
    while name in producers and producers[name].op_type in RESHAPING_OPS:
        name = producers[name].input[0]
    producer = producers.get(name)
    if producer is None or producer.op_type not in ("Softmax", "LogSoftmax"):
        return out
    if name == out:
        return producer.input[0]
    shape = ctx.static_shape(producer.input[0])
    return producer.input[0] if shape is not None and len(shape) == 2 else out


def _bn_head(ctx: VJPContext, node: onnx.NodeProto) -> tuple[str, str]:
    """(loss, weighted cotangent of the BN input z) for one BN node.

    loss = ||mean_b(z) - running_mean||^2 + ||var_b(z) - running_var||^2 with biased batch
    statistics over every axis but channels; d loss/dz = 2/M (dm + 2 dv (z - mean_b)).
    """
    z, mean_r, var_r = node.input[0], node.input[3], node.input[4]
    rank = ctx.rank(z, node)
    axes = [0] + list(range(2, rank))
    channel = ctx.const([1, -1] + [1] * (rank - 2))
    mean_b = ctx.reduce("ReduceMean", z, axes, keepdims=True)
    centered = ctx.op("Sub", [z, mean_b])
    var_b = ctx.reduce("ReduceMean", ctx.op("Mul", [centered, centered]), axes, keepdims=True)
    dm = ctx.op("Sub", [mean_b, ctx.op("Reshape", [mean_r, channel])])
    dv = ctx.op("Sub", [var_b, ctx.op("Reshape", [var_r, channel])])
    loss = ctx.op("Add", [ctx.reduce("ReduceSum", ctx.op("Mul", [dm, dm]), list(range(rank)),
                                     keepdims=False),
                          ctx.reduce("ReduceSum", ctx.op("Mul", [dv, dv]), list(range(rank)),
                                     keepdims=False)])
    per_channel = ctx.op("Div", [ctx.op("Size", [z]), ctx.op("Size", [mean_b])])
    count = ctx.op("Cast", [per_channel], to=helper.np_dtype_to_tensor_dtype(ctx.dtype))
    inner = ctx.op("Add", [dm, ctx.op("Mul", [ctx.op("Mul", [dv, centered]), ctx.const(2.0)])])
    scale = ctx.op("Div", [ctx.op("Mul", [BN_WEIGHT_INPUT, ctx.const(2.0)]), count])
    return loss, ctx.op("Mul", [inner, scale])


class GradientProgram:
    """Forward + loss + input gradient of a classifier in one onnxruntime session."""

    def __init__(self, proto: onnx.ModelProto, *, bn_stats: bool = False,
                 device: Device | None = None, threads: int | None = None,
                 max_bytes: int | None = None) -> None:
        built = build_program(proto, bn_stats)
        # rows per run under `max_bytes` (budget.py; None: only MAX_RUN_VALUES bounds it)
        self.max_rows = rows_per_run(row_bytes(proto), max_bytes)
        self.input_name = built.input_name
        self.bn_layers = built.bn_layers  # inference BN nodes on the input path
        self.bn_stats = bn_stats
        self._dtype = float_type(built.model, built.input_name)
        self._session = make_session(built.model, device, threads)
        self._outputs = [built.logits_name, CE_OUTPUT, BN_LOSS_OUTPUT, GRAD_OUTPUT]

    def run(self, x: np.ndarray, target_weights: np.ndarray,
            bn_weight: float = 0.0) -> GradResult:
        if target_weights.ndim != 2 or len(target_weights) != len(x):
            raise DataError(f"target_weights must be [N, K] with N = {len(x)}, "
                            f"got {target_weights.shape}")
        x = np.ascontiguousarray(x, self._dtype)
        target_weights = np.ascontiguousarray(target_weights, self._dtype)
        weight = np.asarray(bn_weight, self._dtype)
        # Rows are independent unless the BN-statistics head couples them through batch
        # statistics: then the batch is one run, unless the memory budget cuts it (each
        # part then matches the running statistics on its own, as a smaller batch would).
        # Otherwise chunks bound the memory of the backward pass (a 100-class model
        # reverses thousands of rows a step).
        rows = max(1, len(x)) if self.bn_stats else max(
            1, MAX_RUN_VALUES // max(1, int(np.prod(x.shape[1:]))))
        if self.max_rows:
            rows = min(rows, self.max_rows)
        parts = [self._session.run(self._outputs, {self.input_name: x[s:s + rows],
                                                   TARGET_INPUT: target_weights[s:s + rows],
                                                   BN_WEIGHT_INPUT: weight})
                 for s in range(0, max(1, len(x)), rows)]
        if len(parts) == 1:
            logits, ce, bn_loss, grad = parts[0]
            return GradResult(logits, ce, float(bn_loss), grad)
        logits, ce, bn_losses, grad = zip(*parts, strict=True)
        return GradResult(np.concatenate(logits), np.concatenate(ce),
                          float(np.sum(bn_losses)), np.concatenate(grad))
