"""VJP rules for data movement and normalisation along an axis.

Shape-changing ops that keep the element order (Flatten, Reshape, Squeeze, Unsqueeze) go
back with a Reshape to the runtime shape of their input, so a symbolic batch dim costs
nothing. Slice goes back by scattering into zeros at the positions it selected (found by
slicing an index grid the same way), which covers negative steps and runtime bounds.
"""

from __future__ import annotations

import numpy as np
import onnx

from .context import VJPContext, cannot, node_attrs, rule

Grads = list[str | None]


def _first(node: onnx.NodeProto, grad: str) -> Grads:
    return [grad] + [None] * (len(node.input) - 1)


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    return _first(node, ctx.op("Reshape", [g[0], ctx.shape_of(node.input[0])]))


@rule("Transpose")
def _transpose(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    perm = node_attrs(node).get("perm")
    if perm is None:
        perm = list(reversed(range(ctx.rank(node.input[0], node))))
    return [ctx.op("Transpose", [g[0]], perm=[int(i) for i in np.argsort(perm)])]


def _axis_size(ctx: VJPContext, x: str, axis: int) -> int | str:
    shape = ctx.static_shape(x)
    if shape is not None and isinstance(shape[axis], int):
        return int(shape[axis])  # type: ignore[arg-type]
    return ctx.op("Slice", [ctx.shape_of(x), ctx.const([axis]), ctx.const([axis + 1])])


@rule("Concat")
def _concat(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    axis = int(node_attrs(node)["axis"])
    if axis < 0:
        axis += ctx.rank(node.output[0], node)
    out: Grads = []
    start: int | str = 0
    for x, need in zip(node.input, needs, strict=True):
        size = _axis_size(ctx, x, axis)
        if isinstance(start, int) and isinstance(size, int):
            end: int | str = start + size
        else:
            end = ctx.op("Add", [_as_tensor(ctx, start), _as_tensor(ctx, size)])
        out.append(ctx.op("Slice", [g[0], _as_tensor(ctx, start), _as_tensor(ctx, end),
                                    ctx.const([axis])]) if need else None)
        start = end
    return out


@rule("Split")
def _split(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    """The adjoint of Split is Concat; an output nothing reads contributes zeros."""
    axis = int(node_attrs(node).get("axis", 0))
    parts = [gi if gi is not None else ctx.zeros_like(out)
             for gi, out in zip(g, node.output, strict=True)]
    return [ctx.op("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)


def _as_tensor(ctx: VJPContext, v: int | str) -> str:
    return ctx.const([v]) if isinstance(v, int) else v


@rule("Pad")
def _pad(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a = node_attrs(node)
    if a.get("mode", "constant") != "constant":
        raise cannot(node, f"mode={a['mode']} (only constant padding)")
    if any(needs[1:]):
        raise cannot(node, "pads that depend on the input")
    rank = ctx.rank(node.input[0], node)
    pads = ctx.value(node.input[1])
    axes_in = node.input[3] if len(node.input) > 3 and node.input[3] else ""
    axes_v = ctx.value(axes_in) if axes_in else np.arange(rank)
    if pads is None or axes_v is None:
        # Runtime pads: the adjoint of padding by p is padding by -p (onnxruntime crops).
        neg = ctx.op("Neg", [node.input[1]])
        return _first(node, ctx.op("Pad", [g[0], neg, "", *([axes_in] if axes_in else [])],
                                   mode="constant"))
    begin, end = np.zeros(rank, np.int64), np.zeros(rank, np.int64)
    for i, ax in enumerate(int(v) % rank for v in axes_v.reshape(-1)):
        begin[ax], end[ax] = pads[i], pads[i + len(axes_v.reshape(-1))]
    grad = g[0]
    # Padded positions are cropped away with Slice; cropped ones (negative pads) come back
    # as zeros with a non-negative Pad: portable where runtimes reject negative pads.
    crop = [ax for ax in range(rank) if begin[ax] > 0 or end[ax] > 0]
    if crop:
        starts = [max(int(begin[ax]), 0) for ax in crop]
        ends = [-int(end[ax]) if end[ax] > 0 else 2 ** 62 for ax in crop]
        grad = ctx.op("Slice", [grad, ctx.const(starts), ctx.const(ends), ctx.const(crop)])
    refill = np.concatenate([np.maximum(-begin, 0), np.maximum(-end, 0)])
    if refill.any():
        grad = ctx.op("Pad", [grad, ctx.const(refill)], mode="constant")
    return _first(node, grad)


@rule("Slice")
def _slice(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    x = node.input[0]
    count = ctx.op("Size", [x])
    grid = ctx.op("Reshape", [ctx.op("Range", [ctx.const(np.array(0)), count,
                                               ctx.const(np.array(1))]), ctx.shape_of(x)])
    picked = ctx.op("Slice", [grid, *node.input[1:]], **node_attrs(node))
    flat = ctx.const([-1])
    zeros = ctx.op("Reshape", [ctx.zeros_like(x), flat])
    scattered = ctx.op("ScatterElements", [zeros, ctx.op("Reshape", [picked, flat]),
                                           ctx.op("Reshape", [g[0], flat])], axis=0)
    return _first(node, ctx.op("Reshape", [scattered, ctx.shape_of(x)]))


def _along_axis(ctx: VJPContext, node: onnx.NodeProto) -> tuple[int, bool]:
    """(axis, flatten first): before opset 13 Softmax coerced its input to 2-D at `axis`."""
    legacy = ctx.opset < 13
    axis = int(node_attrs(node).get("axis", 1 if legacy else -1))
    return axis, legacy


@rule("Softmax", "LogSoftmax")
def _softmax(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    axis, legacy = _along_axis(ctx, node)
    gy, y = g[0], node.output[0]
    if legacy:
        gy = ctx.op("Flatten", [gy], axis=axis)
        y = ctx.op("Flatten", [y], axis=axis)
        axis = 1
    if node.op_type == "Softmax":
        inner = ctx.reduce("ReduceSum", ctx.op("Mul", [gy, y]), [axis], keepdims=True)
        dx = ctx.op("Mul", [y, ctx.op("Sub", [gy, inner])])
    else:
        total = ctx.reduce("ReduceSum", gy, [axis], keepdims=True)
        dx = ctx.op("Sub", [gy, ctx.op("Mul", [ctx.op("Exp", [y]), total])])
    if legacy:
        dx = ctx.op("Reshape", [dx, ctx.shape_of(node.input[0])])
    return [dx]


@rule("ReduceMean", "ReduceSum")
def _reduce(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a = node_attrs(node)
    x = node.input[0]
    rank = ctx.rank(x, node)
    if len(node.input) > 1 and node.input[1]:
        axes_v = ctx.value(node.input[1])
        if axes_v is None:
            raise cannot(node, "reduction axes computed at run time")
        axes = [int(v) for v in axes_v.reshape(-1)]
    else:
        axes = list(a.get("axes", []))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return _first(node, g[0])
        axes = list(range(rank))
    axes = sorted(ax % rank for ax in axes)
    reduced = np.zeros(rank, bool)
    reduced[axes] = True
    # Put the reduced axes back as size-1 dims, then broadcast over them.
    kept = ctx.op("Where", [ctx.const(reduced, np.bool_), ctx.const(np.ones(rank, np.int64)),
                            ctx.shape_of(x)])
    spread = ctx.op("Expand", [ctx.op("Reshape", [g[0], kept]), ctx.shape_of(x)])
    if node.op_type == "ReduceSum":
        return _first(node, spread)
    shape = ctx.static_shape(x)
    sizes = [shape[i] for i in axes] if shape is not None else [None]
    if all(isinstance(s, int) for s in sizes):
        count = ctx.const(float(np.prod(sizes)))
    else:
        ratio = ctx.op("Div", [ctx.op("ReduceProd", [ctx.shape_of(x)], keepdims=0),
                               ctx.op("ReduceProd", [kept], keepdims=0)])
        count = ctx.op("Cast", [ratio], to=onnx.helper.np_dtype_to_tensor_dtype(ctx.dtype))
    return _first(node, ctx.op("Div", [spread, count]))
