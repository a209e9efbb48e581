"""VJP rules for pointwise ops: activations and broadcasting arithmetic.

Activations only differentiate their data input; a learnable parameter (PRelu slope, Clip
bounds) that itself depends on the image is refused. Where a derivative is cheaper from
the forward output (Sigmoid, Tanh, Elu) the rule reads the output.
"""

from __future__ import annotations

import math

import onnx

from .context import FLOAT_TYPES, VJPContext, cannot, node_attrs, rule

Grads = list[str | None]


def _only_first(node: onnx.NodeProto, needs: list[bool]) -> None:
    if any(needs[1:]):
        raise cannot(node, "gradient w.r.t. a parameter input is not supported")


def _where(ctx: VJPContext, cond: str, a: str, b: str) -> str:
    return ctx.op("Where", [cond, a, b])


def _masked(ctx: VJPContext, cond: str, g: str) -> str:
    """g where cond else 0. Mul by the cast mask: onnxruntime's CPU Where is ~6x slower."""
    to = onnx.helper.np_dtype_to_tensor_dtype(ctx.dtype)
    return ctx.op("Mul", [g, ctx.op("Cast", [cond], to=to)])


@rule("Relu")
def _relu(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    # Relu(x) > 0 exactly where x > 0. Reading the output leaves the input unread, so
    # onnxruntime can fuse the Relu into the Conv before it.
    return [_masked(ctx, ctx.op("Greater", [node.output[0], ctx.const(0.0)]), g[0])]


@rule("LeakyRelu")
def _leaky(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    alpha = node_attrs(node).get("alpha", 0.01)
    scaled = ctx.op("Mul", [g[0], ctx.const(alpha)])
    return [_where(ctx, ctx.op("Less", [node.input[0], ctx.const(0.0)]), scaled, g[0])]


@rule("PRelu")
def _prelu(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    _only_first(node, needs)
    scaled = ctx.op("Mul", [g[0], node.input[1]])  # slope broadcasts onto x's shape
    return [_where(ctx, ctx.op("Less", [node.input[0], ctx.const(0.0)]), scaled, g[0])]


@rule("Clip")
def _clip(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    _only_first(node, needs)
    # lo < x < hi exactly where lo < Clip(x) < hi (Clip(x) is x there and a bound elsewhere):
    # reading the output leaves the input unread, so onnxruntime can fuse the Clip (ReLU6)
    # into the Conv before it, as for Relu
    x = node.output[0]
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
    inside: str | None = None
    for bound, cmp in ((lo, "Greater"), (hi, "Less")):
        if bound:
            test = ctx.op(cmp, [x, bound])
            inside = test if inside is None else ctx.op("And", [inside, test])
    if inside is None:
        return [g[0]]
    return [_masked(ctx, inside, g[0])] + [None] * (len(node.input) - 1)


@rule("Sigmoid")
def _sigmoid(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    y = node.output[0]
    slope = ctx.op("Mul", [y, ctx.op("Sub", [ctx.const(1.0), y])])
    return [ctx.op("Mul", [g[0], slope])]


@rule("Tanh")
def _tanh(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    y = node.output[0]
    slope = ctx.op("Sub", [ctx.const(1.0), ctx.op("Mul", [y, y])])
    return [ctx.op("Mul", [g[0], slope])]


@rule("HardSigmoid")
def _hardsigmoid(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a = node_attrs(node)
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    t = ctx.op("Add", [ctx.op("Mul", [node.input[0], ctx.const(alpha)]), ctx.const(beta)])
    inside = ctx.op("And", [ctx.op("Greater", [t, ctx.const(0.0)]),
                            ctx.op("Less", [t, ctx.const(1.0)])])
    return [_masked(ctx, inside, ctx.op("Mul", [g[0], ctx.const(alpha)]))]


@rule("HardSwish")
def _hardswish(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    # y = x * clip(x/6 + 1/2, 0, 1): slope 0 below -3, 1 above 3, x/3 + 1/2 between.
    x = node.input[0]
    mid = ctx.op("Add", [ctx.op("Mul", [x, ctx.const(1.0 / 3.0)]), ctx.const(0.5)])
    upper = _where(ctx, ctx.op("Greater", [x, ctx.const(3.0)]), ctx.const(1.0), mid)
    slope = _where(ctx, ctx.op("Less", [x, ctx.const(-3.0)]), ctx.const(0.0), upper)
    return [ctx.op("Mul", [g[0], slope])]


@rule("Elu")
def _elu(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    alpha = node_attrs(node).get("alpha", 1.0)
    neg = ctx.op("Mul", [g[0], ctx.op("Add", [node.output[0], ctx.const(alpha)])])
    return [_where(ctx, ctx.op("Greater", [node.input[0], ctx.const(0.0)]), g[0], neg)]


@rule("Selu")
def _selu(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a = node_attrs(node)
    alpha = a.get("alpha", 1.67326319217681884765625)
    gamma = a.get("gamma", 1.05070102214813232421875)
    pos = ctx.op("Mul", [g[0], ctx.const(gamma)])
    neg = ctx.op("Mul", [g[0], ctx.op("Add", [node.output[0], ctx.const(alpha * gamma)])])
    return [_where(ctx, ctx.op("Greater", [node.input[0], ctx.const(0.0)]), pos, neg)]


@rule("Softplus")
def _softplus(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    return [ctx.op("Mul", [g[0], ctx.op("Sigmoid", [node.input[0]])])]


@rule("Gelu")
def _gelu(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    x = node.input[0]
    if node_attrs(node).get("approximate", "none") == "tanh":
        # y = x/2 (1 + tanh u), u = c (x + k x^3)
        c, k = math.sqrt(2.0 / math.pi), 0.044715
        x2 = ctx.op("Mul", [x, x])
        u = ctx.op("Mul", [ctx.op("Mul", [x, ctx.op("Add", [ctx.const(1.0), ctx.op(
            "Mul", [x2, ctx.const(k)])])]), ctx.const(c)])
        t = ctx.op("Tanh", [u])
        du = ctx.op("Mul", [ctx.op("Add", [ctx.const(1.0), ctx.op("Mul", [x2, ctx.const(
            3 * k)])]), ctx.const(c)])
        sech2 = ctx.op("Sub", [ctx.const(1.0), ctx.op("Mul", [t, t])])
        term = ctx.op("Mul", [ctx.op("Mul", [x, sech2]), du])
        slope = ctx.op("Mul", [ctx.op("Add", [ctx.op("Add", [ctx.const(1.0), t]), term]),
                               ctx.const(0.5)])
    else:
        # y = x Phi(x): slope Phi(x) + x phi(x)
        phi_cdf = ctx.op("Mul", [ctx.op("Add", [ctx.const(1.0), ctx.op("Erf", [
            ctx.op("Mul", [x, ctx.const(1.0 / math.sqrt(2.0))])])]), ctx.const(0.5)])
        pdf = ctx.op("Mul", [ctx.op("Exp", [ctx.op("Mul", [ctx.op("Mul", [x, x]),
                                                           ctx.const(-0.5)])]),
                             ctx.const(1.0 / math.sqrt(2.0 * math.pi))])
        slope = ctx.op("Add", [phi_cdf, ctx.op("Mul", [x, pdf])])
    return [ctx.op("Mul", [g[0], slope])]


@rule("Erf")
def _erf(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    x = node.input[0]
    e = ctx.op("Exp", [ctx.op("Neg", [ctx.op("Mul", [x, x])])])
    return [ctx.op("Mul", [g[0], ctx.op("Mul", [e, ctx.const(2.0 / math.sqrt(math.pi))])])]


@rule("Exp")
def _exp(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    return [ctx.op("Mul", [g[0], node.output[0]])]


@rule("Log")
def _log(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    return [ctx.op("Div", [g[0], node.input[0]])]


@rule("Sqrt")
def _sqrt(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    return [ctx.op("Div", [g[0], ctx.op("Mul", [node.output[0], ctx.const(2.0)])])]


@rule("Neg")
def _neg(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    return [ctx.op("Neg", [g[0]])]


@rule("Abs")
def _abs(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    return [ctx.op("Mul", [g[0], ctx.op("Sign", [node.input[0]])])]


@rule("Reciprocal")
def _reciprocal(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    y = node.output[0]
    return [ctx.op("Neg", [ctx.op("Mul", [g[0], ctx.op("Mul", [y, y])])])]


@rule("Pow")
def _pow(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    if needs[1]:
        raise cannot(node, "an exponent that depends on the input")
    base, exponent = node.input[:2]
    # d x^p / dx = p x^(p-1); the exponent keeps its own type, so cast it once.
    p = ctx.op("Cast", [exponent], to=onnx.helper.np_dtype_to_tensor_dtype(ctx.dtype))
    slope = ctx.op("Mul", [p, ctx.op("Pow", [base, ctx.op("Sub", [p, ctx.const(1.0)])])])
    return [ctx.unbroadcast(ctx.op("Mul", [g[0], slope]), base, node.output[0], node), None]


@rule("Where")
def _where_rule(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    # The condition gets no cotangent: if it depends on the input, the comparison that
    # made it has no rule and is reported.
    cond, a, b = node.input
    y = node.output[0]
    zero = ctx.const(0.0)
    ga = ctx.unbroadcast(_where(ctx, cond, g[0], zero), a, y, node) if needs[1] else None
    gb = ctx.unbroadcast(_where(ctx, cond, zero, g[0]), b, y, node) if needs[2] else None
    return [g[0] if needs[0] else None, ga, gb]


@rule("Identity", "Dropout")
def _identity(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = ctx.value(node.input[2])
        if mode is None or bool(mode):
            raise cannot(node, "training_mode must be a constant false")
    return [g[0]] + [None] * (len(node.input) - 1)


@rule("Cast")
def _cast(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    src = ctx.elem_type(node.input[0])
    if src in FLOAT_TYPES:
        return [ctx.op("Cast", [g[0]], to=src)]
    # An integer/bool source: pass the cotangent on, so the op that made the
    # non-differentiable values (NonZero, ArgMax, a comparison) is the one reported.
    return [g[0]]


# ---------------------------------------------------------------- arithmetic

@rule("Add", "Sub")
def _add(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a, b = node.input[:2]
    y = node.output[0]
    ga = ctx.unbroadcast(g[0], a, y, node) if needs[0] else None
    gb = None
    if needs[1]:
        gy = ctx.op("Neg", [g[0]]) if node.op_type == "Sub" else g[0]
        gb = ctx.unbroadcast(gy, b, y, node)
    return [ga, gb]


@rule("Mul")
def _mul(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a, b = node.input[:2]
    y = node.output[0]
    ga = ctx.unbroadcast(ctx.op("Mul", [g[0], b]), a, y, node) if needs[0] else None
    gb = ctx.unbroadcast(ctx.op("Mul", [g[0], a]), b, y, node) if needs[1] else None
    return [ga, gb]


@rule("Div")
def _div(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a, b = node.input[:2]
    y = node.output[0]
    g_over_b = ctx.op("Div", [g[0], b])
    ga = ctx.unbroadcast(g_over_b, a, y, node) if needs[0] else None
    gb = None
    if needs[1]:  # d(a/b)/db = -y/b
        gb = ctx.unbroadcast(ctx.op("Neg", [ctx.op("Mul", [g_over_b, y])]), b, y, node)
    return [ga, gb]
