"""VJP rule for Resize (nearest and linear over the two spatial axes of an NCHW tensor).

Both modes are linear in X and separable: each output plane is R_h · X · R_wᵀ with fixed
interpolation matrices. Rather than re-deriving every coordinate_transformation_mode and
nearest_mode rounding rule, the matrices are read off onnxruntime itself, by resizing a
batch of one-hot rows (one axis at a time) with the node's own attributes. The gradient
is then R_hᵀ · G · R_w, two MatMuls.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .context import VJPContext, cannot, node_attrs, rule

Grads = list[str | None]
SUPPORTED_MODES = ("nearest", "linear")
SUPPORTED_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                        "half_pixel_symmetric")


def _interpolation_matrix(node: onnx.NodeProto, opset: int, size: int, axis: int,
                          scale: float | None, out_size: int) -> np.ndarray:
    """R with R[o, i] = weight of input i in output o along `axis` (2 or 3)."""
    basis = np.eye(size, dtype=np.float32)
    shape = [size, 1, 1, 1]
    shape[axis] = size
    x = basis.reshape(shape)
    scales = np.ones(4, np.float32)
    sizes = np.array([size, 1, 1, 1], np.int64)
    if scale is not None:
        scales[axis] = scale
        extra = [helper.make_tensor("scales", onnx.TensorProto.FLOAT, [4], scales)]
        inputs = ["x", "", "scales"]
    else:
        sizes[axis] = out_size
        extra = [helper.make_tensor("sizes", onnx.TensorProto.INT64, [4], sizes)]
        inputs = ["x", "", "", "sizes"]
    keep = {k: v for k, v in node_attrs(node).items() if k != "axes"}
    resize = helper.make_node("Resize", inputs, ["y"], **keep)
    graph = helper.make_graph(
        [resize], "resize_matrix",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], extra)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]  # [size, 1, out, 1] or [size, 1, 1, out]
    return y.reshape(size, -1).T.astype(np.float64)


@rule("Resize")
def _resize(ctx: VJPContext, node: onnx.NodeProto, g: Grads, needs: list[bool]) -> Grads:
    a = node_attrs(node)
    mode = a.get("mode", "nearest")
    transform = a.get("coordinate_transformation_mode", "half_pixel")
    if mode not in SUPPORTED_MODES:
        raise cannot(node, f"mode={mode} (supported: {', '.join(SUPPORTED_MODES)})")
    if transform not in SUPPORTED_TRANSFORMS:
        raise cannot(node, f"coordinate_transformation_mode={transform}")
    if a.get("antialias", 0) or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise cannot(node, "antialias or keep_aspect_ratio_policy")
    x, y = node.input[0], node.output[0]
    in_shape, out_shape = ctx.static_shape(x), ctx.static_shape(y)
    if in_shape is None or out_shape is None or len(in_shape) != 4:
        raise cannot(node, "needs a 4-D input with known shapes")
    spatial_in, spatial_out = in_shape[2:], out_shape[2:]
    if not all(isinstance(d, int) for d in (*spatial_in, *spatial_out)):
        raise cannot(node, "needs static spatial dims")
    scales = ctx.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = ctx.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    axes = a.get("axes")
    if scales is not None and scales.size:
        full = _full(scales.astype(np.float64), axes, 1.0)
        if full[0] != 1 or full[1] != 1:
            raise cannot(node, "resizing the batch or channel axis")
        per_axis: list[float | None] = [float(full[2]), float(full[3])]
    elif sizes is not None and sizes.size:
        per_axis = [None, None]
    else:
        raise cannot(node, "scales/sizes computed at run time")
    rows = _interpolation_matrix(node, ctx.opset, int(spatial_in[0]), 2, per_axis[0],
                                 int(spatial_out[0]))
    cols = _interpolation_matrix(node, ctx.opset, int(spatial_in[1]), 3, per_axis[1],
                                 int(spatial_out[1]))
    # dX = R_hᵀ · G · R_w, broadcast over the batch and channel planes
    left = ctx.op("MatMul", [ctx.const(rows.T), g[0]])
    return [ctx.op("MatMul", [left, ctx.const(cols)])] + [None] * (len(node.input) - 1)


def _full(values: np.ndarray, axes: list[int] | None, fill: float) -> np.ndarray:
    if not axes:
        return values
    full = np.full(4, fill)
    for ax, v in zip(axes, values, strict=True):
        full[ax % 4] = v
    return full
