"""Classifier outputs shaped [N, K, 1, 1] (a 1x1 conv head, DenseNet, SqueezeNet) or
[N, 1, K]: the copy every stage runs reads them as [N, K] logits.

One Flatten appended behind the first output is the only place this is handled: sessions,
the gradient program, masks and Shapley all read the runnable copy, while the model that
reports describe and export edits keeps its own outputs.
"""

from __future__ import annotations

import onnx
from onnx import helper

FLAT_SUFFIX = "/shapscan_flat"


def singleton_class_axes(value: onnx.ValueInfoProto) -> bool:
    """True when the output is [N, ..., K, ...] of rank >= 3 with every dim after the batch
    but one statically 1: its K values per row are the classes."""
    dims = value.type.tensor_type.shape.dim
    if len(dims) < 3 or not value.type.tensor_type.HasField("shape"):
        return False
    rest = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    return rest.count(1) == len(rest) - 1 and all(d is not None and d > 0 for d in rest)


def flat_logits(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` itself unless its first output has singleton class axes; then a copy whose
    first output is that output flattened to [N, K] (the other outputs unchanged)."""
    out = proto.graph.output[0]
    if not singleton_class_axes(out):
        return proto
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    flat = out.name + FLAT_SUFFIX
    graph.node.append(helper.make_node("Flatten", [out.name], [flat], name=flat, axis=1))
    dims = out.type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else (dims[0].dim_param or None)
    classes = max(d.dim_value for d in dims[1:])
    graph.output[0].CopyFrom(helper.make_tensor_value_info(
        flat, out.type.tensor_type.elem_type, [batch, classes]))
    return model
