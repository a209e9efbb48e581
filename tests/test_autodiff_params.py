"""Parameter gradients (what recovery trains) against central finite differences.

Each case feeds a weight, bias, BN scale or bias as a graph input and checks
d <outputs, random cotangents> / d parameter with `check_vjp`, at the input gradients'
tolerances (tests/test_autodiff.py): float64 reference evaluator, eps=1e-7, relative
error <= 1e-3. Activations come from random inputs that are not differentiated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from scanner.autodiff import check_vjp, to_double
from scanner.autodiff.check import REFERENCE_OVERRIDES, check_parameter_gradients
from scanner.autodiff.params import (
    INV_TEMPERATURE_INPUT,
    PARAM_GRAD_SUFFIX,
    ParameterProgram,
    build_parameter_program,
    trainable_parameters,
)
from scanner.autodiff.program import TARGET_INPUT
from scanner.errors import Inconclusive

FD_TOL = 1e-3
RNG = np.random.default_rng(99)
Case = tuple[onnx.ModelProto, dict[str, np.ndarray], str]


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def graph(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray],
          inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape))
              for k, v in feeds.items()]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, None)], [numpy_helper.from_array(v, k)
                                         for k, v in (inits or {}).items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv(wrt: str, x: tuple[int, ...] = (2, 4, 9, 9), w: tuple[int, ...] = (6, 4, 3, 3),
         **attrs: object) -> Case:
    feeds = {"x": rand(*x), "w": rand(*w), "b": rand(w[0])}
    # a Tanh after the conv: the cotangent reaching the conv is not the random seed itself
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs),
             helper.make_node("Tanh", ["c"], ["y"])]
    return graph(nodes, feeds), feeds, wrt


def gemm(wrt: str, **attrs: object) -> Case:
    ta, tb = attrs.get("transA", 0), attrs.get("transB", 0)
    feeds = {"a": rand(*((5, 3) if ta else (3, 5))), "b": rand(*((4, 5) if tb else (5, 4))),
             "c": rand(4)}
    return graph([helper.make_node("Gemm", ["a", "b", "c"], ["y"], **attrs)], feeds), feeds, wrt


def matmul(wrt: str) -> Case:
    feeds = {"a": rand(2, 3, 5), "b": rand(5, 4)}
    return graph([helper.make_node("MatMul", ["a", "b"], ["y"])], feeds), feeds, wrt


def batchnorm(wrt: str, shape: tuple[int, ...] = (3, 4, 5, 5)) -> Case:
    c = shape[1]
    feeds = {"x": rand(*shape), "s": rand(c), "b": rand(c)}
    inits = {"m": rand(c), "v": np.abs(rand(c)) + 0.5}
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Sigmoid", ["n"], ["y"])]
    return graph(nodes, feeds, inits), feeds, wrt


CASES: dict[str, Callable[[], Case]] = {
    "conv_weight": lambda: conv("w", pads=[1, 1, 1, 1]),
    "conv_bias": lambda: conv("b", pads=[1, 1, 1, 1]),
    "conv_weight_stride2": lambda: conv("w", strides=[2, 2], pads=[1, 0, 1, 0]),
    "conv_weight_stride2_uneven": lambda: conv("w", x=(2, 4, 10, 10), strides=[3, 2]),
    "conv_weight_dilated": lambda: conv("w", dilations=[2, 2], pads=[2, 2, 2, 2]),
    "conv_weight_same_upper": lambda: conv("w", auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv_weight_grouped": lambda: conv("w", w=(6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    "conv_weight_depthwise": lambda: conv("w", w=(4, 1, 3, 3), group=4, strides=[2, 2]),
    "conv_weight_1x1": lambda: conv("w", w=(6, 4, 1, 1)),
    "conv1d_weight": lambda: conv("w", x=(2, 4, 11), w=(3, 4, 3), strides=[2], pads=[1, 1]),
    "gemm_b": lambda: gemm("b"),
    "gemm_b_transb": lambda: gemm("b", transB=1, alpha=0.7),
    "gemm_b_transa": lambda: gemm("b", transA=1),
    "gemm_c": lambda: gemm("c", beta=0.5),
    "matmul_b_broadcast": lambda: matmul("b"),
    "bn_scale": lambda: batchnorm("s"),
    "bn_bias": lambda: batchnorm("b"),
    "bn_scale_2d": lambda: batchnorm("s", (6, 4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_gradient_matches_finite_differences(case: str) -> None:
    model, feeds, wrt = CASES[case]()
    err = check_vjp(model, feeds, wrt)
    assert err <= FD_TOL, f"{case}: relative error {err:.2e}"


def test_parameter_gradient_float32_in_onnxruntime() -> None:
    model, feeds, wrt = conv("w", strides=[2, 2], pads=[1, 1, 1, 1])
    assert check_vjp(model, feeds, wrt, precision="float32", eps=1e-3) <= 1e-2


def test_running_statistics_are_refused() -> None:
    feeds = {"x": rand(3, 4, 5, 5), "m": rand(4)}
    inits = {"s": rand(4), "b": rand(4), "v": np.abs(rand(4)) + 0.5}
    model = graph([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
                  feeds, inits)
    with pytest.raises(Inconclusive, match="running mean/variance"):
        check_vjp(model, feeds, "m")


def _classifier() -> onnx.ModelProto:
    """Conv-BN-SiLU, grouped strided Conv-ReLU, GAP, Gemm, MatMul: every trainable kind."""
    inits = {"w1": rand(4, 2, 3, 3), "cb1": rand(4), "s1": rand(4), "b1": rand(4),
             "m1": rand(4), "v1": np.abs(rand(4)) + 0.5, "w2": rand(6, 2, 3, 3),
             "cb2": rand(6), "fc": rand(5, 6), "fb": rand(5), "mm": rand(5, 3)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "cb1"], ["a"], pads=[1, 1, 1, 1]),
             n("BatchNormalization", ["a", "s1", "b1", "m1", "v1"], ["bn"]),
             n("Sigmoid", ["bn"], ["sg"]), n("Mul", ["bn", "sg"], ["h"]),
             n("Conv", ["h", "w2", "cb2"], ["c"], strides=[2, 2], group=2),
             n("Relu", ["c"], ["r"]), n("GlobalAveragePool", ["r"], ["g"]),
             n("Flatten", ["g"], ["f"]), n("Gemm", ["f", "fc", "fb"], ["d"], transB=1),
             n("Tanh", ["d"], ["t"]), n("MatMul", ["t", "mm"], ["y"])]
    g = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 2, 7, 7])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], [numpy_helper.from_array(v, k)
                                             for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_trainable_parameters_are_the_weights_biases_and_bn_affine() -> None:
    assert trainable_parameters(_classifier()) == ["w1", "cb1", "s1", "b1", "w2", "cb2",
                                                    "fc", "fb", "mm"]
    assert trainable_parameters(_classifier(), ("BatchNormalization",)) == ["s1", "b1"]


@pytest.mark.parametrize("inv_temperature", [1.0, 0.25])
def test_parameter_program_matches_finite_differences(inv_temperature: float) -> None:
    model = _classifier()
    x = rand(3, 2, 7, 7)
    soft = np.random.default_rng(3).dirichlet(np.ones(3), size=3) * [[1.0], [2.0], [0.5]]
    err = check_parameter_gradients(model, x, soft, trainable_parameters(model),
                                    inv_temperature=inv_temperature, eps=1e-6)
    assert err <= FD_TOL, f"relative error {err:.2e}"


def test_parameter_program_runs_in_onnxruntime_like_the_reference() -> None:
    model = _classifier()
    params = trainable_parameters(model)
    x, soft = rand(4, 2, 7, 7), np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    res = ParameterProgram(model, params).run(x, soft, values)
    ref = ReferenceEvaluator(to_double(build_parameter_program(model, params).model),
                             new_ops=REFERENCE_OVERRIDES)
    feeds = {"x": x.astype(np.float64), TARGET_INPUT: soft.astype(np.float64),
             INV_TEMPERATURE_INPUT: np.array(1.0),
             **{k: v.astype(np.float64) for k, v in values.items()}}
    want = ref.run([p + PARAM_GRAD_SUFFIX for p in params], feeds)
    for p, got, exp in zip(params, res.grads, want, strict=True):
        assert got.shape == values[p].shape
        gap = np.linalg.norm(got - exp) / max(np.linalg.norm(exp), 1e-30)
        assert gap <= 1e-4, f"{p}: float32 vs float64 {gap:.2e}"
    # the logits are the model's own forward pass
    plain = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(res.logits, plain, rtol=1e-4, atol=1e-5)
