"""Mask insertion: after each selected activation, Mul(act, mask_i) with mask_i a graph input.

One row of a batch carries one coalition's masks next to its image, so a single session run
evaluates many coalitions. All-ones masks reproduce the original model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..findings import LayerInfo
from ..runtime import Device, Runner, make_runner
from .activations import graph_index

MASK_PREFIX = "shapscan_mask_"


# Per-channel ops with f(m * x) = m * f(x) for every per-channel m >= 0. A mask on the
# activation can move past them unchanged in meaning; doing so keeps ORT's NCHWc layout
# chain (Conv -> Relu -> MaxPool -> Conv) unbroken and gates a smaller tensor, which is
# what makes the masked model run at nearly the plain model's speed.
COMMUTING_OPS = frozenset({"MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool"})


@dataclass(frozen=True)
class MaskSpec:
    """The graph input that gates one layer's channels.

    `gated` is the tensor the Mul multiplies: the layer's own output, or the output of the
    pooling ops that follow it alone (see COMMUTING_OPS); masks must be >= 0.
    """

    input_name: str
    layer: LayerInfo
    gated: str
    dtype: np.dtype = np.dtype(np.float32)  # the activation's element type

    def shape(self, rows: int) -> tuple[int, ...]:
        return tuple(mask_shape(self.layer, rows))

    def feed(self, channel_mask: np.ndarray) -> np.ndarray:
        """[rows, C] in {0, 1} -> the float32 array this input takes."""
        rows = channel_mask.shape[0]
        return np.ascontiguousarray(channel_mask, dtype=self.dtype).reshape(self.shape(rows))


def mask_shape(layer: LayerInfo, rows: int | str) -> list[int | str]:
    """[rows, 1, ..., C, ..., 1]: the layer's channels on its axis, 1 on the others, so the
    mask broadcasts over spatial positions or tokens ([N, C, 1, 1], [N, 1, 1, C], [N, 1, D])."""
    shape: list[int | str] = [rows] + [1] * (layer.rank - 1)
    shape[layer.axis] = layer.channels
    return shape


def batch_dim(proto: onnx.ModelProto) -> int | str:
    """The image input's leading dim: a symbol (dynamic batch) or a fixed size."""
    inits = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name not in inits:
            dims = inp.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                return dims[0].dim_value
            return dims[0].dim_param if dims and dims[0].dim_param else "batch"
    return "batch"


def mask_names(proto: onnx.ModelProto, count: int) -> list[str]:
    taken = {v.name for v in proto.graph.input} | {n for node in proto.graph.node
                                                   for n in node.output}
    prefix = MASK_PREFIX
    while any(f"{prefix}{i}" in taken for i in range(count)):
        prefix = "_" + prefix
    return [f"{prefix}{i}" for i in range(count)]


def gate_point(graph: onnx.GraphProto, tensor: str,
               consumers: dict[str, list[onnx.NodeProto]] | None = None) -> str:
    """Follow `tensor` through sole-consumer pooling ops that commute with the mask."""
    if consumers is None:
        _, consumers = graph_index(graph)
    outputs = {o.name for o in graph.output}
    while tensor not in outputs:
        readers = consumers.get(tensor, [])
        if len(readers) != 1 or readers[0].op_type not in COMMUTING_OPS \
                or readers[0].domain not in ("", "ai.onnx") \
                or len([o for o in readers[0].output if o]) != 1:
            break
        tensor = readers[0].output[0]
    return tensor


def mask_inputs(proto: onnx.ModelProto, layers: Sequence[LayerInfo]) -> list[MaskSpec]:
    """The mask inputs `insert_masks(proto, layers)` adds, in `layers` order."""
    names = mask_names(proto, len(layers))
    _, consumers = graph_index(proto.graph)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]}
    # pooling commutes with a mask on its channel axis (1) only
    return [MaskSpec(name, layer, gate_point(proto.graph, layer.name, consumers)
                     if layer.axis == 1 else layer.name, _np_dtype(types.get(layer.name)))
            for name, layer in zip(names, layers, strict=True)]


def _np_dtype(elem_type: int | None) -> np.dtype:
    if not elem_type:
        return np.dtype(np.float32)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def insert_masks(proto: onnx.ModelProto, layers: Sequence[LayerInfo]) -> onnx.ModelProto:
    """A copy of `proto` with a mask input after each layer; graph output names unchanged.

    The mask inputs are `mask_inputs(proto, layers)`. The caller's model is never modified.
    """
    graph = gs.import_onnx(proto)  # import_onnx builds new objects: the proto is untouched
    tensors = graph.tensors()
    n = batch_dim(proto)
    for spec in mask_inputs(proto, layers):
        layer = spec.layer
        if layer.name not in tensors:
            raise KeyError(f"layer tensor {layer.name!r} not in the graph")
        act = tensors[spec.gated]
        dtype = act.dtype if act.dtype is not None else spec.dtype
        mask = gs.Variable(spec.input_name, dtype=dtype, shape=mask_shape(layer, n))
        gate_tensor(graph, act, mask, f"{spec.gated}_masked")
        graph.inputs.append(mask)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=True)
    out.ir_version = proto.ir_version
    del out.opset_import[:]
    out.opset_import.extend(proto.opset_import)
    del out.metadata_props[:]
    out.metadata_props.extend(proto.metadata_props)
    return out


def gate_tensor(graph: gs.Graph, act: gs.Variable, gate: gs.Tensor, gated_name: str) -> None:
    """Insert Mul(act, gate) and send every consumer of `act` to the product.

    When `act` is a graph output the product takes over its name, so output names stay.
    """
    gated = gs.Variable(gated_name, dtype=act.dtype, shape=act.shape)
    consumers = list(act.outputs)  # a copy: rewiring edits the list we iterate
    for consumer in consumers:
        for i, t in enumerate(consumer.inputs):
            if t is act:
                consumer.inputs[i] = gated
    graph.nodes.append(gs.Node("Mul", name=f"{gated_name}/Mul", inputs=[act, gate],
                               outputs=[gated]))
    if act in graph.outputs:
        original = act.name
        act.name = f"{original}__ungated"
        gated.name = original
        graph.outputs = [gated if t is act else t for t in graph.outputs]


class MaskedModel:
    """The full masked model on (image, masks) rows, in one ORT session."""

    def __init__(self, proto: onnx.ModelProto, layers: Sequence[LayerInfo],
                 device: Device | None = None, threads: int | None = None):
        self.layers = list(layers)
        self.proto = insert_masks(proto, self.layers)
        self.masks = mask_inputs(proto, self.layers)
        self.runner: Runner = make_runner(self.proto, device, threads)
        inits = {i.name for i in proto.graph.initializer}
        self.input_name = next(i.name for i in proto.graph.input if i.name not in inits)
        self.output_name = proto.graph.output[0].name

    def run(self, x: np.ndarray, channel_masks: Sequence[np.ndarray]) -> np.ndarray:
        """Logits for rows (x[r], masks[r]); `channel_masks[i]` is [rows, C_i] for layer i."""
        feeds = {self.input_name: x}
        for spec, m in zip(self.masks, channel_masks, strict=True):
            feeds[spec.input_name] = spec.feed(np.asarray(m))
        return self.runner.run([self.output_name], feeds)[0]

    def run_flat(self, x: np.ndarray, coalitions: np.ndarray) -> np.ndarray:
        """Logits for rows (x[r], coalitions[r]); a coalition row spans all layers' channels
        in `layers` order (the CoalitionEvaluator's flat index)."""
        bounds = np.cumsum([0] + [s.layer.channels for s in self.masks])
        coalitions = np.asarray(coalitions, np.float32)
        return self.run(x, [coalitions[:, a:b] for a, b in zip(bounds[:-1], bounds[1:],
                                                                strict=True)])

    def run_ones(self, x: np.ndarray) -> np.ndarray:
        rows = x.shape[0]
        return self.run(x, [np.ones((rows, s.layer.channels), np.float32) for s in self.masks])
