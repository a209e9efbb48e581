"""VJP rules for the layers: Conv, Gemm, MatMul, BatchNormalization, pooling.

Conv, Gemm and MatMul differentiate every operand (recovery trains weights and biases),
BatchNormalization its input, scale and bias; running statistics are refused. A
convolution's input gradient is a ConvTranspose with the same weight and geometry; its
output_padding recovers the input size (static spatial dims), or, with dynamic spatial
dims, the largest output_padding plus a crop to the runtime shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .context import VJPContext, cannot, node_attrs, rule

Grads = list[str | None]


@dataclass(frozen=True)
class Window:
    """Sliding-window geometry with explicit pads (auto_pad resolved)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end...

    @property
    def rank(self) -> int:
        return len(self.kernel)

    def span(self, i: int) -> int:
        return (self.kernel[i] - 1) * self.dilations[i] + 1

    def out_size(self, i: int, size: int, ceil: bool = False) -> int:
        room = size + self.pads[i] + self.pads[i + self.rank] - self.span(i)
        return (-(-room // self.strides[i]) if ceil else room // self.strides[i]) + 1

    def output_padding(self, spatial: tuple[int, ...] | None) -> list[int]:
        """What a ConvTranspose needs on top of its natural size to give back `spatial`.

        That is (size + pads - span) mod stride; with the size unknown, stride - 1 covers
        every case (the caller crops the surplus), and onnxruntime refuses more."""
        if spatial is None:
            return [s - 1 for s in self.strides]
        extra = []
        for i, size in enumerate(spatial):
            natural = (self.strides[i] * (self.out_size(i, size) - 1) + self.span(i)
                       - self.pads[i] - self.pads[i + self.rank])
            extra.append(size - natural)
        return extra


def _window(ctx: VJPContext, node: onnx.NodeProto, x: str, kernel: tuple[int, ...]) -> Window:
    a = node_attrs(node)
    r = len(kernel)
    strides = tuple(a.get("strides", [1] * r))
    dilations = tuple(a.get("dilations", [1] * r))
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        pads = tuple(a.get("pads", [0] * 2 * r)) if auto_pad == "NOTSET" else (0,) * (2 * r)
        return Window(kernel, strides, dilations, pads)
    spatial = _spatial(ctx, x)
    if spatial is None:
        raise cannot(node, f"auto_pad={auto_pad} needs static spatial dims of {x}")
    begin, end = [], []
    for i, size in enumerate(spatial):
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return Window(kernel, strides, dilations, tuple(begin + end))


def _spatial(ctx: VJPContext, x: str) -> tuple[int, ...] | None:
    shape = ctx.static_shape(x)
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return tuple(int(d) for d in shape[2:])  # type: ignore[arg-type]


def _transpose_conv(ctx: VJPContext, g: str, w: str, x: str, win: Window, group: int) -> str:
    """Adjoint of a convolution of `x` with `w` (same weights, strides, pads, dilations)."""
    spatial = _spatial(ctx, x)
    out = ctx.op("ConvTranspose", [g, w], strides=list(win.strides), pads=list(win.pads),
                 dilations=list(win.dilations), group=group, kernel_shape=list(win.kernel),
                 output_padding=win.output_padding(spatial))
    if spatial is not None:
        return out
    # Positions below the input size do not depend on output_padding: crop the rest.
    ends = ctx.op("Slice", [ctx.shape_of(x), ctx.const([2]), ctx.const([2 + win.rank])])
    return ctx.op("Slice", [out, ctx.const([0] * win.rank), ends,
                            ctx.const(list(range(2, 2 + win.rank)))])


def _kernel_of(ctx: VJPContext, node: onnx.NodeProto, w: str) -> tuple[int, ...]:
    kernel = node_attrs(node).get("kernel_shape")
    if kernel:
        return tuple(kernel)
    wshape = ctx.static_dims(w)
    if wshape is None:
        raise cannot(node, "kernel_shape unknown (no attribute, weight shape not static)")
    return wshape[2:]


# Below this many adjoint output channels (the conv's input channels: an image's 1 or 3),
# onnxruntime's ConvTranspose beats the flipped Conv: 8 vs 28 ms for 32 -> 1 channels on
# 270 28x28 rows, 15 vs 28 ms for 32 -> 3; from 8 channels on Conv is as fast or faster.
FLIPPED_CONV_MIN_CHANNELS = 8


def _flipped_conv(ctx: VJPContext, g: str, weight: np.ndarray, win: Window,
                  group: int) -> str | None:
    """For stride 1, the adjoint is itself a convolution: channels in/out swapped per
    group, kernel flipped, pads (k-1)*d - p. onnxruntime's Conv is much faster than its
    ConvTranspose unless the adjoint has few output channels. None when it does not apply
    (negative pads) or is not the faster one."""
    r = win.rank
    span = [win.span(i) - 1 for i in range(r)]
    pads = [span[i % r] - p for i, p in enumerate(win.pads)]
    m, cg = weight.shape[:2]
    if any(p < 0 for p in pads) or cg * group < FLIPPED_CONV_MIN_CHANNELS:
        return None
    per_group = weight.reshape(group, m // group, cg, *weight.shape[2:])
    swapped = np.swapaxes(per_group, 1, 2).reshape(cg * group, m // group, *weight.shape[2:])
    flipped = np.flip(swapped, axis=tuple(range(2, 2 + r)))
    return ctx.op("Conv", [g, ctx.const(np.ascontiguousarray(flipped))], pads=pads,
                  dilations=list(win.dilations), group=group, kernel_shape=list(win.kernel))


@rule("Conv")
def _conv(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    x, w = node.input[:2]
    win = _window(ctx, node, x, _kernel_of(ctx, node, w))
    group = int(node_attrs(node).get("group", 1))
    out: Grads = [None] * len(node.input)
    if needs[0]:
        weight = ctx.value(w)
        if weight is not None and all(s == 1 for s in win.strides):
            out[0] = _flipped_conv(ctx, g[0], weight, win, group)
        if out[0] is None:
            out[0] = _transpose_conv(ctx, g[0], w, x, win, group)
    if needs[1]:
        out[1] = _conv_weight_grad(ctx, node, g[0], x, w, win, group)
    if len(node.input) > 2 and needs[2]:
        rank = ctx.rank(node.output[0], node)
        out[2] = ctx.reduce("ReduceSum", g[0], [0] + list(range(2, rank)), keepdims=False)
    return out


def _conv_weight_grad(ctx: VJPContext, node: onnx.NodeProto, g: str, x: str, w: str,
                      win: Window, group: int) -> str:
    """d loss / d W[m, c, k] = sum_n sum_o g[n, m, o] x_pad[n, c, o*stride + k*dilation]:
    itself a convolution, with the batch as the channel axis being reduced, the
    cotangent as the kernel, stride and dilation swapped and the forward pads. Groups
    ride along as the convolution's groups (x -> [Cg, G*N, ...], g -> [G*Mg, N, ...]).
    The result is at least the kernel's size (floor-mode output sizes); the surplus, the
    rows the forward window never reached, is cropped."""
    wshape = ctx.static_dims(w)
    if wshape is None:
        raise cannot(node, f"weight gradient needs the static shape of {w}")
    m, cg = wshape[:2]
    r = win.rank
    spatial_axes = list(range(2, 2 + r))
    if group == 1:
        xs = ctx.op("Transpose", [x], perm=[1, 0] + spatial_axes)
        gs = ctx.op("Transpose", [g], perm=[1, 0] + spatial_axes)
    else:
        mg = m // group
        x_tail = ctx.op("Slice", [ctx.shape_of(x), ctx.const([2]), ctx.const([2 + r])])
        g_tail = ctx.op("Slice", [ctx.shape_of(g), ctx.const([2]), ctx.const([2 + r])])
        perm5 = list(range(3, 3 + r))
        x5 = ctx.op("Reshape", [x, ctx.op("Concat", [ctx.const([-1, group, cg]), x_tail],
                                          axis=0)])
        xs = ctx.op("Reshape", [ctx.op("Transpose", [x5], perm=[2, 1, 0] + perm5),
                                ctx.op("Concat", [ctx.const([cg, -1]), x_tail], axis=0)])
        g5 = ctx.op("Reshape", [g, ctx.op("Concat", [ctx.const([-1, group, mg]), g_tail],
                                          axis=0)])
        gs = ctx.op("Reshape", [ctx.op("Transpose", [g5], perm=[1, 2, 0] + perm5),
                                ctx.op("Concat", [ctx.const([m, -1]), g_tail], axis=0)])
    full = ctx.op("Conv", [xs, gs], pads=list(win.pads), strides=list(win.dilations),
                  dilations=list(win.strides), group=group)
    cropped = ctx.op("Slice", [full, ctx.const([0] * r), ctx.const(list(win.kernel)),
                               ctx.const(spatial_axes)])
    return ctx.op("Transpose", [cropped], perm=[1, 0] + spatial_axes)


# ---------------------------------------------------------------- dense layers

@rule("Gemm")
def _gemm(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a_attr = node_attrs(node)
    alpha, beta = float(a_attr.get("alpha", 1.0)), float(a_attr.get("beta", 1.0))
    # any non-zero value transposes, as onnxruntime reads it (the fuzzer's transB = -2**63
    # made 1 - tb overflow the adjoint's int64 attribute)
    ta, tb = int(bool(a_attr.get("transA", 0))), int(bool(a_attr.get("transB", 0)))
    a, b = node.input[:2]
    out: Grads = [None] * len(node.input)
    if needs[0]:
        out[0] = (ctx.op("Gemm", [g[0], b], alpha=alpha, transB=1 - tb) if not ta else
                  ctx.op("Gemm", [b, g[0]], alpha=alpha, transA=tb, transB=1))
    if needs[1]:
        out[1] = (ctx.op("Gemm", [a, g[0]], alpha=alpha, transA=1 - ta) if not tb else
                  ctx.op("Gemm", [g[0], a], alpha=alpha, transA=1, transB=ta))
    if len(node.input) > 2 and needs[2]:
        scaled = ctx.op("Mul", [g[0], ctx.const(beta)]) if beta != 1.0 else g[0]
        out[2] = ctx.unbroadcast(scaled, node.input[2], node.output[0], node)
    return out


def _swap_last(ctx: VJPContext, t: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return ctx.op("Transpose", [t], perm=perm)


@rule("MatMul")
def _matmul(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a, b = node.input[:2]
    y = node.output[0]
    ra, rb = ctx.rank(a, node), ctx.rank(b, node)
    if ra < 2 or rb < 2:
        raise cannot(node, "1-D MatMul operands are not supported")
    ys, as_, bs = ctx.static_shape(y), ctx.static_shape(a), ctx.static_shape(b)
    if ys is None or as_ is None or bs is None:
        raise cannot(node, "operand shapes unknown after shape inference")
    out: Grads = [None, None]
    if needs[0]:  # dA = g B^T, summed over the batch dims A was broadcast along
        full = ctx.op("MatMul", [g[0], _swap_last(ctx, b, rb)])
        out[0] = ctx.unbroadcast(full, a, y, node, out_shape=ys[:-2] + as_[-2:])
    if needs[1]:  # dB = A^T g
        full = ctx.op("MatMul", [_swap_last(ctx, a, ra), g[0]])
        out[1] = ctx.unbroadcast(full, b, y, node, out_shape=ys[:-2] + bs[-2:])
    return out


@rule("BatchNormalization")
def _batchnorm(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a = node_attrs(node)
    if a.get("training_mode", 0) or len(node.output) > 1 and any(node.output[1:]):
        raise cannot(node, "training-mode BatchNormalization")
    if any(needs[3:5]):
        raise cannot(node, "gradient w.r.t. the running mean/variance is not supported")
    x, scale, _, mean, var = node.input[:5]
    rank = ctx.rank(x, node)
    channel = ctx.const([-1] + [1] * (rank - 2))
    sd = ctx.op("Sqrt", [ctx.op("Add", [var, ctx.const(float(a.get("epsilon", 1e-5)))])])
    out: Grads = [None] * len(node.input)
    if needs[0]:
        out[0] = ctx.op("Mul", [g[0], ctx.op("Reshape", [ctx.op("Div", [scale, sd]), channel])])
    others = [0] + list(range(2, rank))
    if needs[1]:  # d y / d scale = (x - mean) / sd, summed over all but the channel axis
        normed = ctx.op("Div", [ctx.op("Sub", [x, ctx.op("Reshape", [mean, channel])]),
                                ctx.op("Reshape", [sd, channel])])
        out[1] = ctx.reduce("ReduceSum", ctx.op("Mul", [g[0], normed]), others,
                            keepdims=False)
    if needs[2]:
        out[2] = ctx.reduce("ReduceSum", g[0], others, keepdims=False)
    return out


# ---------------------------------------------------------------- pooling

@rule("MaxPool")
def _maxpool(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a = node_attrs(node)
    if a.get("storage_order", 0):
        raise cannot(node, "storage_order=1")
    x = node.input[0]
    win = _window(ctx, node, x, tuple(a["kernel_shape"]))
    tiled = _maxpool_tiles(ctx, g[0], x, node.output[0], win, bool(a.get("ceil_mode", 0)))
    if tiled is not None:
        return [tiled]
    if windows_overlap(node) and ctx.opset < 16:
        raise cannot(node, f"overlapping windows need ScatterElements reduction (opset >= 16, "
                           f"model has {ctx.opset})")
    if len(node.output) < 2 or not node.output[1]:
        # The forward pass already knows where each maximum came from: ask for it.
        del node.output[1:]
        node.output.append(ctx.fresh("maxpool_indices"))
    flat = ctx.const([-1])
    zeros = ctx.op("Reshape", [ctx.zeros_like(x), flat])
    extra = {"reduction": "add"} if ctx.opset >= 16 else {}
    scattered = ctx.op("ScatterElements", [zeros, ctx.op("Reshape", [node.output[1], flat]),
                                           ctx.op("Reshape", [g[0], flat])], axis=0, **extra)
    return [ctx.op("Reshape", [scattered, ctx.shape_of(x)])]


def windows_overlap(node: onnx.NodeProto) -> bool:
    """A pooling window reaches into the next one (kernel · dilation > stride on an axis):
    its backward must add up scattered cotangents (ScatterElements reduction, opset 16)."""
    a = node_attrs(node)
    kernel = list(a.get("kernel_shape", []))
    strides = a.get("strides", [1] * len(kernel))
    dilations = a.get("dilations", [1] * len(kernel))
    return any(k * d > s for k, d, s in zip(kernel, dilations, strides, strict=False))


def _maxpool_tiles(ctx: VJPContext, g: str, x: str, y: str, win: Window,
                   ceil_mode: bool) -> str | None:
    """Disjoint 2-D windows (kernel == stride, no pads/dilation/ceil_mode, static H, W, not
    float64): each output's cotangent is split evenly among the maxima of its tile, found
    by comparing the tile with its pooled value upsampled (a valid subgradient; one share
    each where a tile ties).
    Asking MaxPool for Indices makes onnxruntime leave its fast kernel (~15x slower) and the
    scatter costs as much again; this uses only Resize, pooling and elementwise ops, about
    half the time of an ArgMax over SpaceToDepth tiles."""
    spatial = _spatial(ctx, x)
    if (spatial is None or win.rank != 2 or any(win.pads) or any(d != 1 for d in win.dilations)
            or tuple(win.strides) != tuple(win.kernel) or ceil_mode
            or ctx.dtype == np.float64):  # onnxruntime's CPU Resize has no double kernel
        return None
    (kh, kw), (h, w) = win.kernel, spatial
    ho, wo = h // kh, w // kw
    if ho == 0 or wo == 0:
        return None
    cropped = (ho * kh, wo * kw) != (h, w)  # floor mode drops the trailing rows/columns
    xc = ctx.op("Slice", [x, ctx.const([0, 0]), ctx.const([ho * kh, wo * kw]),
                          ctx.const([2, 3])]) if cropped else x
    scales = ctx.const([1, 1, kh, kw], np.float32)
    no_roi = ctx.const(np.zeros(0), np.float32)

    def upsample(t: str) -> str:
        return ctx.op("Resize", [t, no_roi, scales], mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    hit = ctx.op("Cast", [ctx.op("Equal", [xc, upsample(y)])],
                 to=onnx.helper.np_dtype_to_tensor_dtype(ctx.dtype))
    tile = {"kernel_shape": [kh, kw], "strides": [kh, kw]}
    ties = ctx.op("Mul", [ctx.op("AveragePool", [hit], **tile), ctx.const(float(kh * kw))])
    back = ctx.op("Mul", [hit, upsample(ctx.op("Div", [g, ties]))])
    if cropped:
        back = ctx.op("Pad", [back, ctx.const([0, 0, 0, 0, 0, 0, h - ho * kh, w - wo * kw])])
    return back


@rule("AveragePool")
def _avgpool(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a = node_attrs(node)
    x = node.input[0]
    win = _window(ctx, node, x, tuple(a["kernel_shape"]))
    spatial = _spatial(ctx, x)
    if a.get("ceil_mode", 0):
        if spatial is None or any(win.out_size(i, s, True) != win.out_size(i, s)
                                  for i, s in enumerate(spatial)):
            raise cannot(node, "ceil_mode=1 with windows past the padded input")
    volume = float(np.prod(win.kernel))
    if a.get("count_include_pad", 0) or not any(win.pads):
        scaled = ctx.op("Div", [g[0], ctx.const(volume)])
    else:
        # Divisor per output = number of real (non-pad) inputs in its window.
        ones = ctx.op("ConstantOfShape", [ctx.shape_of(x)],
                      value=numpy_helper.from_array(np.ones(1, ctx.dtype)))
        dil = {"dilations": list(win.dilations)} if any(d != 1 for d in win.dilations) else {}
        pooled = ctx.op("AveragePool", [ones], kernel_shape=list(win.kernel),
                        strides=list(win.strides), pads=list(win.pads), count_include_pad=1,
                        **dil)
        scaled = ctx.op("Div", [g[0], ctx.op("Mul", [pooled, ctx.const(volume)])])
    # Sum-pool adjoint per plane: fold N*C into the batch, one all-ones kernel.
    planes = ctx.op("Reshape", [scaled, ctx.const([-1, 1] + [0] * win.rank)])
    ones_k = ctx.const(np.ones((1, 1) + win.kernel))
    spread = _transpose_conv(ctx, planes, ones_k, x, win, 1)  # x gives the spatial dims
    return [ctx.op("Reshape", [spread, ctx.shape_of(x)])]


@rule("GlobalAveragePool")
def _gap(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    x = node.input[0]
    spatial = _spatial(ctx, x)
    if spatial is not None:
        count = ctx.const(float(np.prod(spatial)))
    else:
        dims = ctx.op("Slice", [ctx.shape_of(x), ctx.const([2]), ctx.const([2 ** 62])])
        count = ctx.op("Cast", [ctx.op("ReduceProd", [dims], keepdims=0)],
                       to=onnx.helper.np_dtype_to_tensor_dtype(ctx.dtype))
    return [ctx.op("Expand", [ctx.op("Div", [g[0], count]), ctx.shape_of(x)])]
