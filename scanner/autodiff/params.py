"""Parameter gradients of a classifier's distillation loss: what recovery trains with.

The chosen initializers become graph inputs of a copy of the model, so one onnxruntime
session runs forward, a soft-target cross-entropy head and the backward pass for every
parameter at once, with the current values fed each step. Writing the values back into
the model's own initializers (`recover.py`) keeps its structure, opset and I/O.

Loss = sum_n CE(T_n, softmax(a * logits_n)), T_n soft targets (rows may carry a weight:
the loss scales with sum_k T_nk) and a the inverse distillation temperature; its
cotangent on the logits is a * (softmax(a * logits) * sum_k T - T), written in closed form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import DataError
from ..runtime import Device, make_session
from .backward import attach, backprop_many, float_type
from .context import VJPContext
from .program import TARGET_INPUT, _with_scatter_add, classifier_logits, image_input

# Which inputs of which ops are trainable parameters (when they are float initializers).
TRAINABLE_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1), "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2)}
FLOAT_ELEMS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
INV_TEMPERATURE_INPUT = "shapscan/inv_temperature"
CE_OUTPUT = "shapscan/ce"
INPUT_GRAD_OUTPUT = "shapscan/input_grad"
PARAM_GRAD_SUFFIX = "__param_grad"


@dataclass(frozen=True)
class ParameterGraph:
    model: onnx.ModelProto
    input_name: str
    logits_name: str
    params: tuple[str, ...]


@dataclass
class ParameterGradients:
    logits: np.ndarray  # [N, K]
    ce: np.ndarray  # [N]
    grads: list[np.ndarray]  # one per parameter, shaped like it
    input_grad: np.ndarray | None = None  # d loss / d input, when the program has it


def trainable_parameters(proto: onnx.ModelProto,
                         ops: Sequence[str] = tuple(TRAINABLE_SLOTS)) -> list[str]:
    """Float32/64 initializers in the trainable slots of the `ops` nodes, in graph order.
    Half-precision and integer (quantized) tensors are left out: recovery refuses them."""
    inits = {t.name: t for t in proto.graph.initializer}
    found: dict[str, None] = {}
    for node in proto.graph.node:
        for slot in TRAINABLE_SLOTS.get(node.op_type, ()) if node.op_type in ops else ():
            name = node.input[slot] if slot < len(node.input) else ""
            if name in inits and inits[name].data_type in FLOAT_ELEMS:
                found[name] = None
    return list(found)


def build_parameter_program(proto: onnx.ModelProto, params: Sequence[str],
                            input_grad: bool = False) -> ParameterGraph:
    """A copy of `proto` whose initializers `params` are graph inputs, with the soft-target
    CE head and one output `<param>__param_grad` per parameter (and INPUT_GRAD_OUTPUT, the
    gradient w.r.t. the image, with `input_grad`)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    model = _with_scatter_add(model)
    x = image_input(model)
    inits = {t.name: t for t in model.graph.initializer}
    missing = [p for p in params if p not in inits]
    if missing:
        raise ValueError(f"not initializers of the model: {', '.join(missing)}")
    for name in params:
        t = inits[name]
        model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    kept = [t for t in model.graph.initializer if t.name not in set(params)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)

    dtype = float_type(model, x)
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    ctx = VJPContext(model, dtype)
    logits = classifier_logits(model, ctx)
    model.graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, elem, ["N", "K"]))
    model.graph.input.append(helper.make_tensor_value_info(INV_TEMPERATURE_INPUT, elem, []))
    logp = ctx.op("LogSoftmax", [ctx.op("Mul", [logits, INV_TEMPERATURE_INPUT])], axis=1)
    ce = ctx.op("Neg", [ctx.reduce("ReduceSum", ctx.op("Mul", [TARGET_INPUT, logp]), [1],
                                   keepdims=False)])
    mass = ctx.reduce("ReduceSum", TARGET_INPUT, [1], keepdims=True)
    seed = ctx.op("Mul", [ctx.op("Sub", [ctx.op("Mul", [ctx.op("Exp", [logp]), mass]),
                                         TARGET_INPUT]), INV_TEMPERATURE_INPUT])
    wrts = list(params) + ([x] if input_grad else [])
    grads = backprop_many(model, ctx, wrts, {logits: seed})
    if input_grad:
        ctx.nodes.append(helper.make_node("Identity", [grads.pop()], [INPUT_GRAD_OUTPUT],
                                          name=INPUT_GRAD_OUTPUT))
    ctx.nodes.append(helper.make_node("Identity", [ce], [CE_OUTPUT], name=CE_OUTPUT))
    for p, g in zip(params, grads, strict=True):
        ctx.nodes.append(helper.make_node("Identity", [g], [p + PARAM_GRAD_SUFFIX],
                                          name=p + PARAM_GRAD_SUFFIX))
    attach(model, ctx)
    del model.graph.output[:]
    model.graph.output.extend(
        [helper.make_tensor_value_info(logits, elem, None),
         helper.make_tensor_value_info(CE_OUTPUT, elem, None)]
        + [helper.make_tensor_value_info(p + PARAM_GRAD_SUFFIX, elem, None) for p in params]
        + ([helper.make_tensor_value_info(INPUT_GRAD_OUTPUT, elem, None)] if input_grad else []))
    return ParameterGraph(model, x, logits, tuple(params))


class ParameterProgram:
    """Forward + soft-target CE + gradients of the chosen parameters, one session."""

    def __init__(self, proto: onnx.ModelProto, params: Sequence[str], *,
                 input_grad: bool = False, device: Device | None = None,
                 threads: int | None = None) -> None:
        built = build_parameter_program(proto, params, input_grad)
        self.input_grad = input_grad
        self.input_name = built.input_name
        self.params = built.params
        self._dtype = float_type(built.model, built.input_name)
        self._session = make_session(built.model, device, threads)
        self._outputs = [built.logits_name, CE_OUTPUT] + [
            p + PARAM_GRAD_SUFFIX for p in built.params] + (
            [INPUT_GRAD_OUTPUT] if input_grad else [])

    def run(self, x: np.ndarray, target_weights: np.ndarray, values: Mapping[str, np.ndarray],
            inv_temperature: float = 1.0) -> ParameterGradients:
        if target_weights.ndim != 2 or len(target_weights) != len(x):
            raise DataError(f"target_weights must be [N, K] with N = {len(x)}, "
                            f"got {target_weights.shape}")
        feeds = {self.input_name: np.ascontiguousarray(x, self._dtype),
                 TARGET_INPUT: np.ascontiguousarray(target_weights, self._dtype),
                 INV_TEMPERATURE_INPUT: np.asarray(inv_temperature, self._dtype)}
        feeds.update({p: values[p] for p in self.params})
        logits, ce, *grads = self._session.run(self._outputs, feeds)
        x_grad = grads.pop() if self.input_grad else None
        return ParameterGradients(logits, ce, grads, x_grad)
