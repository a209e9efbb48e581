"""Backward rules for the classic zoo and transformer op set (rules_reduce, rules_norm,
rules_tensor), and the whole gradient program on tiny timm ConvNeXt and ViT graphs.

Same checks and tolerances as test_autodiff: float64 central differences (onnx reference
evaluator, eps 1e-7, 3 random directions) to relative error <= 1e-3; the float32 backward
graph onnxruntime runs matches the float64 one to 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator
from test_autodiff import F32_TOL, FD_TOL, Case, _ort_vs_reference, graph_case, node, rand

from scanner.autodiff import (
    GradientProgram,
    build_vjp,
    check_gradients,
    check_vjp,
    reference_gradient,
)
from scanner.autodiff.backward import COTANGENT_SUFFIX, GRAD_SUFFIX
from scanner.autodiff.check import REFERENCE_OVERRIDES, Evaluator
from scanner.errors import Inconclusive
from scanner.graph.load import load_model

I64 = np.int64
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _lrn(shape: tuple[int, ...], **attrs: object) -> Case:
    # onnxruntime's LRN takes 4-D inputs and odd sizes only
    return graph_case([node("LRN", ["x"], **attrs)], shape)


def _param_dependent(op: str) -> Case:
    """LayerNorm / InstanceNorm whose scale and bias are computed from x as well, so the
    parameter cotangents (recovery trains them) are checked too."""
    if op == "LayerNormalization":
        nodes = [node("ReduceMean", ["x"], "s", axes=[0, 1], keepdims=0),
                 node("Sigmoid", ["s"], "b"), node(op, ["x", "s", "b"], axis=-1, epsilon=1e-3)]
        return graph_case(nodes, (2, 3, 6))
    nodes = [node("ReduceMean", ["x"], "s", axes=[0, 2, 3], keepdims=0), node("Tanh", ["s"], "b"),
             node(op, ["x", "s", "b"], epsilon=1e-3)]
    return graph_case(nodes, (2, 3, 4, 5))


def _attention() -> Case:
    """One head of self-attention over [N, T, D] tokens, softmax(q kᵀ / √D) v."""
    nodes = [node("MatMul", ["x", "wq"], "q"), node("MatMul", ["x", "wk"], "k"),
             node("MatMul", ["x", "wv"], "v"), node("Transpose", ["k"], "kt", perm=[0, 2, 1]),
             node("MatMul", ["q", "kt"], "qk"), node("Mul", ["qk", "scale"], "logit"),
             node("Softmax", ["logit"], "p", axis=-1), node("MatMul", ["p", "v"])]
    return graph_case(nodes, (2, 5, 4), {"wq": rand(4, 4), "wk": rand(4, 4), "wv": rand(4, 4),
                                         "scale": np.array(0.5, np.float32)})


def _gelu_erf() -> Case:
    """GELU as torch exports it below opset 20: x * (erf(x / √2) + 1) / 2."""
    nodes = [node("Div", ["x", "r2"], "d"), node("Erf", ["d"], "e"), node("Add", ["e", "one"], "f"),
             node("Mul", ["x", "f"], "g"), node("Mul", ["g", "half"])]
    return graph_case(nodes, (2, 3, 4), {"r2": np.array(1.4142135, np.float32),
                                         "one": np.array(1.0, np.float32),
                                         "half": np.array(0.5, np.float32)})


CASES: dict[str, Case] = {
    # --- variadic elementwise
    "sum_three_broadcast": graph_case([node("Tanh", ["x"], "t"), node("Sum", ["x", "t", "c"])],
                                      (2, 3, 4), {"c": rand(3, 1)}),
    "sum_single": graph_case([node("Sum", ["x"])], (2, 3)),
    "sum_residual_twice": graph_case([node("Relu", ["x"], "r"), node("Sum", ["r", "x", "r"])],
                                     (2, 3, 4, 4)),
    "mean_three": graph_case([node("Tanh", ["x"], "t"), node("Mean", ["x", "t", "c"])],
                             (2, 3, 4), {"c": rand(4)}),
    "max_three": graph_case([node("Tanh", ["x"], "t"), node("Max", ["t", "c", "x"])], (2, 3, 4),
                            {"c": rand(4)}),
    "min_three": graph_case([node("Tanh", ["x"], "t"), node("Min", ["t", "c", "x"])], (2, 3, 4),
                            {"c": rand(4)}),
    "max_pair_broadcast_both": graph_case([node("ReduceMean", ["x"], "m", axes=[2]),
                                           node("Max", ["x", "m"])], (2, 3, 4)),
    # --- normalisations
    "lrn_size5": _lrn((2, 7, 3, 3), size=5, alpha=1e-2, beta=0.75, bias=2.0),
    "lrn_size3_batch_gt_channels": _lrn((3, 2, 4, 4), size=3, alpha=0.3, beta=0.6, bias=1.0),
    "lrn_alexnet_attrs": graph_case([node("LRN", ["x"], size=5, alpha=1e-4, beta=0.75)],
                                    (1, 6, 3, 3), scale=20.0),
    "layernorm_last_axis": graph_case([node("LayerNormalization", ["x", "s", "b"], axis=-1,
                                            epsilon=1e-3)], (2, 3, 6),
                                      {"s": rand(6), "b": rand(6)}, symbolic=["N", "T", 6]),
    "layernorm_axis1_no_bias": graph_case([node("LayerNormalization", ["x", "s"], axis=1)],
                                          (2, 3, 4), {"s": rand(3, 4)}),
    "layernorm_params_depend": _param_dependent("LayerNormalization"),
    "instancenorm": graph_case([node("InstanceNormalization", ["x", "s", "b"], epsilon=1e-3)],
                               (2, 3, 4, 5), {"s": rand(3), "b": rand(3)}),
    "instancenorm_params_depend": _param_dependent("InstanceNormalization"),
    # --- picking and repeating
    "gather_class_token": graph_case([node("Gather", ["x", "i"], axis=1)], (2, 5, 4),
                                     {"i": np.array(0, I64)}, symbolic=["N", 5, 4]),
    "gather_repeated_negative": graph_case([node("Gather", ["x", "i"], axis=1)], (2, 5, 4),
                                           {"i": np.array([[1, -1], [1, 3]], I64)}),
    "gather_axis0_int32": graph_case([node("Gather", ["x", "i"])], (4, 3),
                                     {"i": np.array([3, 0, 3], np.int32)}),
    "expand_token": graph_case([node("Expand", ["x", "s"])], (1, 3, 1),
                               {"s": np.array([2, 3, 4], I64)}),
    "expand_adds_axes": graph_case([node("Expand", ["x", "s"])], (3, 1),
                                   {"s": np.array([2, 1, 3, 4], I64)}),
    "tile": graph_case([node("Tile", ["x", "r"])], (2, 3), {"r": np.array([2, 3], I64)}),
    "dropout_inference_opset13": graph_case([node("Dropout", ["x", "ratio", "train"])], (2, 3),
                                            {"ratio": np.array(0.3, np.float32),
                                             "train": np.array(False)}, opset=13),
    # --- Inception's stride-1 pools (the reference evaluator needs check.MaxPool here)
    "maxpool_3x3_s1_pad1": graph_case([node("MaxPool", ["x"], kernel_shape=[3, 3],
                                            pads=[1, 1, 1, 1], strides=[1, 1])], (2, 3, 6, 7)),
    "maxpool_1d_s1_pad1": graph_case([node("MaxPool", ["x"], kernel_shape=[3], pads=[1, 1])],
                                     (2, 3, 9)),
    # --- transformer patterns
    "attention_head": _attention(),
    "gelu_erf_pattern": _gelu_erf(),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_matches_finite_differences(case: str) -> None:
    model, feeds = CASES[case]()
    err = check_vjp(model, feeds, "x")
    assert err <= FD_TOL, f"{case}: relative error {err:.2e}"
    assert _ort_vs_reference(model, feeds) <= F32_TOL


def test_max_tie_goes_to_the_first_equal_input_only() -> None:
    """Three equal operands: the whole cotangent reaches the first, none is counted twice."""
    model, _ = graph_case([node("Identity", ["x"], "a"), node("Identity", ["x"], "b"),
                           node("Max", ["a", "x", "b"])], (2, 3))()
    vjp = build_vjp(model, "x", ["y"])
    cot = np.arange(6, dtype=np.float32).reshape(2, 3)
    grad = Evaluator(vjp, "float32")([f"x{GRAD_SUFFIX}"], {"x": rand(2, 3),
                                                           f"y{COTANGENT_SUFFIX}": cot})[0]
    np.testing.assert_allclose(grad, cot)  # a, x and b are all x: one share each would be 3x


def test_lrn_reference_override_matches_onnxruntime() -> None:
    """check.py replaces onnx's reference LRN (it loops over the batch axis): the override
    must compute what onnxruntime computes."""
    model, feeds = CASES["lrn_size5"]()
    ours = ReferenceEvaluator(model, new_ops=REFERENCE_OVERRIDES).run(["y"], feeds)[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ours, sess.run(["y"], feeds)[0], rtol=1e-5, atol=1e-6)


def test_gather_with_indices_from_the_input_is_refused() -> None:
    model, _ = graph_case([node("ArgMax", ["x"], "i", axis=1, keepdims=0),
                           node("Gather", ["x", "i"])], (4, 3))()
    with pytest.raises(Inconclusive, match="ArgMax|Gather"):
        build_vjp(model, "x", ["y"])


# ------------------------------------------------------- whole programs on timm graphs

TIMM = {
    # ConvNeXt: channels-last blocks (Transpose, LayerNormalization, MatMul, Erf GELU)
    "convnext_tiny32": "convnext_tiny32.onnx",
    # ViT: class token (Expand, Concat), attention (MatMul, Softmax), Gather of the token
    "vit_tiny32": "vit_tiny32.onnx",
    # the same ViT at opset 14: LayerNorm exported as ReduceMean / Sub / Pow / Sqrt / Div
    "vit_tiny32_opset14": "vit_tiny32_opset14.onnx",
}


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_program_gradient_matches_finite_differences(name: str) -> None:
    path = FIXTURES / TIMM[name]
    if not path.is_file():
        pytest.skip(f"{path.name} missing: run samples/make_autodiff_fixtures.py")
    proto = load_model(path).proto
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    targets = np.eye(10, dtype=np.float32)[[3, 7]]
    err = check_gradients(proto, x, target_weights=targets, eps=1e-7)
    assert err <= FD_TOL, f"{name}: relative error {err:.2e}"
    g32 = GradientProgram(proto).run(x, targets).grad
    g64 = reference_gradient(proto, x, targets)
    assert float(np.linalg.norm(g32 - g64) / np.linalg.norm(g64)) <= F32_TOL


def test_timm_fixtures_use_the_ops_they_stand_for() -> None:
    """The fixtures are worth their bytes only while they exercise the new rules."""
    wanted = {"convnext_tiny32.onnx": {"LayerNormalization", "Erf", "Transpose", "MatMul"},
              "vit_tiny32.onnx": {"LayerNormalization", "Gather", "Expand", "Softmax", "Erf"},
              "vit_tiny32_opset14.onnx": {"ReduceMean", "Pow", "Sqrt", "Gather", "Softmax"}}
    for file, ops in wanted.items():
        path = FIXTURES / file
        if not path.is_file():
            pytest.skip(f"{file} missing: run samples/make_autodiff_fixtures.py")
        used = {n.op_type for n in onnx.load(path).graph.node}
        assert ops <= used, f"{file} lacks {sorted(ops - used)}"
        assert path.stat().st_size < 300_000



def test_upsample_at_opset_9_is_differentiated_as_the_resize_it_converts_to(tmp_path) -> None:
    """Upsample only exists below opset 10; load_model converts such models to opset 17,
    where onnx's converter has made it a Resize (nearest): no rule of its own is needed."""
    model, feeds = graph_case([node("Upsample", ["x", "s"], mode="nearest")], (2, 3, 4, 5),
                              {"s": np.array([1, 1, 2, 3], np.float32)}, opset=9)()
    model.ir_version = 4
    path = tmp_path / "upsample9.onnx"
    path.write_bytes(model.SerializeToString())
    converted = load_model(path).proto
    assert [n.op_type for n in converted.graph.node if n.op_type != "Constant"] == ["Resize"]
    ref = ReferenceEvaluator(model).run(["y"], feeds)[0]  # the opset-9 model's own output
    sess = ort.InferenceSession(converted.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(["y"], feeds)[0], ref)
    assert check_vjp(converted, feeds, "x") <= FD_TOL
    assert _ort_vs_reference(converted, feeds) <= F32_TOL


@pytest.mark.parametrize(("attrs", "shape"), [
    ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1]}, (2, 3, 6, 7)),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, (2, 3, 7, 8)),
    ({"kernel_shape": [3, 3], "pads": [1, 0, 2, 1], "strides": [1, 2], "dilations": [2, 1]},
     (1, 2, 9, 8))])
def test_maxpool_reference_override_indices_match_onnxruntime(attrs, shape) -> None:
    """The float64 checks scatter through MaxPool's Indices: check.MaxPool must return the
    ones onnxruntime returns."""
    model, feeds = graph_case([onnx.helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs)],
                              shape)()
    model.graph.output.append(onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64,
                                                                 None))
    ours = ReferenceEvaluator(model, new_ops=REFERENCE_OVERRIDES).run(["y", "i"], feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(ours, sess.run(["y", "i"], feeds), strict=True):
        np.testing.assert_array_equal(a, b)
