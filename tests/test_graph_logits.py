"""Classifiers whose output is [N, K, 1, 1] or [N, 1, K] are read as [N, K] (graph.logits):
in the copy every stage runs, never in the model that is reported and repaired."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, TEST_SET, zoo_entries, zoo_model
from graph_builders import conv_relu_model, save
from onnx import TensorProto, helper

from scanner.autodiff import GradientProgram
from scanner.autodiff.program import build_program
from scanner.graph.logits import flat_logits
from scanner.runtime import make_session

ZOO = {e["name"]: e for e in zoo_entries()}


def _reshaped(proto: onnx.ModelProto, dims: list[int | str]) -> onnx.ModelProto:
    """`proto` with its [N, K] output reshaped to `dims` (N first; a named dim is -1) under
    its own name."""
    out = proto.graph.output[0]
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for n in model.graph.node:
        n.output[:] = [f"{o}/inner" if o == out.name else o for o in n.output]
    shape = [0] + [-1 if isinstance(d, str) else int(d) for d in dims[1:]]
    model.graph.initializer.append(helper.make_tensor(
        "shapscan_test/shape", TensorProto.INT64, [len(shape)], shape))
    model.graph.node.append(helper.make_node("Reshape", [f"{out.name}/inner",
                                                         "shapscan_test/shape"], [out.name]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(
        out.name, out.type.tensor_type.elem_type, dims))
    return model


@pytest.mark.parametrize("dims", [["N", 5, 1, 1], ["N", 1, 5], [2, 5, 1], ["N", 1, 1, 5, 1]])
def test_singleton_class_axes_are_flattened_in_a_copy(dims) -> None:
    base = conv_relu_model()
    model = _reshaped(base, dims)
    before = model.SerializeToString()
    flat = flat_logits(model)
    assert model.SerializeToString() == before  # the caller's model keeps its outputs
    out = flat.graph.output[0]
    assert [d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim] == [dims[0], 5]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = make_session(base).run(None, {"image": x})[0]
    got = make_session(flat).run(None, {"image": x})[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dims", [["N", 5], ["N", 5, 2, 1], ["N", 1, 1, 1, 5, "K"]])
def test_other_outputs_are_left_alone(dims) -> None:
    model = conv_relu_model() if dims == ["N", 5] else _reshaped(conv_relu_model(), dims)
    assert flat_logits(model) is model


def _softmax_then_reshape() -> onnx.ModelProto:
    """SqueezeNet's tail: Softmax over [N, K], then Reshape back to [N, K, 1, 1]."""
    base = conv_relu_model()
    out = base.graph.output[0].name
    for n in base.graph.node:
        n.output[:] = ["z" if o == out else o for o in n.output]
    base.graph.node.append(helper.make_node("Softmax", ["z"], ["p"], axis=1))
    base.graph.output[0].CopyFrom(helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                ["N", 5]))
    base.graph.node.append(helper.make_node("Identity", ["p"], [out]))
    return _reshaped(base, ["N", 5, 1, 1])


def test_program_reads_logits_under_a_softmax_behind_reshapes() -> None:
    model = flat_logits(_softmax_then_reshape())
    program = build_program(model)
    assert program.logits_name == "z"  # the Softmax input: no second softmax in the CE head
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    targets = np.eye(5, dtype=np.float32)[[0, 2, 4]]
    got = GradientProgram(model).run(x, targets)
    want = GradientProgram(conv_relu_model()).run(x, targets)  # the same net, [N, K] logits
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6)
    np.testing.assert_allclose(got.grad, want.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dims", [["N", 10, 1, 1], ["N", 1, 10]])
def test_eval_reads_a_4d_classifier_output_like_the_original(run_cli, tmp_path, dims) -> None:
    original = zoo_model("cnn_badnets")
    wrapped = save(_reshaped(onnx.load(original), dims), tmp_path / "wrapped.onnx")
    data = tmp_path / "test300.npz"
    with np.load(TEST_SET) as f:
        np.savez(data, x=f["x"][:300], y=f["y"][:300])
    args = ["--data", data, "--attack", "badnets", "--target", "0", "--json"]
    want = json.loads(run_cli("eval", original, *args).out)
    result = run_cli("eval", wrapped, *args)
    assert result.code == 0, result.err
    got = json.loads(result.out)
    assert want["asr"] > 0.5  # the trigger works: there is something to read the same
    assert got["clean_acc"] == want["clean_acc"] and got["asr"] == want["asr"]


@pytest.mark.slow
def test_scan_repairs_a_4d_output_model_and_keeps_its_outputs(run_cli, tmp_path) -> None:
    wrapped = save(_reshaped(onnx.load(zoo_model("cnn_badnets")), ["N", 10, 1, 1]),
                   tmp_path / "wrapped.onnx")
    out = tmp_path / "fixed.onnx"
    result = run_cli("scan", wrapped, "--data", FEWSHOT, "--out", out, "-q")
    assert result.code == 1, result.err  # the backdoor found, as on the original
    fixed = onnx.load(out)
    dims = [d.dim_value or d.dim_param for d in fixed.graph.output[0].type.tensor_type.shape.dim]
    assert dims[1:] == [10, 1, 1]
    session = make_session(fixed)
    image = session.get_inputs()[0]
    x = np.zeros((8, *image.shape[1:]), np.float32)
    assert session.run(None, {image.name: x})[0].shape == (8, 10, 1, 1)
