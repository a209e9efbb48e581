"""Float16 models: analysed as float32 copies (graph.precision), repaired at their precision."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, SAMPLES, TEST_SET, zoo_model
from graph_builders import conv_relu_model, save
from onnx import TensorProto, helper, numpy_helper

from scanner.errors import Inconclusive
from scanner.graph.load import load_model
from scanner.graph.precision import low_precision, retype, widen
from scanner.runtime import make_session

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def half(proto: onnx.ModelProto, keep_io: bool = False) -> onnx.ModelProto:
    """`proto` in float16; with `keep_io`, float32 in and out with Casts at both ends (what
    onnxconverter-common's convert_float_to_float16(keep_io_types=True) writes)."""
    m = retype(proto, {FLOAT}, HALF)
    if keep_io:
        g = m.graph
        inp, out = g.input[0], g.output[0]
        for node in g.node:
            node.input[:] = [f"{i}_half" if i == inp.name else i for i in node.input]
            node.output[:] = [f"{o}_half" if o == out.name else o for o in node.output]
        g.node.insert(0, helper.make_node("Cast", [inp.name], [f"{inp.name}_half"], to=HALF))
        g.node.append(helper.make_node("Cast", [f"{out.name}_half"], [out.name], to=FLOAT))
        inp.type.tensor_type.elem_type = out.type.tensor_type.elem_type = FLOAT
        del g.value_info[:]
    return m


def _types(proto: onnx.ModelProto) -> set[int]:
    g = proto.graph
    return ({t.data_type for t in g.initializer}
            | {v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]})


@pytest.mark.parametrize("keep_io", [False, True])
def test_the_float32_copy_of_a_float16_zoo_model_computes_what_it_does(keep_io):
    original = onnx.load(zoo_model("cnn_badnets"))
    h = half(original, keep_io)
    assert low_precision(h) == "float16" and low_precision(original) is None
    wide = widen(h)
    assert HALF not in _types(wide)
    x = np.load(FEWSHOT)["x"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    ref = make_session(original).run(None, {"image": x})[0]
    feed = x if keep_io else x.astype(np.float16)
    got16 = make_session(h).run(None, {"image": feed})[0].astype(np.float32)
    got = make_session(wide).run(None, {"image": x})[0]
    # the copy is the float32 model again (float16 weights widened: ~1e-3 relative)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-2 * np.abs(ref).max())
    assert (got.argmax(1) == got16.argmax(1)).all()


def test_a_float16_model_loads_with_its_copy_and_says_so(tmp_path):
    loaded = load_model(save(half(onnx.load(zoo_model("cnn_badnets"))), tmp_path / "h.onnx"))
    assert loaded.proto.graph.input[0].type.tensor_type.elem_type == HALF
    assert loaded.analysed.graph.input[0].type.tensor_type.elem_type == FLOAT
    assert loaded.runnable is loaded.analysed
    assert [f.rule_id for f in loaded.findings] == ["SS113"]
    plain = load_model(zoo_model("cnn_badnets"))
    assert plain.widened is None and plain.analysed is plain.proto and not plain.findings


def test_a_copy_that_does_not_compute_what_the_model_does_is_inconclusive(tmp_path):
    # x * 300 * 300 overflows float16 (max 65504): the float32 copy would analyse a model
    # that is not the one deployed
    proto = half(conv_relu_model())
    g = proto.graph
    g.node.insert(0, helper.make_node("Mul", ["image", "k"], ["k1"]))
    g.node.insert(1, helper.make_node("Mul", ["k1", "k"], ["k2"]))
    g.node[2].input[0] = "k2"
    g.initializer.append(numpy_helper.from_array(np.array(300, np.float16), "k"))
    with pytest.raises(Inconclusive) as info:
        load_model(save(proto, tmp_path / "overflow.onnx"))
    assert "float32 copy of this float16 model differs" in str(info.value)


@pytest.mark.parametrize("keep_io", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_scan_repairs_a_float16_model_and_writes_it_in_float16(run_cli, tmp_path, keep_io):
    model = save(half(onnx.load(zoo_model("cnn_badnets")), keep_io), tmp_path / "h.onnx")
    out, report = tmp_path / "safe.onnx", tmp_path / "r.json"
    # --keep-incomplete: written whether or not the plan reached its target (at the 2 %
    # channel budget cnn_badnets' does not), so its float16 export is checked
    result = run_cli("scan", model, "--data", FEWSHOT, "--out", out, "--report", report, "-q",
                     "--keep-incomplete")
    assert result.code == 1, result.err
    scanned = json.loads(report.read_text())["results"][0]
    assert scanned["detection"]["flagged_targets"][0] == 0
    assert "SS113" in {f["rule_id"] for f in scanned["findings"]}
    # recovery cannot train float16 weights: the plan keeps zeroing alone's 2 % budget, and
    # the summary says recovery was skipped
    assert scanned["repair"]["pruned_fraction"] <= 0.02
    [summary] = [f for f in scanned["findings"] if f["rule_id"] == "SS301"]
    assert "recovery skipped: the model stores its weights in half precision" in \
        summary["message"]
    safe = onnx.load(str(out))
    io = HALF if not keep_io else FLOAT
    assert safe.graph.input[0].type.tensor_type.elem_type == io
    assert {t.data_type for t in safe.graph.initializer if t.dims} == {HALF}
    zoo = ["--zoo", SAMPLES / "zoo.json", "--zoo-entry", "cnn_badnets", "--json"]
    before = json.loads(run_cli("eval", model, "--data", TEST_SET, *zoo).out)
    after = json.loads(run_cli("eval", out, "--data", TEST_SET, *zoo).out)
    assert before["asr"] > 0.95
    assert after["asr"] < 0.25 * before["asr"]
    assert after["clean_acc"] > before["clean_acc"] - 0.05


def test_nan_where_the_original_has_nan_is_agreement(tmp_path):
    # sqrt(x)^2 is x on images and NaN on the probe's negative values, in both precisions
    proto = onnx.load(zoo_model("cnn_badnets"))
    g = proto.graph
    for node in g.node:
        node.input[:] = ["x2" if i == "image" else i for i in node.input]
    g.node.insert(0, helper.make_node("Sqrt", ["image"], ["s"]))
    g.node.insert(1, helper.make_node("Mul", ["s", "s"], ["x2"]))
    loaded = load_model(save(half(proto), tmp_path / "sqrt.onnx"))
    assert loaded.widened is not None


def test_running_out_of_memory_while_comparing_says_so(tmp_path, monkeypatch):
    import scanner.graph.compare as compare  # the side-by-side run of model and copy

    def too_big(model, feeds):
        raise RuntimeError("Non-zero status code returned while running Conv node. Status "
                           "Message: bfc_arena.cc:360 Failed to allocate memory for buffer")

    monkeypatch.setattr(compare, "run_model", too_big)
    with pytest.raises(Inconclusive, match="ran out of memory"):
        load_model(save(half(onnx.load(zoo_model("cnn_badnets"))), tmp_path / "h.onnx"))


def test_the_shape_probe_runs_a_float16_graph_with_float16_outputs():
    from scanner.graph.activations import probe_shapes

    h = half(onnx.load(zoo_model("cnn_badnets")))
    h.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a static image shape
    layer = "/features/features.5/features.5.2/Relu_output_0"
    assert probe_shapes(h, [layer]) == {layer: [None, 128, 7, 7]}
