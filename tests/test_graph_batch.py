"""Models pinned to one batch size, and image inputs shapscan cannot run: what happens."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_builders import head, model, save, tensor
from onnx import TensorProto, helper, numpy_helper

from scanner.api import ScanOptions, scan
from scanner.errors import Inconclusive
from scanner.findings import Verdict
from scanner.graph.batch import any_batch
from scanner.graph.load import load_model
from scanner.runtime import make_session

FEWSHOT = "samples/data/fewshot.npz"


def flat_model(batch: int | str = 1, shape_from_constant: bool = False,
               image: list[int | str] | None = None, elem: int = TensorProto.FLOAT
               ) -> onnx.ModelProto:
    """image [B,1,28,28] -> Conv -> Relu -> Reshape [B, -1] -> MatMul: the shape of an
    export traced at batch 1 (`x.view(1, -1)`) when `batch` is 1."""
    shape = np.array([batch if isinstance(batch, int) else -1, 4 * 26 * 26], np.int64)
    if not isinstance(batch, int):
        shape = np.array([0, -1], np.int64)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc"], ["logits"], name="fc")]
    inits = [tensor("w", [4, 1, 3, 3]), tensor("fc", [4 * 26 * 26, 10], scale=0.05)]
    if elem != TensorProto.FLOAT:  # an input of another float type, cast up front
        nodes.insert(0, helper.make_node("Cast", ["image"], ["image32"], to=TensorProto.FLOAT))
        nodes[1].input[0] = "image32"
    if shape_from_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["shape"],
                                         value=numpy_helper.from_array(shape)))
    else:
        inits.append(numpy_helper.from_array(shape, "shape"))
    inputs = [helper.make_tensor_value_info("image", elem, image or [batch, 1, 28, 28])]
    proto = model(nodes, inits, inputs=inputs, classes=10)
    proto.graph.output[0].type.tensor_type.shape.dim[0].Clear()
    if isinstance(batch, int):
        proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = batch
    return proto


def test_a_batch_1_export_runs_any_batch_with_the_same_outputs():
    proto = flat_model(batch=1)
    relaxed = any_batch(proto, (1, 28, 28))
    x = np.random.default_rng(3).random((5, 1, 28, 28), dtype=np.float32)
    one = make_session(proto)
    per_row = np.concatenate([one.run(None, {"image": x[i:i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(make_session(relaxed).run(None, {"image": x})[0], per_row,
                               rtol=1e-5, atol=1e-6)
    # the original is untouched: its interface is what the sanitized export keeps
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_a_free_batch_dim_is_left_alone():
    proto = flat_model(batch="N")
    assert any_batch(proto, (1, 28, 28)) is proto


def test_a_batch_that_cannot_be_freed_is_inconclusive_in_one_line():
    # the Reshape target is a Constant node, which the relaxation does not rewrite
    proto = flat_model(batch=1, shape_from_constant=True)
    with pytest.raises(Inconclusive) as info:
        any_batch(proto, (1, 28, 28))
    text = str(info.value)
    assert "fixed at 1" in text and "dynamic batch axis" in text and "\n" not in text


def test_scan_of_a_batch_1_model_repairs_it_and_keeps_its_interface(tmp_path):
    path = save(flat_model(batch=1), tmp_path / "b1.onnx")
    out = tmp_path / "b1.safe.onnx"
    policy = tmp_path / "random-weights.toml"  # the model is untrained: no accuracy floor
    policy.write_text("[detection]\nmin_clean_accuracy = 0.0\n")
    result = scan(path, ScanOptions(data=FEWSHOT, out=out, quiet=True, permutations=8,
                                    policy=policy))
    assert result.verdict in (Verdict.CLEAN, Verdict.BACKDOOR) and not result.errors
    assert result.detection is not None and len(result.detection.classes) == 10
    if out.exists():
        dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_value == 1


def test_eval_of_a_batch_1_model_and_of_one_that_cannot_be_freed(run_cli, tmp_path):
    ok = run_cli("eval", save(flat_model(batch=1), tmp_path / "b1.onnx"), "--data", FEWSHOT)
    assert ok.code == 0 and "images          10" in ok.out
    stuck = run_cli("eval", save(flat_model(batch=1, shape_from_constant=True),
                                 tmp_path / "b1c.onnx"), "--data", FEWSHOT)
    assert stuck.code == 3 and stuck.err.count("\n") == 1 and "fixed at 1" in stuck.err


@pytest.mark.parametrize("build,code,said", [
    (lambda: _two_inputs(), 3, "has 2 inputs (image, extra)"),
    (lambda: flat_model("N", elem=TensorProto.DOUBLE), 3, "'image' is double"),
    (lambda: flat_model("N", image=["N", 1, "H", "W"]), 2, "height\" and \"width\" in m.pre"),
    (lambda: _gap_model(["N", 1, 100000, 100000]), 3, "1x100000x100000 values"),
])
def test_image_inputs_shapscan_cannot_run_get_one_line(run_cli, tmp_path, build, code, said):
    path = save(build(), tmp_path / "m.onnx")
    for command in (["eval", path, "--data", FEWSHOT], ["scan", path, "--data", FEWSHOT, "-q"]):
        result = run_cli(*command)
        assert result.code == code, result.err
        assert said in result.err and "internal error" not in result.err
        assert result.err.count("\n") == 1


def _two_inputs() -> onnx.ModelProto:
    proto = flat_model("N")
    proto.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT,
                                                           ["N", 1, 28, 28]))
    return proto


def _gap_model(image: list[int | str]) -> onnx.ModelProto:
    nodes, inits = head("r", 4, classes=10)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), *nodes]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, image)]
    return model(nodes, [tensor("w", [4, 1, 3, 3]), *inits], inputs=inputs, classes=10)


def test_loaded_model_runs_its_own_proto_until_told_otherwise(tmp_path):
    loaded = load_model(save(flat_model(batch="N"), tmp_path / "m.onnx"))
    assert loaded.runnable is loaded.proto
