"""Classifiers whose first output is not the class scores: skl2onnx's.

skl2onnx writes a classifier with two outputs: an int64 label first, then the
probabilities, by default as a ZipMap (a sequence of {class: probability} maps, one per
row; with `zipmap=False` a float [N, classes] tensor). Every stage reads the first output as
[N, classes] scores, so the analysed copy of such a model outputs the probability tensor
only (the ZipMap's input, or the float output itself), and the nodes that only made the
label or the maps are dropped. The shipped model and its repair keep all their outputs.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..errors import Inconclusive

ML_DOMAIN = "ai.onnx.ml"
ZIPMAP_HINT = ("convert the model with skl2onnx's zipmap=False option "
               "(to_onnx(model, X, options={'zipmap': False})) so that it outputs a "
               "probability tensor")


def _float_matrix(value: onnx.ValueInfoProto) -> bool:
    tensor = value.type.tensor_type
    return (value.type.HasField("tensor_type") and tensor.elem_type == TensorProto.FLOAT
            and tensor.HasField("shape") and len(tensor.shape.dim) == 2)


def score_output(proto: onnx.ModelProto) -> str | None:
    """The tensor to read as class scores when the first output is not a float tensor of
    rank >= 2 (None when it is: the model needs no copy). Inconclusive when none exists."""
    outputs = list(proto.graph.output)
    first = outputs[0].type
    if first.HasField("tensor_type") and first.tensor_type.elem_type in (
            TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16) \
            and len(first.tensor_type.shape.dim) != 1:
        return None
    producer = {o: n for n in proto.graph.node for o in n.output}
    values = {v.name: v for v in [*proto.graph.value_info, *outputs]}
    for out in outputs:
        node = producer.get(out.name)
        if node is not None and node.op_type == "ZipMap" and node.domain == ML_DOMAIN:
            scores = node.input[0]
            if scores in values and _float_matrix(values[scores]):
                return scores
        elif _float_matrix(out):
            return out.name
    kind = "a ZipMap sequence of maps" if any(
        producer.get(o.name) is not None and producer[o.name].op_type == "ZipMap"
        for o in outputs) else "not a float [N, classes] tensor"
    raise Inconclusive(f"inconclusive: the model's output {outputs[0].name!r} is {kind} and "
                       f"no probability tensor was found; {ZIPMAP_HINT}")


def scores_copy(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of `proto` whose only output is its class-score tensor, or None when its
    first output already is one (see score_output)."""
    scores = score_output(proto)
    if scores is None:
        return None
    values = {v.name: v for v in [*proto.graph.value_info, *proto.graph.output]}
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    needed, kept = {scores}, []
    for node in reversed(list(graph.node)):  # the nodes the scores depend on
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    del graph.output[:]
    value = helper.make_tensor_value_info(scores, TensorProto.FLOAT, None)
    value.type.CopyFrom(values[scores].type)
    graph.output.append(value)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]
    for value in [*graph.input, *graph.output]:  # skl2onnx leaves the batch dim anonymous;
        dims = value.type.tensor_type.shape.dim  # the prefix cache needs to see it
        if dims and not dims[0].HasField("dim_value") and not dims[0].dim_param:
            dims[0].dim_param = "N"
    if not any(n.domain == ML_DOMAIN for n in graph.node):
        opsets = [o for o in model.opset_import if o.domain != ML_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(opsets)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)
