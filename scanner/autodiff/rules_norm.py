"""VJP rules for normalisations computed from the input itself: LRN, LayerNormalization,
InstanceNormalization.

The forward statistics (mean, 1/std, the LRN window sum) are recomputed in the backward
graph from the node's input rather than read from the forward node: LayerNormalization's
Mean / InvStdDev outputs are optional and absent in exported models, and LRN has none.
Mean-variance normalisations share one formula: with x̂ = (x - μ) r, r = 1 / sqrt(σ² + ε),
gh = g · scale,  dx = r (gh - mean(gh) - x̂ · mean(gh · x̂))  over the normalised axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from .context import VJPContext, cannot, node_attrs, rule

Grads = list[str | None]


def _normalised(ctx: VJPContext, x: str, axes: Sequence[int], eps: float) -> tuple[str, str]:
    """(x̂, r): the input normalised over `axes` (biased variance) and 1 / sqrt(σ² + ε)."""
    mu = ctx.reduce("ReduceMean", x, axes, keepdims=True)
    centered = ctx.op("Sub", [x, mu])
    var = ctx.reduce("ReduceMean", ctx.op("Mul", [centered, centered]), axes, keepdims=True)
    r = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [var, ctx.const(eps)])])])
    return ctx.op("Mul", [centered, r]), r


def _input_grad(ctx: VJPContext, gh: str, xhat: str, r: str, axes: Sequence[int]) -> str:
    mean_g = ctx.reduce("ReduceMean", gh, axes, keepdims=True)
    mean_gx = ctx.reduce("ReduceMean", ctx.op("Mul", [gh, xhat]), axes, keepdims=True)
    inner = ctx.op("Sub", [ctx.op("Sub", [gh, mean_g]), ctx.op("Mul", [xhat, mean_gx])])
    return ctx.op("Mul", [r, inner])


@rule("LayerNormalization")
def _layernorm(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    if any(gi is not None for gi in g[1:]):
        raise cannot(node, "its Mean / InvStdDev outputs are read downstream")
    a = node_attrs(node)
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x, node)
    axis = int(a.get("axis", -1)) % rank
    axes = list(range(axis, rank))
    xhat, r = _normalised(ctx, x, axes, float(a.get("epsilon", 1e-5)))
    scale = node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    gh = ctx.op("Mul", [g[0], scale])
    out: Grads = [_input_grad(ctx, gh, xhat, r, axes) if needs[0] else None]
    out.append(ctx.unbroadcast(ctx.op("Mul", [g[0], xhat]), scale, y, node)
               if needs[1] else None)
    if bias is not None:
        out.append(ctx.unbroadcast(g[0], bias, y, node) if needs[2] else None)
    return out


@rule("InstanceNormalization")
def _instancenorm(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    x, scale, bias = node.input[:3]
    rank = ctx.rank(x, node)
    if rank < 3:
        raise cannot(node, f"input of rank {rank} (expected N, C, spatial...)")
    axes = list(range(2, rank))
    xhat, r = _normalised(ctx, x, axes, float(node_attrs(node).get("epsilon", 1e-5)))
    channel = ctx.const([-1] + [1] * (rank - 2))  # [C] -> [C, 1, ...] broadcasts on axis 1
    out: Grads = [None, None, None]
    if needs[0]:
        gh = ctx.op("Mul", [g[0], ctx.op("Reshape", [scale, channel])])
        out[0] = _input_grad(ctx, gh, xhat, r, axes)
    per_channel = [0] + axes  # reduce all but axis 1, then drop to [C]
    if needs[1]:
        out[1] = ctx.reduce("ReduceSum", ctx.op("Mul", [g[0], xhat]), per_channel,
                            keepdims=False)
    if needs[2]:
        out[2] = ctx.reduce("ReduceSum", g[0], per_channel, keepdims=False)
    return out


def _channel_window_sum(ctx: VJPContext, v: str, size: int, before: int, after: int) -> str:
    """sum_{c' = c - before}^{c + after} v[:, c'] (zero outside the channels), any rank:
    v is viewed as [N, 1, C, rest] and convolved with a [size, 1] kernel of ones."""
    shape = ctx.shape_of(v)
    n_c = ctx.op("Slice", [shape, ctx.const([0]), ctx.const([2])])
    view = ctx.op("Concat", [ctx.op("Slice", [n_c, ctx.const([0]), ctx.const([1])]),
                             ctx.const([1]),
                             ctx.op("Slice", [n_c, ctx.const([1]), ctx.const([2])]),
                             ctx.const([-1])], axis=0)
    flat = ctx.op("Reshape", [v, view])
    ones = ctx.const(np.ones((1, 1, size, 1)))
    summed = ctx.op("Conv", [flat, ones], kernel_shape=[size, 1], pads=[before, 0, after, 0])
    return ctx.op("Reshape", [summed, shape])


@rule("LRN")
def _lrn(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    """y_c = x_c s_c^-β, s_c = bias + α/size · Σ_{c' ∈ [c - lo, c + hi]} x_c'²;
    dx_k = g_k s_k^-β - 2αβ/size · x_k Σ_{c: k ∈ window(c)} g_c y_c / s_c."""
    a = node_attrs(node)
    size = int(a["size"])
    alpha, beta, bias = float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)), float(
        a.get("bias", 1.0))
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    x, y = node.input[0], node.output[0]
    window = _channel_window_sum(ctx, ctx.op("Mul", [x, x]), size, lo, hi)
    s = ctx.op("Add", [ctx.op("Mul", [window, ctx.const(alpha / size)]), ctx.const(bias)])
    direct = ctx.op("Mul", [g[0], ctx.op("Pow", [s, ctx.const(-beta)])])
    # the transposed window: channel k feeds the sums of channels k - hi .. k + lo
    back = _channel_window_sum(ctx, ctx.op("Div", [ctx.op("Mul", [g[0], y]), s]), size, hi, lo)
    cross = ctx.op("Mul", [ctx.op("Mul", [x, back]), ctx.const(2.0 * alpha * beta / size)])
    return [ctx.op("Sub", [direct, cross])]
