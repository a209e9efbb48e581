"""VJP rules for the variadic elementwise ops: Sum, Mean, Max and Min over any number of
(broadcasting) inputs.

Sum and Mean hand each input the output cotangent (Mean divided by the input count),
summed back over the axes that input was broadcast along. Max and Min route it to one
input per element: the first one equal to the result, so a tie is a valid subgradient
and the cotangent is never counted twice.
"""

from __future__ import annotations

import onnx

from .context import VJPContext, rule

Grads = list[str | None]


@rule("Sum", "Mean")
def _sum(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    y = node.output[0]
    gy = g[0]
    if node.op_type == "Mean" and len(node.input) > 1:
        gy = ctx.op("Div", [gy, ctx.const(float(len(node.input)))])
    return [ctx.unbroadcast(gy, x, y, node) if need else None
            for x, need in zip(node.input, needs, strict=True)]


@rule("Max", "Min")
def _max_min(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    y = node.output[0]
    if len(node.input) == 1:
        return [g[0]]
    to = onnx.helper.np_dtype_to_tensor_dtype(ctx.dtype)
    taken: str | None = None  # elements already routed to an earlier input
    out: Grads = []
    last = max((i for i, need in enumerate(needs) if need), default=-1)
    for i, (x, need) in enumerate(zip(node.input, needs, strict=True)):
        if i > last:
            out.append(None)
            continue
        hit = ctx.op("Equal", [y, x])  # broadcast to y's shape
        if taken is not None:
            hit = ctx.op("And", [hit, ctx.op("Not", [taken])])
        if need:
            routed = ctx.op("Mul", [g[0], ctx.op("Cast", [hit], to=to)])
            out.append(ctx.unbroadcast(routed, x, y, node))
        else:
            out.append(None)
        if i < last:
            taken = hit if taken is None else ctx.op("Or", [taken, hit])
    return out
