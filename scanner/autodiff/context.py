"""What a backward rule sees: the forward graph's shapes and constants, and an emitter.

Rules never edit the forward graph; they append backward nodes through `VJPContext.op`
and ask it for shapes (`static_shape`, falling back to runtime `shape_of`) and constant
values (`value`). Helpers that depend on the opset (reductions whose axes moved from an
attribute to an input) live here so rules stay opset-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import Inconclusive
from ..graph.quantized import QUANTIZED_HINT, QUANTIZED_OPS

Dim = int | str | None  # static size, symbolic name, or unknown
Shape = tuple[Dim, ...]

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def cannot(node: onnx.NodeProto, why: str = "") -> Inconclusive:
    """The SS205 error every unsupported case raises (an op, or an attribute of one)."""
    name = node.name or (node.output[0] if node.output else "?")
    msg = f"cannot differentiate op {node.op_type} (node {name})"
    if node.op_type in QUANTIZED_OPS:
        why = "; ".join(filter(None, [why, QUANTIZED_HINT]))
    return Inconclusive(f"{msg}: {why}" if why else msg, rule_id="SS205", location=name)


class VJPContext:
    def __init__(self, model: onnx.ModelProto, dtype: np.dtype) -> None:
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          0)
        if self.opset < 11:
            raise Inconclusive(f"gradients need opset >= 11, the model has opset {self.opset} "
                               "(convert it first)", rule_id="SS205")
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = _all_names(model.graph)
        self._counter = 0
        self._shape_cache: dict[str, str] = {}
        self._consts: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self._consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self._shapes, self._types = _infer(model)
        self.producer = {o: n for n in model.graph.node for o in n.output}

    # ------------------------------------------------------------------ facts
    def static_shape(self, name: str) -> Shape | None:
        """Dims as ints where shape inference knows them, symbolic names, or None."""
        if name in self._consts:
            return tuple(int(d) for d in self._consts[name].shape)
        return self._shapes.get(name)

    def static_dims(self, name: str) -> tuple[int, ...] | None:
        shape = self.static_shape(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return tuple(int(d) for d in shape)  # type: ignore[arg-type]

    def rank(self, name: str, node: onnx.NodeProto) -> int:
        shape = self.static_shape(name)
        if shape is None:
            raise cannot(node, f"rank of {name} unknown after shape inference")
        return len(shape)

    def elem_type(self, name: str) -> int | None:
        if name in self._consts:
            return helper.np_dtype_to_tensor_dtype(self._consts[name].dtype)
        return self._types.get(name)

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of a tensor (initializer or Constant output), else None."""
        return self._consts.get(name) if name else None

    # ------------------------------------------------------------------ emitting
    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"vjp/{hint}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> str:
        return self.op_multi(op_type, inputs, n_out, **attrs)[0]

    def op_multi(self, op_type: str, inputs: Sequence[str], n_out: int = 1,
                 **attrs: Any) -> list[str]:
        outs = [self.fresh(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs

    def const(self, value: Any, dtype: np.dtype | type | None = None) -> str:
        """An initializer; floats default to the model's float type, ints to int64."""
        arr = np.asarray(value)
        if dtype is None:
            dtype = self.dtype if arr.dtype.kind == "f" else np.int64
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(arr.astype(dtype), name))
        self._consts[name] = arr.astype(dtype)
        return name

    def shape_of(self, name: str) -> str:
        if name not in self._shape_cache:
            self._shape_cache[name] = self.op("Shape", [name])
        return self._shape_cache[name]

    def add_all(self, terms: Sequence[str]) -> str:
        return terms[0] if len(terms) == 1 else self.op("Sum", list(terms))

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | str, keepdims: bool) -> str:
        """ReduceSum/ReduceMean over `axes` (a list, or a runtime int64 tensor name)."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if isinstance(axes, str):
            if not axes_as_input:
                raise Inconclusive(f"runtime reduction axes need opset >= 13 (model has "
                                   f"{self.opset})", rule_id="SS205")
            return self.op(op_type, [x, axes], keepdims=int(keepdims), noop_with_empty_axes=1)
        if axes_as_input:
            return self.op(op_type, [x, self.const(list(axes))], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def zeros_like(self, name: str) -> str:
        zero = numpy_helper.from_array(np.zeros(1, self.dtype))
        return self.op("ConstantOfShape", [self.shape_of(name)], value=zero)

    def unbroadcast(self, g: str, like: str, out: str, node: onnx.NodeProto,
                    out_shape: Shape | None = None) -> str:
        """Sum `g` (shaped like `out`, or `out_shape` when given) back to the shape of the
        broadcast operand `like`."""
        ls = self.static_shape(like)
        os_ = out_shape if out_shape is not None else self.static_shape(out)
        if ls is None or os_ is None:
            raise cannot(node, f"rank of {like} or {out} unknown after shape inference")
        lead = len(os_) - len(ls)
        axes = list(range(lead))
        certain = True
        for i, d in enumerate(ls):
            o = os_[lead + i]
            if d == 1:
                if o != 1:
                    axes.append(lead + i)
            elif not (isinstance(d, int) or (d is not None and d == o)):
                certain = False  # a symbolic/unknown dim might be 1 at run time
        if certain:
            if not axes:
                return g
            summed = self.reduce("ReduceSum", g, axes, keepdims=True)
            return self.op("Reshape", [summed, self.shape_of(like)]) if lead else summed
        # Runtime: reduce over every axis where the (left-padded) operand has size 1.
        padded = self.shape_of(like)
        if lead:
            padded = self.op("Concat", [self.const(np.ones(lead, np.int64)), padded], axis=0)
        is_one = self.op("Equal", [padded, self.const(np.array([1], np.int64))])
        axes_t = self.op("Reshape", [self.op("NonZero", [is_one]), self.const([-1])])
        summed = self.reduce("ReduceSum", g, axes_t, keepdims=True)
        return self.op("Reshape", [summed, self.shape_of(like)])


Rule = Callable[[VJPContext, onnx.NodeProto, list[str | None], list[bool]], list[str | None]]
RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    """Register a VJP rule: (ctx, node, output cotangents, which inputs need one) ->
    one cotangent (or None) per input."""
    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = fn
        return fn
    return register


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
        names.add(n.name)
    return names


def _infer(model: onnx.ModelProto) -> tuple[dict[str, Shape], dict[str, int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is best effort: rules fall back to runtime shapes
        inferred = model
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim)
    return shapes, types
