"""Reverse-mode differentiation of an ONNX graph, emitted as more ONNX nodes.

Only tensors that depend on the differentiated input *and* feed a seed are visited, so
shape arithmetic (Shape -> Gather -> Concat -> Reshape) and constant branches need no
rule. Dependence stops at Shape and Size: their outputs only see the input's shape.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import Inconclusive
from . import (  # noqa: F401  (register)
    rules_elementwise,
    rules_nn,
    rules_norm,
    rules_reduce,
    rules_resize,
    rules_shape,
    rules_tensor,
)
from .context import FLOAT_TYPES, RULES, VJPContext, cannot

SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
# ops whose every output carries data (elsewhere outputs after the first are side outputs)
EVERY_OUTPUT_DIFFERENTIABLE = frozenset({"Split"})
COTANGENT_SUFFIX = "__cotangent"
GRAD_SUFFIX = "__grad"


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope tensors its subgraphs (If/Loop/Scan bodies)
    read: a branch that reads the image must count as depending on it."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            local = {t.name for t in sub.initializer} | {i.name for i in sub.input}
            for inner in sub.node:
                names.extend(i for i in node_inputs(inner) if i not in local)
                local.update(inner.output)
    return names


def dependents(graph: onnx.GraphProto, wrt: str | Sequence[str]) -> set[str]:
    """Tensors whose values change with `wrt` (one tensor or several; nodes assumed
    topologically sorted)."""
    dep = {wrt} if isinstance(wrt, str) else set(wrt)
    for node in graph.node:
        if node.op_type not in SHAPE_ONLY_OPS and any(i in dep for i in node_inputs(node)):
            dep.update(o for o in node.output if o)
    return dep


def ancestors(graph: onnx.GraphProto, seeds: set[str]) -> set[str]:
    """Tensors some seed depends on (the seeds included)."""
    reach = set(seeds)
    for node in reversed(graph.node):
        if any(o in reach for o in node.output):
            reach.update(node_inputs(node))
    return reach


def backprop(model: onnx.ModelProto, ctx: VJPContext, wrt: str, seeds: dict[str, str]) -> str:
    """Emit into `ctx` the nodes computing sum_s <seed cotangent_s, d s / d wrt>.

    `model` is a working copy: rules may add outputs to forward nodes (MaxPool indices).
    Returns the name of the gradient tensor (shape of `wrt`).
    """
    return backprop_many(model, ctx, [wrt], seeds)[0]


def backprop_many(model: onnx.ModelProto, ctx: VJPContext, wrts: Sequence[str],
                  seeds: dict[str, str]) -> list[str]:
    """`backprop` for several tensors in one backward pass (the parameters recovery
    trains): one gradient tensor name per entry of `wrts`, in order."""
    graph = model.graph
    dep = dependents(graph, wrts)
    live = dep & ancestors(graph, set(seeds))
    cot: dict[str, list[str]] = defaultdict(list)
    for tensor, grad in seeds.items():
        if tensor in live:
            cot[tensor].append(grad)
    for node in reversed(list(graph.node)):
        if not any(o in cot for o in node.output):
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in RULES:
            raise cannot(node)
        gouts = [ctx.add_all(cot.pop(o)) if o in cot else None for o in node.output]
        if gouts[0] is None and node.op_type not in EVERY_OUTPUT_DIFFERENTIABLE:
            continue  # only a non-differentiable side output (indices, mask) is used
        needs = [bool(i) and i in live for i in node.input]
        grads = RULES[node.op_type](ctx, node, gouts, needs)
        for name, need, grad in zip(node.input, needs, grads, strict=False):
            if need and grad is not None:
                cot[name].append(grad)
    # a tensor the seeds do not depend on at all gets zeros
    return [ctx.add_all(cot.pop(w)) if w in cot else ctx.zeros_like(w) for w in wrts]


def float_type(model: onnx.ModelProto, name: str) -> np.dtype:
    for vi in model.graph.input:
        if vi.name == name:
            elem = vi.type.tensor_type.elem_type
            if elem not in FLOAT_TYPES:
                raise Inconclusive(f"cannot differentiate w.r.t. input {name}: not a float "
                                   "tensor", rule_id="SS205", location=name)
            return np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    raise ValueError(f"{name!r} is not a graph input")


def attach(model: onnx.ModelProto, ctx: VJPContext) -> None:
    model.graph.node.extend(ctx.nodes)
    model.graph.initializer.extend(ctx.initializers)
    ctx.nodes.clear()
    ctx.initializers.clear()


def build_vjp(proto: onnx.ModelProto, wrt: str, seeds: list[str]) -> onnx.ModelProto:
    """A copy of `proto` with, per seed s, a new input `s__cotangent` (shaped like s) and a
    new output `wrt__grad` = sum_s d <s, s__cotangent> / d wrt. Original outputs stay."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    dtype = float_type(model, wrt)
    ctx = VJPContext(model, dtype)
    feeds: dict[str, str] = {}
    for seed in seeds:
        shape = ctx.static_shape(seed)
        dims = None if shape is None else list(shape)
        name = seed + COTANGENT_SUFFIX
        model.graph.input.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(dtype), dims))
        feeds[seed] = name
    grad = backprop(model, ctx, wrt, feeds)
    out = wrt + GRAD_SUFFIX
    ctx.nodes.append(helper.make_node("Identity", [grad], [out], name=out))
    attach(model, ctx)
    model.graph.output.append(helper.make_tensor_value_info(
        out, helper.np_dtype_to_tensor_dtype(dtype), None))
    return model
