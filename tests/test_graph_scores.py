"""Other exporters: skl2onnx classifiers (an int64 label first, ZipMap probabilities) and
flat [N, C*H*W] image inputs (graph.scores, data.Preprocess.flat)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from models.make_models import sklearn_images
from onnx import TensorProto, helper

from scanner.data import Preprocess, resolve_preprocess
from scanner.errors import DataError, Inconclusive, UsageError
from scanner.graph.compare import run_model
from scanner.graph.export import export_edits, sanitize
from scanner.graph.load import load_model
from scanner.graph.scores import ML_DOMAIN, scores_copy

MODELS = Path(__file__).parent / "models"


@pytest.mark.parametrize(("name", "outputs"), [
    ("sklearn_mlp", ["output_label", "output_probability"]),
    ("sklearn_mlp_nozipmap", ["label", "probabilities"])])
def test_the_analysed_copy_outputs_the_probability_tensor(name, outputs):
    loaded = load_model(MODELS / f"{name}.onnx")
    copy = loaded.analysed
    assert copy is not loaded.proto
    assert [o.name for o in loaded.proto.graph.output] == outputs
    (out,) = copy.graph.output
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    assert not any(n.domain == ML_DOMAIN for n in copy.graph.node)  # no ZipMap, no label
    x, y = sklearn_images(np.random.default_rng(1), 20)
    scores = run_model(copy, {"X": x})[out.name]
    shipped = run_model(loaded.proto, {"X": x})
    assert scores.shape == (20, 10)
    assert np.allclose(scores, shipped[outputs[1]], atol=1e-6)  # ZipMap's maps as arrays
    assert np.array_equal(scores.argmax(1), shipped[outputs[0]])
    assert (scores.argmax(1) == y).mean() >= 0.9


def test_models_with_a_float_first_output_need_no_copy():
    loaded = load_model(MODELS / "vit_tiny10.onnx")
    assert scores_copy(loaded.proto) is None and loaded.analysed is loaded.proto


def test_no_probability_tensor_is_refused_in_one_line_that_says_zipmap_false():
    # a label-only classifier: ArgMax of a float tensor, nothing else comes out
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    graph = helper.make_graph([helper.make_node("ArgMax", ["X"], ["label"], axis=1,
                                                keepdims=0)], "g", [x], [label])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(Inconclusive, match="zipmap=False") as info:
        scores_copy(proto)
    assert "\n" not in str(info.value)


def test_export_keeps_the_zipmap_and_zeroes_the_unit():
    loaded = load_model(MODELS / "sklearn_mlp.onnx")
    repaired = sanitize(loaded.proto, {"next_activations": [3, 7]})  # verified on scores
    assert [e["method"] for e in export_edits(repaired)] == ["folded-matmul"]
    assert [o.name for o in repaired.graph.output] == ["output_label", "output_probability"]
    x, _ = sklearn_images(np.random.default_rng(2), 6)
    probe = onnx.ModelProto()
    probe.CopyFrom(repaired)
    probe.graph.output.append(helper.make_tensor_value_info("next_activations",
                                                            TensorProto.FLOAT, None))
    hidden = run_model(probe, {"X": x})["next_activations"]
    assert np.abs(hidden[:, [3, 7]]).max() == 0.0 and np.abs(hidden).max() > 0.0


@pytest.mark.parametrize(("layout", "channels"), [("NCHW", 1), ("NCHW", 3), ("NHWC", 3)])
def test_flat_inputs_flatten_in_the_documented_order(layout, channels):
    prep = Preprocess(layout, channels, 4, 5, flat=True)
    pixels = np.random.default_rng(0).random((2, channels, 4, 5), dtype=np.float32)
    x = prep.to_model(pixels)
    image = pixels if layout == "NCHW" else pixels.transpose(0, 2, 3, 1)
    assert x.shape == (2, channels * 20) and prep.input_shape == (channels * 20,)
    assert np.array_equal(x, image.reshape(2, -1))  # C, H, W (or H, W, C) row-major
    grad = np.arange(x.size, dtype=np.float32).reshape(x.shape)
    back = prep.grad_to_pixels(grad)
    assert back.shape == pixels.shape
    assert np.array_equal(prep.to_model(back), grad)  # scale 1, mean 0, std 1: a permutation
    assert "flat" not in json.loads(prep.to_json())  # a sidecar never sets it


def test_flat_input_shape_comes_from_flags_or_the_sidecar(tmp_path):
    model_path = tmp_path / "mlp.onnx"
    with pytest.raises(DataError, match="--height, --width and --channels"):
        resolve_preprocess(model_path, {}, ["N", 784])
    prep = resolve_preprocess(model_path, {}, ["N", 784], {"height": 28, "width": 28})
    assert (prep.flat, prep.channels, prep.height, prep.width) == (True, 1, 28, 28)
    with pytest.raises(UsageError, match="784"):
        resolve_preprocess(model_path, {}, ["N", 784], {"height": 28, "width": 28,
                                                        "channels": 3})
    model_path.with_suffix(".preprocess.json").write_text(
        json.dumps({"height": 16, "width": 16, "channels": 3, "layout": "NHWC"}))
    prep = resolve_preprocess(model_path, {}, ["N", 768])
    assert (prep.flat, prep.layout, prep.input_shape) == (True, "NHWC", (768,))


def _mlp_and_images(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "mlp.onnx"
    model.write_bytes((MODELS / "sklearn_mlp.onnx").read_bytes())
    x, y = sklearn_images(np.random.default_rng(3), 20)
    data = tmp_path / "few.npz"
    np.savez(data, x=x.reshape(-1, 28, 28), y=y)
    return model, data


def test_scan_of_a_flat_input_without_an_image_shape_is_one_line(run_cli, tmp_path):
    model, data = _mlp_and_images(tmp_path)
    out = run_cli("scan", model, "--data", data, "-q")
    assert out.code == 2 and "model input is flat [N, 784]" in out.err
    assert out.err.count("\n") == 1


@pytest.mark.slow
def test_scan_of_an_skl2onnx_mlp(run_cli, tmp_path):
    model, data = _mlp_and_images(tmp_path)
    report = tmp_path / "scan.json"
    out = run_cli("scan", model, "--data", data, "--height", "28", "--width", "28", "-q",
                  "--report", report)
    result = json.loads(report.read_text())["results"][0]
    assert out.code in (0, 1) and result["verdict"] in ("clean", "backdoor"), out.err
    assert [la["axis"] for la in result["model"]["layers"]] == [1]
