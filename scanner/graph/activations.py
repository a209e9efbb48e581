"""Activation discovery: the layers whose output channels are the Shapley players."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from ..findings import Finding, LayerInfo, Severity
from ..runtime import make_session
from .axis import AxisVotes
from .walk import first_input

log = logging.getLogger(__name__)

ACTIVATION_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid",
                            "HardSwish", "Tanh", "Elu", "Selu", "Gelu", "Softplus"})
SILU = "SiLU"  # the Mul(x, Sigmoid(x)) pattern
# MatMul(Softmax(Q K^T), V) -> [N, heads, T, d]: each head's output before the heads are
# joined and projected; its players are the heads, on axis 1
HEADS = "AttentionHeads"
GELU = "GELU"  # Mul(x, Add(Tanh|Erf(...x...), 1)): torch's Gelu below opset 20, either form
_GELU_GATES = frozenset({"Tanh", "Erf"})
_GELU_ARITHMETIC = frozenset({"Mul", "Add", "Div", "Pow", "Sub"})
# f(0) = 0: zeroing the pre-activation zeroes the output (what export's folding relies on).
# Clip only when its range contains 0: the node-level check is `clip_keeps_zero`.
_ZERO_PRESERVING = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "HardSwish", "Tanh", "Elu",
                              "Selu", "Gelu", SILU, GELU})


def activation_maps_zero(op: str) -> bool:
    """True when the activation maps 0 to 0 (Sigmoid, HardSigmoid and Softplus do not)."""
    return op in _ZERO_PRESERVING


@dataclass(frozen=True)
class Activation:
    """Where a discovered layer sits in the graph."""

    layer: LayerInfo
    pre: str  # the activation's input tensor (x of f(x), or of x * Sigmoid(x))
    nodes: tuple[str, ...]  # the nodes that make up the activation (Sigmoid + Mul for SiLU)


def graph_index(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto],
                                                   dict[str, list[onnx.NodeProto]]]:
    """Producer of each tensor, and the consumers of each tensor."""
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            if inp:
                consumers.setdefault(inp, []).append(node)
    return producer, consumers


def tensor_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes known to shape inference (None for unknown dims)."""
    shapes: dict[str, list[int | None]] = {}
    graph = proto.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                              for d in tensor_type.shape.dim]
    return shapes


def silu_parts(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto]
               ) -> tuple[str, onnx.NodeProto] | None:
    """(x, the Sigmoid node) when `node` is Mul(x, Sigmoid(x)) in either operand order."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    a, b = node.input
    for x, s in ((a, b), (b, a)):
        sig = producer.get(s)
        if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x:
            return x, sig
    return None


def gelu_parts(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto]
               ) -> tuple[str, onnx.NodeProto] | None:
    """(x, the Tanh or Erf node) when `node` is Mul(x, Add(gate, c)) with c a constant and
    gate = Tanh|Erf of a short arithmetic chain from x: a decomposed Gelu. Masking the Mul
    zeroes the channel; masking the inner Tanh would leave x/2 in it."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    for x, a in (node.input, reversed(node.input)):
        add = producer.get(a)
        if add is None or add.op_type != "Add" or len(add.input) != 2:
            continue
        for gate_in, other in (add.input, reversed(add.input)):
            gate, const = producer.get(gate_in), producer.get(other)
            if (gate is not None and gate.op_type in _GELU_GATES
                    and (const is None or const.op_type == "Constant")
                    and _reaches(gate.input[0], x, producer, hops=6)):
                return x, gate
    return None


def _reaches(tensor: str, source: str, producer: dict[str, onnx.NodeProto], hops: int) -> bool:
    """`tensor` is computed from `source` by at most `hops` elementwise arithmetic nodes."""
    frontier = {tensor}
    for _ in range(hops + 1):
        if source in frontier:
            return True
        frontier = {i for t in frontier if (p := producer.get(t)) is not None
                    and p.op_type in _GELU_ARITHMETIC for i in p.input}
    return False


@dataclass(frozen=True)
class SkippedLayer:
    """An activation that is not scored, and why."""

    name: str
    op: str
    node: str
    reason: str  # AXIS_UNDECIDED, or "gate of LAYER" (a squeeze-excitation gate)


AXIS_UNDECIDED = "feature axis undecided"
GATE_OPS = frozenset({"Sigmoid", "HardSigmoid"})


@dataclass(frozen=True)
class Discovery:
    """What activation discovery found: the scored layers and the ones it left out."""

    activations: tuple[Activation, ...]
    skipped: tuple[SkippedLayer, ...]  # axis undecided: reported as a finding (SS209)
    gates: tuple[SkippedLayer, ...]  # squeeze-excitation gates of a scored layer

    @property
    def layers(self) -> list[LayerInfo]:
        return [a.layer for a in self.activations]


def find_activations(proto: onnx.ModelProto) -> list[Activation]:
    """Activations with a known channel count and feature axis, in topological order."""
    return list(discover(proto).activations)


def discover(proto: onnx.ModelProto) -> Discovery:
    """Activation layers, each with its channel axis read from the graph (graph.axis).

    A layer whose axis the graph does not decide is skipped (Discovery.skipped), never
    guessed. A Sigmoid / HardSigmoid that gates the channels of a scored layer (a
    squeeze-excitation block: Mul(layer, gate) with the gate [N, C, 1, 1]) is not a layer
    of its own: zeroing the layer's channel already zeroes the gated product's channel, and
    scoring the gate would count that channel twice (Discovery.gates).
    """
    graph = proto.graph
    producer, consumers = graph_index(graph)
    shapes = tensor_shapes(proto)
    inner: set[str] = set()  # the Sigmoid of a SiLU, the Tanh of a Gelu: not layers
    candidates: list[tuple[onnx.NodeProto, str, str, tuple[str, ...]]] = []
    for node in graph.node:
        silu, gelu = silu_parts(node, producer), gelu_parts(node, producer)
        if silu is not None:
            x, sig = silu
            inner.add(sig.output[0])
            candidates.append((node, SILU, x, (sig.name, node.name)))
        elif gelu is not None:
            x, gate = gelu
            inner.add(gate.output[0])
            candidates.append((node, GELU, x, (gate.name, node.name)))
        elif node.op_type in ACTIVATION_OPS and node.domain in ("", "ai.onnx"):
            candidates.append((node, node.op_type, node.input[0], (node.name,)))
        elif _attention_output(node, producer, shapes):
            candidates.append((node, HEADS, node.output[0], (node.name,)))
    lost = [n.output[0] for n, _, _, _ in candidates if n.output[0] not in inner
            and (shapes.get(n.output[0]) is None or None in shapes[n.output[0]][1:])]
    if lost:  # e.g. after a channel shuffle whose Reshape target is computed at run time
        shapes.update(probe_shapes(proto, lost))
    constants = _constants(graph)
    ranks = {t.name: len(t.dims) for t in graph.initializer}  # weights: not in value_info
    ranks.update((name, len(shape)) for name, shape in shapes.items())
    votes = AxisVotes(producer, consumers, ranks.get, constants)
    outputs = {n.output[0] for n, _, _, _ in candidates} - inner
    found: list[Activation] = []
    skipped: list[SkippedLayer] = []
    gates: list[SkippedLayer] = []
    for node, op, pre, nodes in candidates:
        out = node.output[0]
        if out in inner:
            continue  # part of a SiLU or a Gelu, not a layer of its own
        shape = shapes.get(out)
        if shape is None or len(shape) < 2:
            log.debug("skipping activation %s (%s): channel count unknown (shape %s)",
                      out, op, shape)
            continue
        gated = _gated_layer(node, shape, consumers, shapes, outputs)
        if gated is not None:
            gates.append(SkippedLayer(out, op, node.name, f"gate of {gated}"))
            continue
        if op == HEADS:  # heads on axis 1 of [N, heads, T, d]; a rank-3 product has none
            axis = 1 if len(shape) == 4 else None
        else:
            axis = votes.feature_axis(out, pre)
        if axis is None:
            log.debug("skipping activation %s (%s): %s", out, op, AXIS_UNDECIDED)
            skipped.append(SkippedLayer(out, op, node.name, AXIS_UNDECIDED))
            continue
        if shape[axis] is None:
            log.debug("skipping activation %s (%s): channel count unknown (shape %s)",
                      out, op, shape)
            continue
        layer = LayerInfo(name=out, op=op, node=node.name, channels=int(shape[axis]),
                          rank=len(shape), axis=axis)
        found.append(Activation(layer, pre, nodes))
    return Discovery(tuple(found), tuple(skipped), tuple(gates))


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Tensors that do not depend on a graph input: initializers, Constant outputs and
    what nodes compute from them alone (a weight behind Identity, Transpose or Cast)."""
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    constants = {t.name for t in graph.initializer}
    for node in graph.node:  # topological order
        data = [i for i in node.input if i]
        if all(i in constants and i not in inputs for i in data) and (
                data or node.op_type == "Constant") and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute):
            constants.update(o for o in node.output if o)
    return constants


def _attention_output(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                      shapes: dict[str, list[int | None]]) -> bool:
    """`node` is MatMul(Softmax(scores), V) with a rank-4 [N, heads, T, d] output."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return False
    weights = producer.get(node.input[0])
    shape = shapes.get(node.output[0])
    return (weights is not None and weights.op_type == "Softmax"
            and (shape is None or len(shape) == 4))


def _gated_layer(node: onnx.NodeProto, shape: list[int | None],
                 consumers: dict[str, list[onnx.NodeProto]],
                 shapes: dict[str, list[int | None]], layers: set[str]) -> str | None:
    """The layer a squeeze-excitation gate multiplies, when `node` is one: a Sigmoid or
    HardSigmoid whose [N, C, 1, ...] output only multiplies scored layers' outputs of the
    same rank (broadcast over their other axes)."""
    if node.op_type not in GATE_OPS or len(shape) < 3:
        return None
    out = node.output[0]
    if sum(1 for d in shape[1:] if d != 1) > 1:
        return None  # the gate varies over more than one axis: a map, not a channel gate
    readers = consumers.get(out, [])
    gated = []
    for reader in readers:
        if reader.op_type != "Mul" or len(reader.input) != 2 or out not in reader.input:
            return None
        other = reader.input[1] if reader.input[0] == out else reader.input[0]
        if other not in layers or len(shapes.get(other) or []) != len(shape):
            return None
        gated.append(other)
    return gated[0] if gated else None


def probe_shapes(proto: onnx.ModelProto, names: list[str]) -> dict[str, list[int | None]]:
    """Shapes of `names` from one run on a zero image, where shape inference lost them.
    Empty when the image's own shape is not static or the run fails: those layers are then
    skipped, as before."""
    image = first_input(proto)
    dims = image.type.tensor_type.shape.dim if image is not None else []
    if len(dims) < 2 or not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[1:]):
        return {}
    elem = image.type.tensor_type.elem_type
    # each output declared with its inferred type (float16 in a float16 model), else the
    # image's: ORT refuses a graph whose declared output type is not the computed one
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*proto.graph.value_info, *proto.graph.output]}
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, types.get(n) or elem,
                                                                 None) for n in names)
    batch = dims[0].dim_value if dims[0].HasField("dim_value") and dims[0].dim_value > 0 else 1
    x = np.zeros([batch] + [d.dim_value for d in dims[1:]],
                 onnx.helper.tensor_dtype_to_np_dtype(elem))
    try:
        arrays = make_session(model).run(names, {image.name: x})
    except Exception as exc:  # noqa: BLE001  a model ORT cannot run fails later, clearly
        log.debug("shape probe failed: %s", exc)
        return {}
    return {n: [None, *a.shape[1:]] for n, a in zip(names, arrays, strict=True)}


def discovery_findings(found: Discovery) -> list[Finding]:
    """One SS209 finding per layer left out because its feature axis is undecided."""
    return [Finding("SS209", Severity.LOW, f"activation {s.name!r} ({s.op}) not scanned: no "
                    "Conv, MatMul, Gemm, LayerNormalization or pooling around it decides which "
                    "axis holds its channels", s.node or s.name, {"layer": s.name, "op": s.op})
            for s in found.skipped]


def discover_activations(proto: onnx.ModelProto) -> list[LayerInfo]:
    """The activation layers of `proto` (shape-inferred), in topological order; each
    layer's channels lie on its `axis` (see `discover` for the layers left out)."""
    return discover(proto).layers
