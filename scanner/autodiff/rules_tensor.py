"""VJP rules for ops that pick or repeat elements: Gather, Expand, Tile.

Transformers read their class token with Gather (x[:, 0]), split q/k/v with Gather on a
stacked axis, and broadcast class tokens and position embeddings with Expand. Gather goes
back through a one-hot matrix (a MatMul, so repeated indices add up and no opset-16
ScatterND reduction is needed); Expand and Tile sum the cotangent over the copies.
"""

from __future__ import annotations

import onnx

from .context import VJPContext, cannot, node_attrs, rule

Grads = list[str | None]


def _prod(ctx: VJPContext, dims: str) -> str:
    """The product of a 1-D int64 shape slice, as a [1] tensor (1 when it is empty)."""
    return ctx.op("ReduceProd", [dims], keepdims=1)


@rule("Gather")
def _gather(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    """x viewed as [P, S, Q] around the gathered axis; y as [P, M, Q] for the M flattened
    indices; dx = onehotᵀ [S, M] · g [P, M, Q]."""
    if needs[1]:
        raise cannot(node, "indices that depend on the input")
    x, idx = node.input[:2]
    rank = ctx.rank(x, node)
    axis = int(node_attrs(node).get("axis", 0)) % rank
    shape = ctx.shape_of(x)
    size = ctx.op("Slice", [shape, ctx.const([axis]), ctx.const([axis + 1])])
    before = _prod(ctx, ctx.op("Slice", [shape, ctx.const([0]), ctx.const([axis])]))
    after = _prod(ctx, ctx.op("Slice", [shape, ctx.const([axis + 1]), ctx.const([rank])]))
    flat_idx = ctx.op("Reshape", [ctx.op("Cast", [idx], to=onnx.TensorProto.INT64),
                                  ctx.const([-1, 1])])
    # negative indices count from the end
    flat_idx = ctx.op("Where", [ctx.op("Less", [flat_idx, ctx.const([[0]])]),
                                ctx.op("Add", [flat_idx, size]), flat_idx])
    positions = ctx.op("Range", [ctx.const(0), ctx.op("Squeeze", [size]), ctx.const(1)])
    to = onnx.helper.np_dtype_to_tensor_dtype(ctx.dtype)
    onehot_t = ctx.op("Transpose", [ctx.op("Cast", [ctx.op("Equal", [flat_idx, positions])],
                                           to=to)], perm=[1, 0])  # [S, M]
    g3 = ctx.op("Reshape", [g[0], ctx.op("Concat", [before, ctx.const([-1]), after], axis=0)])
    dx = ctx.op("MatMul", [onehot_t, g3])  # [S, M] x [P, M, Q] -> [P, S, Q]
    return [ctx.op("Reshape", [dx, shape]), None]


@rule("Expand")
def _expand(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    if needs[1]:
        raise cannot(node, "a target shape that depends on the input")
    return [ctx.unbroadcast(g[0], node.input[0], node.output[0], node), None]


@rule("Tile")
def _tile(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    """y viewed as [r0, d0, r1, d1, ...] (copy index outside each original axis), summed
    over the copy axes."""
    if needs[1]:
        raise cannot(node, "repeats that depend on the input")
    x, repeats = node.input[:2]
    rank = ctx.rank(x, node)
    shape = ctx.shape_of(x)
    parts = []
    for i in range(rank):
        parts.append(ctx.op("Slice", [repeats, ctx.const([i]), ctx.const([i + 1])]))
        parts.append(ctx.op("Slice", [shape, ctx.const([i]), ctx.const([i + 1])]))
    view = ctx.op("Reshape", [g[0], ctx.op("Concat", parts, axis=0)])
    return [ctx.reduce("ReduceSum", view, list(range(0, 2 * rank, 2)), keepdims=False), None]
