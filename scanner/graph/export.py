"""Sanitized export: a deployable model with the pruned channels zeroed.

Where the activation maps 0 to 0 and its input comes only from a per-channel affine chain,
the zero is folded into that chain's weights (the pruned model costs nothing at inference);
elsewhere a constant Mul with an initializer mask gates the channel. Inputs, outputs, names
and opset are kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .. import __version__
from ..files import write_atomic
from ..findings import LayerInfo
from .activations import Activation, activation_maps_zero, find_activations, graph_index
from .compare import compare_models, probe_input, run_model
from .mask import insert_masks, mask_inputs, mask_shape
from .scores import scores_copy
from .walk import first_input

PRUNED_KEY = "shapscan.pruned_channels"
EXPORT_KEY = "shapscan.export"
VERSION_KEY = "shapscan.tool_version"
SOURCE_KEY = "shapscan.source_sha256"


@dataclass(frozen=True)
class LayerEdit:
    layer: str
    channels: tuple[int, ...]
    method: str  # folded-conv | folded-gemm | folded-matmul | folded-bn | mask
    node: str  # the node whose weights were edited, or the inserted Mul


class _Graph:
    """Indexes over one graph, rebuilt after each structural edit."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.producer, self.consumers = graph_index(graph)
        self.inits = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input}
        self.graph_outputs = {o.name for o in graph.output}
        self.uses: dict[str, int] = {}
        for node in _walk_nodes(graph):
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1

    def param(self, node: onnx.NodeProto, index: int) -> Param | None:
        """Input `index` of `node` when it is a constant: an initializer (possibly behind
        Identity nodes, as exporters emit for deduplicated weights) or a Constant node.
        None when it is computed at run time or a feed could override it."""
        name = source = node.input[index] if len(node.input) > index else ""
        while source and source not in self.inits:
            producer = self.producer.get(source)
            if producer is None:
                return None
            if producer.op_type == "Constant":
                value = next((a for a in producer.attribute if a.name == "value"), None)
                if value is None:
                    return None
                return Param(self, node, index, numpy_helper.to_array(value.t), None)
            if producer.op_type != "Identity":
                return None
            source = producer.input[0]
        if not source or source in self.graph_inputs:
            return None
        private = source == name and self.uses.get(name) == 1
        return Param(self, node, index, numpy_helper.to_array(self.inits[source]),
                     self.inits[source] if private else None)

    def only_consumers(self, tensor: str, nodes: Sequence[onnx.NodeProto]) -> bool:
        if tensor in self.graph_outputs:
            return False
        ids = {id(n) for n in nodes}
        return all(id(c) in ids for c in self.consumers.get(tensor, []))


@dataclass
class Param:
    """A constant input of a node, writable without touching any other reader of it."""

    graph: _Graph
    node: onnx.NodeProto
    index: int
    array: np.ndarray
    private: onnx.TensorProto | None  # the initializer only this node reads, if any

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array.astype(self.array.dtype))
        if self.private is not None:
            self.private.CopyFrom(numpy_helper.from_array(array, self.private.name))
            return
        # shared (or behind Identity/Constant): give this node its own pruned copy
        model = self.graph.model
        taken = {t.name for t in model.graph.initializer} | set(self.graph.producer)
        name = f"{self.node.input[self.index]}__pruned"
        while name in taken:
            name += "_"
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        self.node.input[self.index] = name
        self.private = model.graph.initializer[-1]


def _walk_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs
            for g in subgraphs:
                yield from _walk_nodes(g)


def _zero_axis(param: Param, axis: int, channels: Sequence[int]) -> None:
    array = param.array.copy()
    index = [slice(None)] * array.ndim
    index[axis] = list(channels)
    array[tuple(index)] = 0
    param.write(array)


def _zero_bias(param: Param, width: int, channels: Sequence[int]) -> bool:
    """Zero entries of a bias broadcast along the last axis; widen a [1] bias to [width]."""
    array = param.array
    if array.ndim == 0 or array.shape[-1] == 1:
        array = np.broadcast_to(array, (*array.shape[:-1], width) if array.ndim else (width,))
    if array.shape[-1] != width:
        return False
    array = array.copy()
    array[..., list(channels)] = 0
    param.write(array)
    return True


def _clip_keeps_zero(node: onnx.NodeProto, g: _Graph) -> bool:
    bounds = []
    for i in (1, 2):
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            bounds.append(None)
        elif name in g.inits:
            bounds.append(float(numpy_helper.to_array(g.inits[name])))
        else:
            return False  # bounds computed at run time: unknown
    for attr in node.attribute:  # opset < 11 stores them as attributes
        if attr.name in ("min", "max"):
            bounds[0 if attr.name == "min" else 1] = attr.f
    lo, hi = bounds
    return (lo is None or lo <= 0) and (hi is None or hi >= 0)


def _try_fold(g: _Graph, act: Activation, channels: Sequence[int]) -> LayerEdit | None:
    layer = act.layer
    if not activation_maps_zero(layer.op):
        return None
    top = g.producer.get(layer.name)
    if top is None:
        return None
    act_nodes = [top]
    if layer.op == "Clip" and not _clip_keeps_zero(top, g):
        return None
    if layer.op == "SiLU":
        sigmoid = next((g.producer[i] for i in top.input if i != act.pre and i in g.producer),
                       None)
        if sigmoid is None or sigmoid.op_type != "Sigmoid" \
                or not g.only_consumers(sigmoid.output[0], [top]):
            return None  # Sigmoid(x) read elsewhere: zeroing x would change it to 0.5
        act_nodes.append(sigmoid)
    if layer.op == "GELU":
        inner = _gelu_inner(g, top, act.pre)
        if inner is None:
            return None
        act_nodes.extend(inner)
    if not g.only_consumers(act.pre, act_nodes):
        return None
    node = g.producer.get(act.pre)
    if node is None:
        return None
    ch = tuple(channels)
    if node.op_type in ("Gemm", "MatMul", "Add"):
        return (_fold_gemm(g, node, layer, ch) if node.op_type == "Gemm"
                else _fold_matmul(g, node, layer, ch))
    if layer.axis != 1:
        return None  # Conv and BatchNormalization write their channels on axis 1
    if node.op_type == "BatchNormalization" and len([o for o in node.output if o]) == 1:
        scale, bias = (g.param(node, i) for i in (1, 2))
        if scale is None or bias is None:
            return None
        _zero_axis(scale, 0, ch)
        _zero_axis(bias, 0, ch)
        return LayerEdit(layer.name, ch, "folded-bn", node.name)
    if node.op_type == "Conv":
        weight = g.param(node, 1)
        bias = g.param(node, 2) if len(node.input) > 2 and node.input[2] else None
        if weight is None or (len(node.input) > 2 and node.input[2] and bias is None):
            return None
        _zero_axis(weight, 0, ch)
        if bias is not None:
            _zero_axis(bias, 0, ch)
        return LayerEdit(layer.name, ch, "folded-conv", node.name)
    return None


def _gelu_inner(g: _Graph, top: onnx.NodeProto, pre: str) -> list[onnx.NodeProto] | None:
    """The nodes of a decomposed GELU between its input `pre` and its last Mul `top`, when
    none of their outputs is read outside it: GELU(0) = 0, so zeroing `pre` zeroes it."""
    inner: list[onnx.NodeProto] = []
    frontier = [t for t in top.input if t != pre]
    while frontier:
        tensor = frontier.pop()
        node = g.producer.get(tensor)
        if node is None or tensor in g.inits:
            continue
        if node.op_type == "Constant" or any(node is n for n in inner):
            continue
        if len(inner) > 8 or not g.only_consumers(tensor, [top, *inner]):
            return None
        inner.append(node)
        frontier.extend(t for t in node.input if t and t != pre)
    return inner


def _fold_gemm(g: _Graph, node: onnx.NodeProto, layer: LayerInfo, ch: tuple[int, ...]
               ) -> LayerEdit | None:
    if layer.axis != 1 or layer.rank != 2:
        return None
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    weight = g.param(node, 1)
    has_c = len(node.input) > 2 and bool(node.input[2])
    bias = g.param(node, 2) if has_c else None
    if weight is None or (has_c and bias is None):
        return None
    if has_c and not _zero_bias(bias, layer.channels, ch):
        return None
    _zero_axis(weight, 0 if trans_b else 1, ch)
    return LayerEdit(layer.name, ch, "folded-gemm", node.name)


def _fold_matmul(g: _Graph, node: onnx.NodeProto, layer: LayerInfo, ch: tuple[int, ...]
                 ) -> LayerEdit | None:
    """MatMul(x, W) with constant 2-D W, optionally followed by Add(., constant bias): the
    output's last axis is W's columns ([N, C], channels-last maps, token tensors)."""
    if layer.axis != layer.rank - 1:
        return None
    bias = None
    if node.op_type == "Add":
        # the bias may sit behind an Identity (torch deduplicates equal initializers)
        params = [g.param(node, i) for i in range(len(node.input))]
        others = [name for name, param in zip(node.input, params, strict=True) if param is None]
        consts = [param for param in params if param is not None]
        if len(consts) != 1 or len(others) != 1:
            return None
        bias = consts[0]
        matmul = g.producer.get(others[0])
        if bias is None or matmul is None or matmul.op_type != "MatMul" \
                or not g.only_consumers(others[0], [node]):
            return None
        node = matmul
    weight = g.param(node, 1)
    if weight is None or weight.array.ndim != 2:
        return None
    if bias is not None and not _zero_bias(bias, layer.channels, ch):
        return None
    _zero_axis(weight, 1, ch)
    return LayerEdit(layer.name, ch, "folded-matmul", node.name)


def _insert_mask(model: onnx.ModelProto, layer: LayerInfo, channels: Sequence[int],
                 dtype: np.dtype) -> LayerEdit:
    """Gate `layer` with a constant Mul; the product keeps the layer tensor's name."""
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    ungated, mask_name = f"{layer.name}__unpruned", f"{layer.name}__prune_mask"
    while ungated in taken or mask_name in taken:
        ungated, mask_name = ungated + "_", mask_name + "_"
    mask = np.ones(mask_shape(layer, 1), dtype)
    index: list[object] = [slice(None)] * layer.rank
    index[layer.axis] = list(channels)
    mask[tuple(index)] = 0
    graph.initializer.append(numpy_helper.from_array(mask, mask_name))
    index = next(i for i, n in enumerate(graph.node) if layer.name in n.output)
    producer = graph.node[index]
    producer.output[list(producer.output).index(layer.name)] = ungated
    mul = onnx.helper.make_node("Mul", [ungated, mask_name], [layer.name],
                                name=f"{layer.name}/PruneMul")
    graph.node.insert(index + 1, mul)
    return LayerEdit(layer.name, tuple(channels), "mask", mul.name)


def _layer_dtype(model: onnx.ModelProto, name: str) -> np.dtype:
    for value in [*model.graph.value_info, *model.graph.output]:
        if value.name == name and value.type.tensor_type.elem_type:
            return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    return np.dtype(np.float32)


def plan_layers(proto: onnx.ModelProto, zeroed: Mapping[str, Sequence[int]]
                ) -> list[tuple[Activation, tuple[int, ...]]]:
    """The activations named in `zeroed`, in graph order, with their sorted channels."""
    if not proto.graph.value_info:
        proto = onnx.shape_inference.infer_shapes(proto)
    acts = {a.layer.name: a for a in find_activations(proto)}
    unknown = sorted(set(zeroed) - set(acts))
    if unknown:
        raise KeyError(f"not activation layers of this model: {unknown}")
    plan = []
    for name, act in acts.items():
        channels = tuple(sorted({int(c) for c in zeroed.get(name, ())}))
        if not channels:
            continue
        if channels[0] < 0 or channels[-1] >= act.layer.channels:
            raise IndexError(f"layer {name!r} has {act.layer.channels} channels; got "
                             f"{list(channels)}")
        plan.append((act, channels))
    return plan


def sanitize(proto: onnx.ModelProto, zeroed: Mapping[str, Sequence[int]],
             metadata: Mapping[str, str] | None = None, verify: bool = True,
             layer_graph: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of `proto` (shape-inferred) with `zeroed` channels (layer -> channels) at 0.

    `layer_graph` is where the layers are found when `proto` has none of its own (a QDQ
    model's float copy, whose activation tensors are named as `proto`'s): each is then
    gated with a constant Mul in `proto`, never folded into weights.
    With `verify`, the result is checked against the masked engine on seeded random inputs
    (ModelMismatch if they differ by more than 1e-5, relative to the output scale).
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    edits: list[LayerEdit] = []
    for act, channels in plan_layers(layer_graph or model, zeroed):
        edit = None if layer_graph is not None else _try_fold(_Graph(model), act, channels)
        if edit is None:
            edit = _insert_mask(model, act.layer, channels, _layer_dtype(model, act.layer.name))
        edits.append(edit)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(metadata or {})
    props[PRUNED_KEY] = json.dumps({e.layer: list(e.channels) for e in edits})
    props[EXPORT_KEY] = json.dumps([{"layer": e.layer, "method": e.method, "node": e.node}
                                    for e in edits])
    props[VERSION_KEY] = __version__
    props.setdefault(SOURCE_KEY, hashlib.sha256(proto.SerializeToString()).hexdigest())
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    probe = probe_input(proto)
    if verify and probe is not None and edits:
        reference = run_model(proto, {first_input(proto).name: probe})
        scale = max([1.0] + [float(np.abs(v).max()) for v in reference.values() if v.size])
        verify_sanitized(proto, model, zeroed, probe, atol=VERIFY_ATOL * scale,
                         layer_graph=layer_graph)
    return model


VERIFY_ATOL = 1e-5


def export_edits(model: onnx.ModelProto) -> list[dict[str, str]]:
    """What `sanitize` did to each layer, read back from the model's metadata."""
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props.get(EXPORT_KEY, "[]"))


def verify_sanitized(source: onnx.ModelProto, sanitized: onnx.ModelProto,
                     zeroed: Mapping[str, Sequence[int]], images: np.ndarray,
                     atol: float = 1e-5, layer_graph: onnx.ModelProto | None = None) -> float:
    """Differential check: `sanitized` equals the masked engine with `zeroed` at 0."""
    layers = [act.layer for act, _ in plan_layers(layer_graph or source, zeroed)]
    scores = scores_copy(source)
    if scores is not None:  # graphsurgeon drops a ZipMap's map type: compare the scores
        source, sanitized = scores, scores_copy(sanitized) or sanitized
    feeds = {first_input(source).name: images}
    for spec in mask_inputs(source, layers):
        mask = np.ones((len(images), spec.layer.channels), np.float32)
        mask[:, list(zeroed[spec.layer.name])] = 0
        feeds[spec.input_name] = spec.feed(mask)
    return compare_models(insert_masks(source, layers), sanitized, feeds, atol)


def save_atomic(proto: onnx.ModelProto, path: str | Path) -> None:
    """Write `proto` to `path` atomically (scanner.files.write_atomic)."""
    write_atomic(path, proto.SerializeToString())
