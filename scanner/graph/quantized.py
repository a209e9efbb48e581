"""Integer-quantized QDQ models are analysed as a float copy of the same graph.

Edge toolchains such as onnxruntime's quantizer write int8 models in the QDQ format:
weights stored as integers behind DequantizeLinear, and every activation tensor passed
through QuantizeLinear -> DequantizeLinear. They also fold each ReLU into the
QuantizeLinear after it: an unsigned range starting at zero clips negatives away, so the
graph has no activation node left to mask. The float copy undoes that:

* DequantizeLinear of a constant becomes the float constant it computes;
* a QuantizeLinear -> DequantizeLinear pair on the output of a layer (Conv, Gemm, MatMul,
  BatchNormalization, Add) whose range starts at exactly zero, and that no activation
  reads, becomes Clip(0, top of the range): the folded ReLU, found as an activation layer
  (several pairs on one tensor, one per reader, make one layer);
* every other pair becomes Min(Max(x, bottom), top): the range still clips outliers, and
  Min/Max is no activation layer. A pair whose range cannot be read (a computed or
  per-axis scale) makes the model inconclusive: dropping it could drop a layer unseen.

The copy drops only the rounding. It is checked against the original on probe inputs
and refused when it differs by more (on the zoo's int8 cnn_badnets and resnet_badnets, 500
test images: 1.8% and 3.9% of the logit scale at most, 99.2% and 99.8% the same class).
Its activation tensors carry the original DequantizeLinear output names, so the repaired
model is the original QDQ graph with a constant mask multiplied in after them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import Inconclusive
from .activations import ACTIVATION_OPS
from .compare import copy_difference, probe_input
from .walk import first_input, graphs

# The producers whose output a folded ReLU follows: a layer's pre-activation.
_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Add"})
_RANGES = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
           onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767)}
# int8 rounding moves a small net's logits by a few percent of their scale (see above);
# more means the float copy is not the model that ships
QDQ_ATOL = 0.1


# The ops of integer-quantized graphs (QDQ, QOperator, dynamic). None has a gradient rule: a
# QDQ model is analysed through its float copy (below), the others stop with the hint.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "ConvInteger", "MatMulInteger"})
QUANTIZED_HINT = ("a quantized model: scan the float model it was quantized from, then "
                  "quantize the repaired one")


def quantized(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANTIZED_OPS for g in graphs(proto.graph) for n in g.node)


def is_qdq(proto: onnx.ModelProto) -> bool:
    """Activations pass through QuantizeLinear -> DequantizeLinear pairs (the QDQ format)."""
    ops = {n.op_type for n in proto.graph.node}
    return "QuantizeLinear" in ops and "DequantizeLinear" in ops and not ops & (
        QUANTIZED_OPS - {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def dequantize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The float copy of a QDQ model (see the module docstring), checked on probe inputs."""
    model = _float_copy(proto)
    closest = None
    for probe in _probes(proto):
        d = copy_difference(proto, model, probe, "this quantized model and its float copy")
        if d.relative <= QDQ_ATOL:
            return model
        closest = d if closest is None or d.relative < closest.relative else closest
    if closest is not None:
        raise Inconclusive(f"inconclusive: the float copy of this quantized model differs from "
                           f"it by {closest.difference:.3g} on output {closest.output!r} (more "
                           f"than int8 rounding; scale {closest.scale:.3g})")
    return model  # a dynamic image size: nothing to probe with


def _probes(proto: onnx.ModelProto) -> list[np.ndarray]:
    """Inputs for the differential check. Noise far outside the range every activation was
    calibrated on says nothing about rounding, so a quantized image input is probed inside
    its quantization range. Otherwise the image range is not known before preprocessing is
    resolved (a model may normalise [0, 1] or [0, 255] pixels itself): the copy must agree
    on one of standard normal, [0, 1] and [0, 255] inputs."""
    probe = probe_input(proto)
    if probe is None:
        return []
    rng = np.random.default_rng(0)
    name = first_input(proto).name
    quant = next((n for n in proto.graph.node
                  if n.op_type == "QuantizeLinear" and n.input[0] == name), None)
    span = None if quant is None else _range(quant, _constants(proto.graph))
    spans = [span] if span is not None else [(0.0, 1.0), (0.0, 255.0)]
    uniform = [(lo + (hi - lo) * rng.random(probe.shape)).astype(probe.dtype)
               for lo, hi in spans]
    return uniform if span is not None else [probe, *uniform]


def _constants(graph: onnx.GraphProto):
    """name -> the initializer's value as an array (None: not a constant), converted only
    when asked for: most initializers are weights no range lookup needs."""
    tensors = {t.name: t for t in graph.initializer}

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(tensors[name]) if name in tensors else None

    return const


def _float_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    graph = proto.graph
    consts = {t.name for t in graph.initializer}
    const = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inputs = {i.name for i in graph.input} - consts

    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    rename: dict[str, str] = {}  # a dropped tensor -> the tensor that replaces it
    built: dict[tuple[str, tuple[float, float]], str] = {}  # (x, range) -> its pair's output
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in consts:
            new_inits.append(numpy_helper.from_array(_dequantize(node, const), node.output[0]))
        elif node.op_type == "DequantizeLinear" and producer.get(node.input[0]) is not None \
                and producer[node.input[0]].op_type == "QuantizeLinear":
            continue  # folded into its QuantizeLinear below
        elif node.op_type == "DequantizeLinear":
            raise Inconclusive(f"inconclusive: DequantizeLinear node {node.name!r} reads "
                               f"{node.input[0]!r}, neither a constant nor a QuantizeLinear")
        elif node.op_type == "QuantizeLinear":
            dqs = consumers.get(node.output[0], [])
            if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or any(
                    o.name == node.output[0] for o in graph.output):
                raise Inconclusive(f"inconclusive: QuantizeLinear node {node.name!r} feeds "
                                   "an integer op, not a DequantizeLinear")
            x, out = node.input[0], dqs[0].output[0]
            span = _range(node, const)
            if span is None:  # dropping it could drop a folded ReLU, a layer, unseen
                raise Inconclusive(f"inconclusive: the range of QuantizeLinear node "
                                   f"{node.name!r} cannot be read (computed or per-axis "
                                   "scale, or an integer type without a fixed range)")
            if (x, span) in built:  # one pair per reader of x (DedicatedQDQPair): one layer
                rename.update({d.output[0]: built[(x, span)] for d in dqs})
                continue
            built[(x, span)] = out
            rename.update({d.output[0]: out for d in dqs[1:]})  # one tensor for all readers
            source = producer.get(x)
            lo, hi = f"{out}__qdq_min", f"{out}__qdq_max"
            new_inits += [numpy_helper.from_array(np.array(v, np.float32), n)
                          for v, n in zip(span, (lo, hi), strict=True)]
            readers = {r.op_type for d in dqs for r in consumers.get(d.output[0], [])}
            if span[0] == 0.0 and x not in inputs and source is not None \
                    and source.op_type in _LAYER_OPS and not readers & ACTIVATION_OPS:
                nodes.append(helper.make_node("Clip", [x, lo, hi], [out],
                                              name=f"{node.name}/folded_relu"))
            else:  # the range still clips outliers (Min/Max: not an activation layer)
                low = f"{out}__qdq_low"
                nodes += [helper.make_node("Max", [x, lo], [low], name=f"{node.name}/floor"),
                          helper.make_node("Min", [low, hi], [out], name=f"{node.name}/ceil")]
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)  # inputs are rewired below: never in the caller's graph
            nodes.append(copy)

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    for n in nodes:
        for i, name in enumerate(n.input):
            n.input[i] = resolve(name)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + [t for t in new_inits if t.name in used])
    del model.graph.value_info[:]
    for out in model.graph.output:
        if out.name in rename:  # a dropped DequantizeLinear was a graph output
            model.graph.node.append(helper.make_node("Identity", [resolve(out.name)],
                                                     [out.name]))
    return onnx.shape_inference.infer_shapes(model)


def _zero_point(node: onnx.NodeProto, const) -> tuple[np.ndarray, int]:
    """The zero point (0 when absent) and the integer type it fixes (uint8 by default)."""
    if len(node.input) > 2 and node.input[2]:
        zp = const(node.input[2])
        if zp is None:
            raise Inconclusive(f"inconclusive: {node.op_type} node {node.name!r} has a "
                               "computed zero point")
        return zp, helper.np_dtype_to_tensor_dtype(zp.dtype)
    dtype = next((a.i for a in node.attribute if a.name == "output_dtype" and a.i),
                 onnx.TensorProto.UINT8)  # opset 21 names the type without a zero point
    return np.zeros((), np.int32), dtype


def _dequantize(node: onnx.NodeProto, const) -> np.ndarray:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("block_size"):
        raise Inconclusive(f"inconclusive: DequantizeLinear node {node.name!r} uses "
                           "blocked quantization")
    x, scale = const(node.input[0]), const(node.input[1])
    if scale is None:
        raise Inconclusive(f"inconclusive: DequantizeLinear node {node.name!r} has a "
                           "computed scale")
    zp, _ = _zero_point(node, const)
    if scale.ndim == 1 and x.ndim > 1:  # per-axis
        shape = [1] * x.ndim
        shape[attrs.get("axis", 1)] = -1
        scale, zp = scale.reshape(shape), (zp.reshape(shape) if zp.ndim else zp)
    return ((x.astype(np.float64) - zp.astype(np.float64)) * scale).astype(np.float32)


def _range(node: onnx.NodeProto, const) -> tuple[float, float] | None:
    """The float range a per-tensor QuantizeLinear can represent; None when per-axis or of
    a type without a fixed integer range."""
    scale = const(node.input[1])
    zp, dtype = _zero_point(node, const)
    if scale is None or scale.size != 1 or zp.size != 1 or dtype not in _RANGES:
        return None
    s, z = float(scale.reshape(())), float(zp.reshape(()))
    return tuple((q - z) * s for q in _RANGES[dtype])
