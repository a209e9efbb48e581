"""Backward rules against central finite differences, GradientProgram, SS205 errors.

Tolerances: every rule is checked in float64 (the graph cast to double, run in onnx's
reference evaluator) with eps=1e-6 along 3 random directions; a correct rule lands near
1e-9, we require relative error <= 1e-3. The same backward graph is then run by
onnxruntime in float32 and must match the float64 gradient to 1e-4 (relative L2).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from scanner.autodiff import (
    GradientProgram,
    build_vjp,
    check_gradients,
    check_vjp,
    to_double,
)
from scanner.autodiff.backward import COTANGENT_SUFFIX, GRAD_SUFFIX
from scanner.autodiff.check import REFERENCE_OVERRIDES
from scanner.errors import Inconclusive

FD_TOL = 1e-3
F32_TOL = 1e-4
RNG = np.random.default_rng(1234)


def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def make(nodes: list[onnx.NodeProto], x_shape: list, inits: dict[str, np.ndarray] | None = None,
         *, opset: int = 17, outputs: tuple[str, ...] = ("y",),
         extra_inputs: list[onnx.ValueInfoProto] | None = None) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    graph = helper.make_graph(
        nodes, "g", inputs + (extra_inputs or []),
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    return model


def node(op: str, inputs: list[str], out: str = "y", **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [out], **attrs)


def unary(op: str, shape: tuple[int, ...] = (2, 3, 4, 4), scale: float = 1.0, opset: int = 17,
          **attrs: object) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    return make([node(op, ["x"], **attrs)], list(shape), opset=opset), {"x": rand(*shape,
                                                                                 scale=scale)}


Case = Callable[[], tuple[onnx.ModelProto, dict[str, np.ndarray]]]


def conv(x_shape: tuple[int, ...], w_shape: tuple[int, ...], bias: bool = False,
         dynamic: bool = False, **attrs: object) -> Case:
    def build() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        inits = {"w": rand(*w_shape)}
        ins = ["x", "w"]
        if bias:
            inits["b"] = rand(w_shape[0])
            ins.append("b")
        shape: list = ["N", x_shape[1], "H", "W"] if dynamic else list(x_shape)
        return make([node("Conv", ins, **attrs)], shape, inits), {"x": rand(*x_shape)}
    return build


def pool(op: str, x_shape: tuple[int, ...] = (2, 3, 7, 7), opset: int = 17,
         dynamic: bool = False, **attrs: object) -> Case:
    def build() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        shape: list = ["N", x_shape[1], "H", "W"] if dynamic else list(x_shape)
        return make([node(op, ["x"], **attrs)], shape, opset=opset), {"x": rand(*x_shape)}
    return build


def binary(op: str, other_shape: tuple[int, ...], x_shape: tuple[int, ...] = (2, 3, 4, 5),
           symbolic_batch: bool = True) -> Case:
    """x (op) constant, broadcasting the constant."""
    def build() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        c = rand(*other_shape) + (3.0 if op == "Div" else 0.0)
        shape: list = ["N", *x_shape[1:]] if symbolic_batch else list(x_shape)
        return make([node(op, ["x", "c"])], shape, {"c": c}), {"x": rand(*x_shape)}
    return build


def both_sides(op: str) -> Case:
    """x (op) f(x) with f(x) broadcast: both operands depend on x, reduce-sum both ways."""
    def build() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        nodes = [node("ReduceSum", ["x", "ax"], "s", keepdims=1),
                 node("Add", ["s", "three"], "d"),
                 node("Mul", ["d", "d"], "e"),
                 node("Add", ["e", "one"], "f"),
                 node(op, ["f", "x"])]
        inits = {"ax": np.array([1, 3], np.int64), "three": np.array(3, np.float32),
                 "one": np.array(1.0, np.float32)}
        return make(nodes, ["N", 3, 4, 5], inits), {"x": rand(2, 3, 4, 5)}
    return build


def gemm(trans_a: int, trans_b: int, alpha: float, beta: float, dependent_b: bool) -> Case:
    def build() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        a_shape = (6, 3) if trans_a else (3, 6)
        b_shape = (4, 6) if trans_b else (6, 4)
        inits = {"c": rand(4)}
        nodes = []
        if dependent_b:  # B = x^T W: both Gemm operands depend on x (no transposes)
            nodes += [node("Transpose", ["x"], "xt", perm=[1, 0]),
                      node("MatMul", ["xt", "wb"], "b")]
            inits["wb"] = rand(3, 4)
        else:
            inits["b"] = rand(*b_shape)
        nodes.append(node("Gemm", ["x", "b", "c"], transA=trans_a, transB=trans_b, alpha=alpha,
                          beta=beta))
        return make(nodes, list(a_shape), inits), {"x": rand(*a_shape)}
    return build


def graph_case(nodes: list[onnx.NodeProto], x_shape: tuple[int, ...],
               inits: dict[str, np.ndarray] | None = None, opset: int = 17,
               symbolic: list | None = None, scale: float = 1.0) -> Case:
    def build() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        shape = symbolic if symbolic is not None else list(x_shape)
        return make(nodes, shape, inits, opset=opset), {"x": rand(*x_shape, scale=scale)}
    return build


I64 = np.int64
CASES: dict[str, Case] = {
    # --- convolutions
    "conv_pad1": conv((2, 4, 7, 7), (3, 4, 3, 3), pads=[1, 1, 1, 1]),
    "conv_stride2_asym_pads": conv((2, 4, 8, 7), (3, 4, 3, 3), strides=[2, 2],
                                   pads=[1, 0, 0, 2]),
    "conv_dilation2_bias": conv((2, 4, 9, 9), (5, 4, 3, 3), bias=True, dilations=[2, 2],
                                pads=[2, 1, 2, 1]),
    "conv_groups2_stride3": conv((2, 4, 10, 10), (6, 2, 3, 3), group=2, strides=[3, 2]),
    "conv_depthwise": conv((2, 4, 7, 7), (4, 1, 3, 3), group=4, pads=[1, 1, 1, 1]),
    "conv_same_upper_s2": conv((2, 3, 7, 8), (4, 3, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv_same_lower_s2": conv((2, 3, 7, 8), (4, 3, 4, 4), auto_pad="SAME_LOWER", strides=[2, 2]),
    "conv_valid": conv((2, 3, 6, 6), (4, 3, 2, 2), auto_pad="VALID", strides=[2, 2]),
    "conv_dynamic_hw_s2": conv((2, 3, 9, 8), (4, 3, 3, 3), dynamic=True, strides=[2, 2],
                               pads=[1, 1, 1, 1]),
    "conv_1x1_pad_exceeds_kernel": conv((2, 3, 5, 5), (4, 3, 1, 1), pads=[1, 0, 2, 1]),
    # from 8 input channels the stride-1 adjoint is a flipped Conv, below a ConvTranspose
    "conv_pad1_8ch": conv((2, 8, 6, 6), (3, 8, 3, 3), pads=[1, 1, 1, 1]),
    "conv_dilation2_bias_8ch": conv((2, 8, 9, 9), (5, 8, 3, 3), bias=True, dilations=[2, 2],
                                    pads=[2, 1, 2, 1]),
    "conv_depthwise_8ch": conv((2, 8, 7, 7), (8, 1, 3, 3), group=8, pads=[1, 1, 1, 1]),
    "conv_groups2_8ch": conv((2, 8, 6, 6), (4, 4, 3, 3), group=2, pads=[0, 1, 1, 0]),
    # ConvTranspose adjoint with unknown H, W: output_padding below the stride, then cropped
    "conv_dynamic_hw_dilated_s1": conv((2, 3, 9, 8), (4, 3, 3, 3), dynamic=True,
                                       dilations=[2, 2], pads=[1, 2, 2, 1]),
    "conv_dynamic_hw_s2_dilation3": conv((2, 3, 11, 10), (4, 3, 3, 3), dynamic=True,
                                         strides=[2, 2], dilations=[3, 3], pads=[1, 0, 2, 1]),
    "conv_weight_computed": graph_case([node("Tanh", ["w0"], "w"),
                                        node("Conv", ["x", "w"], group=2, pads=[0, 1, 1, 0])],
                                       (2, 4, 6, 6), {"w0": rand(6, 2, 2, 3)}),
    "conv1d": graph_case([node("Conv", ["x", "w"], strides=[2], pads=[1, 2])], (2, 3, 11),
                         {"w": rand(4, 3, 3)}),
    # --- dense layers
    "gemm_plain": gemm(0, 1, 1.0, 1.0, False),
    "gemm_transA_alpha": gemm(1, 0, 0.7, 2.0, False),
    "gemm_transAB": gemm(1, 1, 1.3, 0.5, False),
    # any non-zero trans* transposes: 1 - tb read transB = 2 as -1 (transposed again) and
    # overflowed int64 on the loader fuzzer's transB = -2**63 (test_fuzz_loader)
    "gemm_transB_2": gemm(0, 2, 1.0, 1.0, False),
    "gemm_dependent_b": gemm(0, 0, 1.0, 1.0, True),
    "gemm_dependent_c": graph_case([node("MatMul", ["x", "w2"], "c"),
                                    node("Gemm", ["x", "b", "c"], alpha=0.5, beta=1.5)],
                                   (3, 6), {"w2": rand(6, 4), "b": rand(6, 4)}),
    "matmul_const": graph_case([node("MatMul", ["x", "w"])], (3, 5), {"w": rand(5, 4)},
                               symbolic=["N", 5]),
    "matmul_batched_bcast": graph_case([node("MatMul", ["x", "w"])], (2, 1, 3, 4),
                                       {"w": rand(5, 4, 2)}),
    "matmul_general": graph_case([node("Transpose", ["x"], "t", perm=[0, 2, 1]),
                                  node("Tanh", ["t"], "u"),
                                  node("MatMul", ["x", "u"])], (2, 3, 4)),
    "batchnorm": graph_case([node("BatchNormalization", ["x", "s", "b", "m", "v"],
                                  epsilon=1e-3)], (2, 3, 4, 4),
                            {"s": rand(3), "b": rand(3), "m": rand(3),
                             "v": np.abs(rand(3)) + 0.5}, symbolic=["N", 3, 4, 4]),
    # --- activations
    "relu": lambda: unary("Relu"),
    "leaky_relu": lambda: unary("LeakyRelu", alpha=0.2),
    "prelu": graph_case([node("PRelu", ["x", "slope"])], (2, 3, 4, 4),
                        {"slope": rand(3, 1, 1)}),
    "clip_both": graph_case([node("Clip", ["x", "lo", "hi"])], (2, 3, 4, 4),
                            {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}),
    "clip_min_only": graph_case([node("Clip", ["x", "lo"])], (2, 3, 4, 4),
                                {"lo": np.array(0.0, np.float32)}),
    "sigmoid": lambda: unary("Sigmoid"),
    "hard_sigmoid": lambda: unary("HardSigmoid", scale=3.0, alpha=0.3, beta=0.4),
    "hard_swish": lambda: unary("HardSwish", scale=3.0),
    "tanh": lambda: unary("Tanh"),
    "elu": lambda: unary("Elu", alpha=0.8),
    "selu": lambda: unary("Selu"),
    "gelu": lambda: unary("Gelu", opset=20),
    "gelu_tanh": lambda: unary("Gelu", opset=20, approximate="tanh"),
    "softplus": lambda: unary("Softplus"),
    "erf_exp_log_sqrt_neg": graph_case(
        [node("Erf", ["x"], "a"), node("Exp", ["a"], "b"), node("Log", ["b"], "c"),
         node("Sqrt", ["b"], "d"), node("Neg", ["d"], "e"), node("Add", ["c", "e"])],
        (2, 3, 4)),
    "abs_reciprocal": graph_case([node("Abs", ["x"], "a"), node("Add", ["a", "one"], "b"),
                                  node("Reciprocal", ["b"])], (2, 3, 4),
                                 {"one": np.array(1.0, np.float32)}),
    "pow_const_exponent": graph_case([node("Sigmoid", ["x"], "s"), node("Pow", ["s", "p"])],
                                     (2, 3, 4), {"p": np.array([2.0, 3.0, 1.5, 2.5],
                                                               np.float32)}),
    "where_const_condition": graph_case([node("Sigmoid", ["x"], "s"),
                                         node("Where", ["c", "x", "s"])], (2, 3, 4),
                                        {"c": RNG.random((3, 1)) > 0.5}),
    "max_min_pair": graph_case([node("Tanh", ["x"], "t"), node("Max", ["x", "t"], "m"),
                                node("Min", ["m", "c"])], (2, 3, 4), {"c": rand(4)}),
    "layernorm_pattern": graph_case(
        [node("ReduceMean", ["x"], "mu", axes=[-1]), node("Sub", ["x", "mu"], "d"),
         node("Pow", ["d", "two"], "sq"), node("ReduceMean", ["sq"], "var", axes=[-1]),
         node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "sd"),
         node("Div", ["d", "sd"], "n"), node("Mul", ["n", "gamma"], "y0"),
         node("Add", ["y0", "beta"])], (2, 3, 6),
        {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32),
         "gamma": rand(6), "beta": rand(6)}),
    "silu_pattern": graph_case([node("Sigmoid", ["x"], "s"), node("Mul", ["x", "s"])],
                               (2, 3, 4, 4)),
    # --- broadcasting arithmetic
    "add_channel_bias": binary("Add", (3, 1, 1)),
    "sub_row": binary("Sub", (5,)),
    "mul_full_rank_ones": binary("Mul", (1, 3, 1, 5)),
    "div_channel": binary("Div", (1, 3, 1, 1)),
    "mul_scalar": binary("Mul", ()),
    "add_both_depend": both_sides("Add"),
    "sub_both_depend": both_sides("Sub"),
    "mul_both_depend": both_sides("Mul"),
    "div_both_depend": both_sides("Div"),
    # --- pooling
    "maxpool_k2s2_cropped": pool("MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
    "maxpool_tiles_2x3": pool("MaxPool", (2, 3, 8, 9), dynamic=False, kernel_shape=[2, 3],
                              strides=[2, 3]),
    "maxpool_tiles_ties": graph_case([node("Relu", ["x"], "r"),
                                      node("MaxPool", ["r"], kernel_shape=[2, 2],
                                           strides=[2, 2])], (2, 3, 6, 6), scale=1.0),
    "maxpool_ceil_overhang": pool("MaxPool", (2, 3, 5, 7), dynamic=False,
                                  kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    "maxpool_dynamic_hw": pool("MaxPool", dynamic=True, kernel_shape=[2, 2], strides=[2, 2]),
    "maxpool_pad_disjoint_opset13": pool("MaxPool", opset=13, kernel_shape=[2, 2],
                                         strides=[2, 2], pads=[1, 1, 0, 0]),
    "maxpool_overlap_pad": pool("MaxPool", kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1]),
    "maxpool_dilated_ceil": pool("MaxPool", kernel_shape=[2, 2], strides=[2, 2],
                                 dilations=[2, 2], ceil_mode=1),
    "maxpool_opset13_disjoint": pool("MaxPool", opset=13, kernel_shape=[2, 2], strides=[2, 2]),
    "avgpool_pad_exclude": pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1]),
    "avgpool_pad_include": pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 0, 1, 2], count_include_pad=1),
    "avgpool_overlap_s1": pool("AveragePool", kernel_shape=[3, 2], strides=[1, 1]),
    "avgpool_dynamic": pool("AveragePool", dynamic=True, kernel_shape=[2, 2], strides=[2, 2],
                            pads=[1, 1, 0, 0]),
    "avgpool_same_upper": pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2],
                               auto_pad="SAME_UPPER"),
    "global_avgpool": pool("GlobalAveragePool"),
    "global_avgpool_dynamic": pool("GlobalAveragePool", dynamic=True),
    # --- data movement
    "flatten": graph_case([node("Flatten", ["x"], axis=2)], (2, 3, 4, 4),
                          symbolic=["N", 3, 4, 4]),
    "reshape": graph_case([node("Reshape", ["x", "s"])], (2, 3, 4, 4),
                          {"s": np.array([0, -1, 8], I64)}),
    "transpose": graph_case([node("Transpose", ["x"], perm=[0, 2, 3, 1])], (2, 3, 4, 5)),
    "transpose_default": graph_case([node("Transpose", ["x"])], (2, 3, 4)),
    "concat": graph_case([node("Relu", ["x"], "r"), node("Concat", ["c", "x", "r"], axis=1)],
                         (2, 3, 4), {"c": rand(2, 2, 4)}),
    "concat_dynamic_axis": graph_case([node("Sigmoid", ["x"], "r"),
                                       node("Concat", ["x", "r"], axis=-1)], (2, 3, 4),
                                      symbolic=["N", 3, "W"]),
    "split_both_halves": graph_case([
        helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
        node("Sigmoid", ["b"], "sb"), node("Mul", ["a", "sb"])], (2, 4, 3),
        {"sizes": np.array([2, 2], I64)}),
    "split_second_output_only": graph_case([  # shufflenet-style: output 0 is never read
        helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=-1),
        node("Tanh", ["b"])], (2, 3, 5), {"sizes": np.array([2, 3], I64)}),
    "split_num_outputs_opset18": graph_case([
        helper.make_node("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3),
        node("Concat", ["c", "a"], "ca", axis=2), node("Relu", ["ca"])], (2, 3, 6), opset=18),
    "pad_constant": graph_case([node("Pad", ["x", "p", "v"])], (2, 3, 4, 4),
                               {"p": np.array([0, 0, 1, 2, 0, 0, 2, 0], I64),
                                "v": np.array(0.5, np.float32)}),
    "pad_negative": graph_case([node("Pad", ["x", "p"])], (2, 3, 4, 4),
                               {"p": np.array([0, 1, -1, 2, 0, 0, 2, -2], I64)}),
    "pad_axes_opset18": graph_case([node("Pad", ["x", "p", "", "a"])], (2, 3, 4, 4),
                                   {"p": np.array([1, 0, 2, 3], I64),
                                    "a": np.array([1, 3], I64)}, opset=18),
    "slice_steps": graph_case([node("Slice", ["x", "st", "en", "ax", "sp"])], (2, 3, 7, 6),
                              {"st": np.array([1, -1], I64), "en": np.array([7, -7], I64),
                               "ax": np.array([2, 3], I64), "sp": np.array([2, -2], I64)}),
    "squeeze_unsqueeze": graph_case([node("Unsqueeze", ["x", "a"], "u"),
                                     node("Tanh", ["u"], "t"),
                                     node("Squeeze", ["t", "a"])], (2, 3, 4),
                                    {"a": np.array([1], I64)}),
    "identity_dropout": graph_case([node("Identity", ["x"], "i"),
                                    node("Dropout", ["i"])], (2, 3), opset=13),
    "cast_float": graph_case([node("Cast", ["x"], "c", to=TensorProto.FLOAT),
                              node("Tanh", ["c"])], (2, 3)),
    "softmax_axis1": graph_case([node("Softmax", ["x"], axis=1)], (2, 5, 3)),
    "softmax_last": graph_case([node("Softmax", ["x"])], (2, 3, 5)),
    "softmax_opset11_flatten": graph_case([node("Softmax", ["x"], axis=1)], (2, 3, 4),
                                          opset=11),
    "logsoftmax": graph_case([node("LogSoftmax", ["x"], axis=-1)], (3, 6)),
    "reduce_mean_attr": graph_case([node("ReduceMean", ["x"], axes=[2, 3], keepdims=0)],
                                   (2, 3, 4, 5), opset=17),
    "reduce_mean_input": graph_case([node("ReduceMean", ["x", "a"], keepdims=1)],
                                    (2, 3, 4, 5), {"a": np.array([1, -1], I64)}, opset=18,
                                    symbolic=["N", 3, "H", "W"]),
    "reduce_sum_all": graph_case([node("ReduceSum", ["x"], keepdims=0)], (2, 3, 4)),
    # --- resize
    "resize_nearest_x2": graph_case([node("Resize", ["x", "", "s"], mode="nearest",
                                          coordinate_transformation_mode="asymmetric",
                                          nearest_mode="floor")], (2, 3, 4, 5),
                                    {"s": np.array([1, 1, 2, 2], np.float32)}),
    "resize_linear_x2": graph_case([node("Resize", ["x", "", "s"], mode="linear")],
                                   (2, 3, 4, 5), {"s": np.array([1, 1, 2, 3], np.float32)}),
    "resize_linear_sizes_align": graph_case(
        [node("Resize", ["x", "", "", "sz"], mode="linear",
              coordinate_transformation_mode="align_corners")], (2, 3, 4, 5),
        {"sz": np.array([2, 3, 7, 9], I64)}),
    "resize_nearest_x1_5": graph_case([node("Resize", ["x", "", "s"], mode="nearest")],
                                      (1, 2, 4, 6), {"s": np.array([1, 1, 1.5, 1.5],
                                                                   np.float32)}),
}


def _ort_vs_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """Relative L2 gap between the float32 backward graph run by onnxruntime and the
    float64 one run by the reference evaluator, for the same random cotangents."""
    outputs = [o.name for o in model.graph.output]
    vjp32 = build_vjp(model, "x", outputs)
    vjp64 = build_vjp(to_double(model), "x", outputs)
    fwd = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    base = fwd.run(outputs, feeds)
    rng = np.random.default_rng(5)
    cots = {o + COTANGENT_SUFFIX: rng.standard_normal(v.shape) for o, v in zip(outputs, base,
                                                                              strict=True)}
    sess = ort.InferenceSession(vjp32.SerializeToString(), providers=["CPUExecutionProvider"])
    g32 = sess.run([f"x{GRAD_SUFFIX}"], {**feeds, **{k: v.astype(np.float32)
                                                      for k, v in cots.items()}})[0]
    ref = ReferenceEvaluator(vjp64, new_ops=REFERENCE_OVERRIDES)
    g64 = ref.run([f"x{GRAD_SUFFIX}"], {**{k: v.astype(np.float64) for k, v in feeds.items()},
                                        **cots})[0]
    return float(np.linalg.norm(g32 - g64) / max(np.linalg.norm(g64), 1e-30))


# Where onnx's reference evaluator itself is off (Gelu's erf rounds through float32;
# Softmax-11 ignores the coerce-to-2-D semantics; Pad rejects negative pads), the check
# runs on onnxruntime in float32 (eps=1e-2) instead.
ORT_ONLY = {"gelu", "softmax_opset11_flatten", "pad_negative"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_matches_finite_differences(case: str) -> None:
    model, feeds = CASES[case]()
    if case in ORT_ONLY:
        err = check_vjp(model, feeds, "x", precision="float32")
        assert err <= FD_TOL, f"{case}: relative error {err:.2e} (float32)"
        return
    err = check_vjp(model, feeds, "x")
    assert err <= FD_TOL, f"{case}: relative error {err:.2e}"
    assert _ort_vs_reference(model, feeds) <= F32_TOL


@pytest.mark.parametrize(("in_channels", "adjoint"), [(1, "ConvTranspose"),
                                                     (3, "ConvTranspose"), (8, "Conv")])
def test_stride1_conv_adjoint_op_follows_input_channels(in_channels: int, adjoint: str) -> None:
    """The faster of onnxruntime's two adjoints (rules_nn.FLIPPED_CONV_MIN_CHANNELS)."""
    model, _ = conv((1, in_channels, 6, 6), (16, in_channels, 3, 3), pads=[1, 1, 1, 1])()
    vjp = build_vjp(model, "x", ["y"])
    added = [n.op_type for n in vjp.graph.node[1:]]  # node 0 is the forward Conv
    assert added.count(adjoint) == 1
    assert {"Conv", "ConvTranspose"} & set(added) == {adjoint}


def test_maxpool_tie_splits_the_cotangent_evenly() -> None:
    """Where a tile's maximum is taken twice, each copy gets half: a subgradient of max
    (the shares sum to the output's cotangent), not the full cotangent twice."""
    model = make([node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])], [1, 1, 2, 4])
    vjp = build_vjp(model, "x", ["y"])
    x = np.array([[[[1, 3, 0, 0], [3, 2, 0, 0]]]], np.float32)
    g = np.array([[[[4, 8]]]], np.float32)
    session = ort.InferenceSession(vjp.SerializeToString(), providers=["CPUExecutionProvider"])
    grad = session.run([f"x{GRAD_SUFFIX}"], {"x": x, f"y{COTANGENT_SUFFIX}": g})[0]
    np.testing.assert_array_equal(grad, [[[[0, 2, 2, 2], [2, 0, 2, 2]]]])


# ---------------------------------------------------------------- refusals (SS205)

def _refused(model: onnx.ModelProto) -> Inconclusive:
    with pytest.raises(Inconclusive) as info:
        build_vjp(model, "x", ["y"])
    assert info.value.rule_id == "SS205"
    assert info.value.exit_code == 3
    return info.value


def test_topk_on_input_path_is_refused() -> None:
    model = make([helper.make_node("TopK", ["x", "k"], ["y", "idx"], name="pick")], [2, 6],
                 {"k": np.array([2], np.int64)})
    err = _refused(model)
    assert str(err).startswith("cannot differentiate op TopK (node pick)")
    assert err.location == "pick"


def test_nonzero_on_input_path_is_refused() -> None:
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="where_nonzero"),
             node("Cast", ["nz"], "f", to=TensorProto.FLOAT),
             node("ReduceSum", ["f"], "s", keepdims=0),
             node("Mul", ["x", "s"])]
    err = _refused(make(nodes, [2, 3]))
    assert "NonZero (node where_nonzero)" in str(err)


def test_subgraph_reading_the_input_is_refused() -> None:
    """An If whose branch reads x from the outer scope (no explicit input) is on the path."""
    then = helper.make_graph([node("Relu", ["x"], "t")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([node("Neg", ["x"], "e")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then,
                              else_branch=other)]
    err = _refused(make(nodes, [2, 3], {"flag": np.array(True)}))
    assert "If (node branch)" in str(err)


@pytest.mark.parametrize("build", [
    lambda: make([node("Resize", ["x", "", "s"], mode="cubic")], [1, 1, 4, 4],
                 {"s": np.array([1, 1, 2, 2], np.float32)}),
    lambda: make([node("Pad", ["x", "p"], mode="reflect")], [1, 1, 4, 4],
                 {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}),
    lambda: make([node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[1, 1])], [1, 1, 5, 5],
                 opset=13),
    lambda: make([node("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2],
                       ceil_mode=1)], [1, 1, 5, 5]),
], ids=["resize_cubic", "pad_reflect", "maxpool_overlap_opset13", "avgpool_ceil_overhang"])
def test_unsupported_attributes_are_refused(build: Callable[[], onnx.ModelProto]) -> None:
    _refused(build())


def test_comparison_feeding_where_is_refused() -> None:
    """A hand-made gate x > 0 ? x : 0 is piecewise constant in its condition: the
    comparison is reported rather than silently given a zero gradient."""
    nodes = [helper.make_node("Greater", ["x", "zero"], ["c"], name="gate"),
             node("Where", ["c", "x", "zero"])]
    err = _refused(make(nodes, [2, 3], {"zero": np.array(0.0, np.float32)}))
    assert "Greater (node gate)" in str(err)


def test_vjp_with_several_seeds_sums_their_contributions() -> None:
    nodes = [node("Tanh", ["x"], "y"), node("Mul", ["x", "x"], "z")]
    model = make(nodes, [2, 3], outputs=("y", "z"))
    assert check_vjp(model, {"x": rand(2, 3)}, "x") <= FD_TOL


def test_shape_arithmetic_needs_no_rules() -> None:
    """torch-style flatten: Shape -> Gather -> Concat -> Reshape; Gather has no rule but is
    off the differentiable path. A NonZero branch that feeds no output is ignored too."""
    nodes = [node("Shape", ["x"], "shp"), node("Gather", ["shp", "zero"], "n", axis=0),
             node("Unsqueeze", ["n", "zero1"], "n1"), node("Concat", ["n1", "minus1"], "tgt",
                                                           axis=0),
             node("Reshape", ["x", "tgt"], "flat"), node("NonZero", ["x"], "unused"),
             node("Tanh", ["flat"])]
    inits = {"zero": np.array(0, np.int64), "zero1": np.array([0], np.int64),
             "minus1": np.array([-1], np.int64)}
    model = make(nodes, ["N", 2, 3], inits)
    assert check_vjp(model, {"x": rand(2, 2, 3)}, "x") <= FD_TOL


def test_dynamic_broadcast_falls_back_to_runtime_shapes() -> None:
    """x [1,3,4,4] times p [2,3,1,4]: x is broadcast along the batch, which symbolic dims
    hide from shape inference, so the reduction axes are found at run time."""
    p_info = helper.make_tensor_value_info("p", TensorProto.FLOAT, ["A", 3, 1, "B"])
    model = make([node("Mul", ["x", "p"])], ["N", 3, "H", "W"], extra_inputs=[p_info])
    feeds = {"x": rand(1, 3, 4, 4), "p": rand(2, 3, 1, 4)}
    assert check_vjp(model, feeds, "x") <= FD_TOL


def test_gradient_is_zero_when_output_ignores_input() -> None:
    model = make([node("Shape", ["x"], "s"), node("Cast", ["s"], "y", to=TensorProto.FLOAT)],
                 ["N", 3])
    vjp = build_vjp(model, "x", ["y"])
    sess = ort.InferenceSession(vjp.SerializeToString(), providers=["CPUExecutionProvider"])
    grad = sess.run([f"x{GRAD_SUFFIX}"], {"x": rand(4, 3),
                                          f"y{COTANGENT_SUFFIX}": np.ones(2, np.float32)})[0]
    assert grad.shape == (4, 3) and not grad.any()


# ---------------------------------------------------------------- GradientProgram

def _bn_classifier() -> onnx.ModelProto:
    """Conv-BN-ReLU-Conv-BN-HardSwish-GAP-Gemm with a symbolic batch."""
    c1, c2, k = 4, 5, 6
    inits = {"w1": rand(c1, 2, 3, 3), "s1": rand(c1), "b1": rand(c1), "m1": rand(c1),
             "v1": np.abs(rand(c1)) + 0.5, "w2": rand(c2, c1, 3, 3), "s2": rand(c2),
             "b2": rand(c2), "m2": rand(c2), "v2": np.abs(rand(c2)) + 0.5,
             "fc": rand(k, c2), "fb": rand(k)}
    nodes = [node("Conv", ["x", "w1"], "a", pads=[1, 1, 1, 1]),
             node("BatchNormalization", ["a", "s1", "b1", "m1", "v1"], "bn1"),
             node("Relu", ["bn1"], "r1"),
             node("Conv", ["r1", "w2"], "c", strides=[2, 2]),
             node("BatchNormalization", ["c", "s2", "b2", "m2", "v2"], "bn2"),
             node("HardSwish", ["bn2"], "h"),
             node("GlobalAveragePool", ["h"], "g"), node("Flatten", ["g"], "f"),
             node("Gemm", ["f", "fc", "fb"], "logits", transB=1)]
    return make(nodes, ["N", 2, 7, 7], inits, outputs=("logits",))


def _silunet_like() -> onnx.ModelProto:
    """NHWC 0..255 input, Transpose + Sub/Div normalisation, SiLU convs, MaxPool, GAP,
    HardSwish head: the zoo's silunet pattern at toy size."""
    inits = {"mean": np.full((1, 3, 1, 1), 127.5, np.float32),
             "std": np.full((1, 3, 1, 1), 127.5, np.float32),
             "w1": rand(4, 3, 3, 3), "b1": rand(4), "w2": rand(5, 4, 3, 3), "b2": rand(5),
             "f1": rand(6, 5), "c1": rand(6), "f2": rand(4, 6, scale=0.1), "c2": rand(4)}
    nodes = [node("Transpose", ["x"], "t", perm=[0, 3, 1, 2]), node("Sub", ["t", "mean"], "s"),
             node("Div", ["s", "std"], "n"),
             node("Conv", ["n", "w1", "b1"], "a1", pads=[1, 1, 1, 1]),
             node("Sigmoid", ["a1"], "g1"), node("Mul", ["a1", "g1"], "h1"),
             node("MaxPool", ["h1"], "p1", kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p1", "w2", "b2"], "a2", pads=[1, 1, 1, 1]),
             node("Sigmoid", ["a2"], "g2"), node("Mul", ["a2", "g2"], "h2"),
             node("GlobalAveragePool", ["h2"], "gap"), node("Flatten", ["gap"], "f"),
             node("Gemm", ["f", "f1", "c1"], "d1", transB=1), node("HardSwish", ["d1"], "hs"),
             node("Gemm", ["hs", "f2", "c2"], "logits", transB=1)]
    return make(nodes, ["N", 8, 8, 3], inits, outputs=("logits",))


def _resnet_like() -> onnx.ModelProto:
    """Stem, then a strided basic block whose 1x1 strided shortcut joins by a residual Add."""
    inits = {"w0": rand(4, 1, 3, 3), "w1": rand(6, 4, 3, 3), "w2": rand(6, 6, 3, 3),
             "ws": rand(6, 4, 1, 1), "fc": rand(3, 6, scale=0.05), "fb": rand(3)}
    nodes = [node("Conv", ["x", "w0"], "a0", pads=[1, 1, 1, 1]), node("Relu", ["a0"], "r0"),
             node("Conv", ["r0", "w1"], "a1", strides=[2, 2], pads=[1, 1, 1, 1]),
             node("Relu", ["a1"], "r1"), node("Conv", ["r1", "w2"], "a2", pads=[1, 1, 1, 1]),
             node("Conv", ["r0", "ws"], "sc", strides=[2, 2]), node("Add", ["a2", "sc"], "sum"),
             node("Relu", ["sum"], "r2"),
             node("ReduceMean", ["r2"], "gap", axes=[2, 3], keepdims=0),
             node("Gemm", ["gap", "fc", "fb"], "logits", transB=1)]
    return make(nodes, ["N", 1, 9, 9], inits, outputs=("logits",))


@pytest.mark.parametrize("build,scale", [(_silunet_like, 255.0), (_resnet_like, 1.0)],
                         ids=["silunet_like", "resnet_like"])
def test_program_on_zoo_like_architectures(build: Callable[[], onnx.ModelProto],
                                           scale: float) -> None:
    model = build()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.abs(rand(2, *shape)) * scale / 3.0
    # small output weights keep the softmax unsaturated: a CE near 0 has a gradient near 0,
    # which finite differences cannot resolve
    assert check_gradients(model, x) <= FD_TOL


def test_program_outputs_match_forward_and_numpy_heads() -> None:
    model = _bn_classifier()
    x = rand(3, 2, 7, 7)
    t = np.zeros((3, 6), np.float32)
    t[0, 2] = 1.0
    t[2, 5] = 1.0  # row 1 stays all-zero: no CE term
    prog = GradientProgram(model, bn_stats=True)
    assert prog.input_name == "x" and prog.bn_layers == 2
    res = prog.run(x, t, bn_weight=0.3)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(res.logits, logits, rtol=1e-5, atol=1e-5)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    np.testing.assert_allclose(res.ce, -(t * logp).sum(1), rtol=1e-5, atol=1e-5)
    assert res.ce[1] == 0.0
    # BN loss from the BN inputs' batch statistics (over N, H, W)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("a", "c")])
    za, zc = ort.InferenceSession(probe.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(["a", "c"], {"x": x})
    expected = sum(float(((z.mean((0, 2, 3)) - inits[m]) ** 2).sum()
                         + ((z.var((0, 2, 3)) - inits[v]) ** 2).sum())
                   for z, m, v in ((za, "m1", "v1"), (zc, "m2", "v2")))
    assert res.bn_loss == pytest.approx(expected, rel=1e-4)
    assert res.grad.shape == x.shape and res.grad.dtype == np.float32


def test_program_without_bn_stats_has_zero_bn_loss_and_independent_rows() -> None:
    model = _bn_classifier()
    prog = GradientProgram(model)
    x = rand(2, 2, 7, 7)
    t = np.eye(6, dtype=np.float32)[[1, 4]]
    both = prog.run(x, t, bn_weight=5.0)  # bn_weight is ignored without bn_stats
    first = prog.run(x[:1], t[:1])
    assert both.bn_loss == 0.0
    np.testing.assert_allclose(both.grad[:1], first.grad, rtol=1e-5, atol=1e-6)


def test_a_large_batch_runs_in_chunks_with_the_same_results(monkeypatch) -> None:
    import scanner.autodiff.program as program

    model = _bn_classifier()
    x = rand(11, 2, 7, 7)
    t = np.eye(6, dtype=np.float32)[np.arange(11) % 6]
    whole = GradientProgram(model).run(x, t)
    monkeypatch.setattr(program, "MAX_RUN_VALUES", 4 * 2 * 7 * 7)  # 4 rows a run: 3 runs
    calls = []
    prog = GradientProgram(model)
    real = prog._session.run
    prog._session.run = lambda *a: calls.append(len(a[1][prog.input_name])) or real(*a)
    chunked = prog.run(x, t)
    assert calls == [4, 4, 3]
    for a, b in ((whole.logits, chunked.logits), (whole.ce, chunked.ce),
                 (whole.grad, chunked.grad)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # the BN-statistics loss couples the rows through batch statistics: one run
    calls.clear()
    stats = GradientProgram(model, bn_stats=True)
    real_stats = stats._session.run
    stats._session.run = lambda *a: calls.append(len(a[1][stats.input_name])) or real_stats(*a)
    stats.run(x, t, bn_weight=1.0)
    assert calls == [11]


@pytest.mark.parametrize("bn_stats,bn_weight", [(False, 0.0), (True, 0.7)])
def test_program_gradient_matches_finite_differences(bn_stats: bool, bn_weight: float) -> None:
    model = _bn_classifier()
    x = rand(3, 2, 7, 7)
    t = np.eye(6)[[0, 3, 5]]
    t[1] = 0.0
    err = check_gradients(model, x, target_weights=t, bn_stats=bn_stats, bn_weight=bn_weight)
    assert err <= FD_TOL


def test_program_float32_gradient_close_to_float64() -> None:
    model = _bn_classifier()
    x = rand(3, 2, 7, 7)
    t = np.eye(6, dtype=np.float32)[[0, 3, 5]]
    g32 = GradientProgram(model, bn_stats=True).run(x, t, bn_weight=0.5).grad
    from scanner.autodiff.check import Evaluator
    from scanner.autodiff.program import (
        BN_WEIGHT_INPUT,
        GRAD_OUTPUT,
        TARGET_INPUT,
        build_program,
    )
    prog64 = build_program(to_double(model), bn_stats=True)
    g64 = Evaluator(prog64.model, "float64")([GRAD_OUTPUT], {
        "x": x.astype(np.float64), TARGET_INPUT: t.astype(np.float64),
        BN_WEIGHT_INPUT: np.array(0.5)})[0]
    assert np.linalg.norm(g32 - g64) / np.linalg.norm(g64) <= F32_TOL


def test_program_uses_logits_under_a_final_softmax() -> None:
    """A model that outputs probabilities: the CE head must use the Softmax's input."""
    base = _bn_classifier()
    probs = onnx.ModelProto()
    probs.CopyFrom(base)
    probs.graph.node.append(node("Softmax", ["logits"], "probs", axis=1))
    del probs.graph.output[:]
    probs.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, None))
    x = rand(2, 2, 7, 7)
    t = np.eye(6, dtype=np.float32)[[1, 2]]
    a, b = GradientProgram(base).run(x, t), GradientProgram(probs).run(x, t)
    np.testing.assert_allclose(b.logits, a.logits, rtol=1e-6)
    np.testing.assert_allclose(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def test_old_opset_is_refused_clearly() -> None:
    model = make([node("Relu", ["x"])], [2, 3], opset=9)
    with pytest.raises(Inconclusive, match="opset >= 11"):
        build_vjp(model, "x", ["y"])


def test_program_rejects_mismatched_targets() -> None:
    from scanner.errors import DataError
    prog = GradientProgram(_bn_classifier())
    with pytest.raises(DataError):
        prog.run(rand(2, 2, 7, 7), np.zeros((3, 6), np.float32))


def test_program_on_an_opset_13_model_with_overlapping_maxpool_is_built_at_opset_17() -> None:
    # ResNet's stem (3x3 stride 2, pad 1) exported at opset 13: its backward needs
    # ScatterElements(reduction="add") from opset 16, so the program runs a converted copy
    inits = {"w1": rand(4, 2, 3, 3), "fc": rand(6, 4), "fb": rand(6)}
    nodes = [node("Conv", ["x", "w1"], "a", pads=[1, 1, 1, 1]), node("Relu", ["a"], "r"),
             node("MaxPool", ["r"], "p", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
             node("GlobalAveragePool", ["p"], "g"), node("Flatten", ["g"], "f"),
             node("Gemm", ["f", "fc", "fb"], "logits", transB=1)]
    model = make(nodes, ["N", 2, 7, 7], inits, opset=13, outputs=("logits",))
    with pytest.raises(Inconclusive, match="ScatterElements reduction"):
        build_vjp(model, "x", ["logits"])
    x = rand(3, 2, 7, 7)
    err = check_gradients(model, x, target_weights=np.eye(6)[[0, 3, 5]])
    assert err <= FD_TOL
    assert model.opset_import[0].version == 13  # the caller's model is not converted
