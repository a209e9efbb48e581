"""Floating-point precision of a graph: float16 / bfloat16 models are analysed in float32.

Trigger reverse differentiates the model and Shapley estimation evaluates thousands of masked
copies of it; onnxruntime's CPU kernels for float16 are few and slow, and half-precision
gradients of a 1e-3 penalty underflow. So a model that computes in float16 or bfloat16
(stored that way, or converted with float32 inputs and outputs kept) is analysed as a
float32 copy of the same graph, checked against the original on a probe input; the
repaired model is written from the original and keeps its precision.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import Inconclusive
from .compare import copy_difference, probe_input
from .walk import graphs

LOW_PRECISION = frozenset({TensorProto.FLOAT16, TensorProto.BFLOAT16})

# The float32 copy may differ from a half-precision original by rounding alone: float16 has
# 11 significant bits, and a deep net's logits move by up to a few percent of their scale.
WIDEN_ATOL = 0.05


def _convert(tensor: onnx.TensorProto, target: int) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor).astype(helper.tensor_dtype_to_np_dtype(target))
    return numpy_helper.from_array(array, tensor.name)


def retype(proto: onnx.ModelProto, source: Collection[int], target: int,
           keep: Collection[str] = ()) -> onnx.ModelProto:
    """A copy computing in `target` wherever `proto` computes in a type of `source`:
    initializers, tensor attributes (Constant, ConstantOfShape), Cast targets, dtype
    attributes and the types of inputs, outputs and value_info, in every (sub)graph.
    Tensors named in `keep` (and their Constant producers) are left as they are."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for g in graphs(model.graph):
        for i, t in enumerate(g.initializer):
            if t.data_type in source and t.name not in keep:
                g.initializer[i].CopyFrom(_convert(t, target))
        for node in g.node:
            kept = node.op_type == "Constant" and node.output[0] in keep
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in source \
                        and not kept:
                    attr.t.CopyFrom(_convert(attr.t, target))
                elif attr.type == onnx.AttributeProto.INT and attr.i in source and (
                        (node.op_type == "Cast" and attr.name == "to") or attr.name == "dtype"):
                    attr.i = target
                elif node.op_type == "Constant" and attr.name == "value_float" \
                        and TensorProto.FLOAT in source and not kept:
                    attr.CopyFrom(helper.make_attribute("value", numpy_helper.from_array(
                        np.array(attr.f, helper.tensor_dtype_to_np_dtype(target)))))
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type in source and vi.name not in keep:
                vi.type.tensor_type.elem_type = target
    return model


def low_precision(proto: onnx.ModelProto) -> str | None:
    """'float16' or 'bfloat16' when the graph holds tensors of that type, else None."""
    found: set[int] = set()
    for g in graphs(proto.graph):
        found.update(t.data_type for t in g.initializer)
        found.update(vi.type.tensor_type.elem_type for vi in [*g.input, *g.output,
                                                              *g.value_info])
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    found.add(attr.t.data_type)
                elif node.op_type == "Cast" and attr.name == "to":
                    found.add(attr.i)
    low = sorted(found & LOW_PRECISION)
    return TensorProto.DataType.Name(low[0]).lower() if low else None


def widen(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 copy of a float16 / bfloat16 graph, checked against it on a probe input
    (Inconclusive if onnxruntime cannot run either, or they disagree beyond rounding)."""
    wide = retype(proto, LOW_PRECISION, TensorProto.FLOAT)
    probe = probe_input(proto)
    if probe is None:  # dynamic height/width: nothing to probe with; the retyping is mechanical
        return wide
    precision = low_precision(proto)
    d = copy_difference(proto, wide, probe, f"this {precision} model and its float32 copy",
                        probe.astype(np.float32))
    if not d.relative <= WIDEN_ATOL:
        raise Inconclusive(f"inconclusive: the float32 copy of this {precision} model differs "
                           f"from it by {d.difference:.3g} on output {d.output!r} (more than "
                           f"rounding; scale {d.scale:.3g})")
    return wide
