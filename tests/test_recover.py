"""Recovery after zeroing (scanner/recover.py) on small graphs and a real sample model."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FEWSHOT, ROOT, TEST_SET, zoo_model
from onnx import TensorProto, helper, numpy_helper

from scanner.api import Predictor, model_preprocess
from scanner.data import ImageSet, load_images, shifted
from scanner.errors import Inconclusive
from scanner.graph.activations import discover_activations
from scanner.graph.export import sanitize
from scanner.graph.load import load_model
from scanner.recover import Batch, RecoverConfig, _draw, _targets, augment, frozen_entries, recover
from scanner.repair import CLEAN_COPIES
from scanner.report.json_report import report_dict

RNG = np.random.default_rng(5)


def _small() -> onnx.ModelProto:
    inits = {"w": RNG.standard_normal((4, 1, 3, 3)).astype(np.float32),
             "b": np.array([0.5, 0.0, -0.2, 0.1], np.float32),
             "fc": RNG.standard_normal((3, 4)).astype(np.float32),
             "fb": np.zeros(3, np.float32)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), n("Relu", ["c"], ["r"]),
             n("GlobalAveragePool", ["r"], ["g"]), n("Flatten", ["g"], ["f"]),
             n("Gemm", ["f", "fc", "fb"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 1, 6, 6])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 3])], [numpy_helper.from_array(v, k)
                                                 for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_frozen_entries_cover_the_cut_channel_and_its_zero_bias() -> None:
    original = _small()
    zeroed = sanitize(original, {"r": [1, 2]})
    frozen = frozen_entries(original, zeroed, ["w", "b", "fc", "fb"])
    assert frozen["w"][[1, 2]].all() and not frozen["w"][[0, 3]].any()
    # channel 1's bias was already 0: frozen with its weights all the same
    assert frozen["b"].tolist() == [False, True, True, False]
    assert not frozen["fc"].any() and not frozen["fb"].any()


def test_augment_keeps_shape_and_range() -> None:
    x = RNG.random((3, 1, 8, 8)).astype(np.float32)
    out = augment(x, 7, RecoverConfig(flip=True), np.random.default_rng(0)).pixels
    assert out.shape == (7, 1, 8, 8) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def _rows(first: list[int], second: list[int], share: list[float]) -> Batch:
    return Batch(np.zeros((len(first), 1, 2, 2), np.float32), np.array(first),
                 np.array(second), np.array(share, np.float32))


def test_distillation_targets_remove_cap_or_keep_the_flagged_mass() -> None:
    labels = np.array([0, 1, 2])  # pool: one image per class; class 2 is flagged
    logits = np.array([[4.0, 0.0, 3.0],  # honest row, the teacher leans to the target
                       [0.0, 1.0, 5.0],  # a row of the flagged class itself
                       [2.0, 0.0, 2.0]], np.float32)  # honest, mixed 0 / 1
    b = _rows([0, 2, 0], [0, 2, 1], [1.0, 1.0, 0.5])
    soft = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(1, keepdims=True)
    removed = _targets(logits, b, labels, [2], RecoverConfig())
    assert removed[[0, 2], 2].max() == 0.0 and np.allclose(removed[1], soft[1])
    kept = _targets(logits, b, labels, [2], RecoverConfig(flagged_mass=1.0))
    assert np.allclose(kept, soft)
    # capped at what the un-augmented source images get (0.01 and 0.03, mixed 0.02)
    reference = np.array([[0.9, 0.09, 0.01], [0.07, 0.9, 0.03], [0.0, 0.1, 0.9]])
    capped = _targets(logits, b, labels, [2],
                      RecoverConfig(flagged_mass=1.0, flagged_cap=True), reference)
    mass = capped[:, 2] / capped[:, :2].sum(1)  # target mass against the rest, unscaled
    assert np.allclose(mass[[0, 2]], [0.01 / soft[0, :2].sum(), 0.02 / soft[2, :2].sum()])
    assert np.allclose(capped[1], soft[1]) and np.allclose(capped.sum(1), 1.0)


def test_draw_gives_the_flagged_classes_their_share_of_the_batch() -> None:
    labels = np.array([0, 1, 2, 2, 3])
    p = _draw(labels, [2], 0.5)
    assert np.isclose(p.sum(), 1.0) and np.allclose(p[[2, 3]], 0.25)
    assert np.allclose(p[[0, 1, 4]], 0.5 / 3)
    assert _draw(labels, [2], 0.0) is None and _draw(labels, [7], 0.4) is None


def test_half_precision_model_is_refused() -> None:
    from scanner.graph.precision import retype

    half = retype(_small(), {TensorProto.FLOAT}, TensorProto.FLOAT16)
    with pytest.raises(Inconclusive, match="half precision"):
        recover(half, half, None, ImageSet(np.zeros((1, 1, 6, 6), np.float32),  # type: ignore[arg-type]
                                           np.zeros(1, np.int64)), [])


def _accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y).mean())


@pytest.mark.slow  # 15 training steps: ~10 s alone, 40 s on a loaded machine
def test_recovery_restores_accuracy_of_a_zeroed_sample_model() -> None:
    """cnn_badnets with a third of its first activation layer zeroed loses test accuracy;
    recovery (distillation from the original on the 10 few-shot images) wins back part
    of it on 500 held-out test images, while the zeroed channels stay exactly zero and
    the graph's I/O, opset and node list stay as they were."""
    path = zoo_model("cnn_badnets")
    loaded = load_model(path)
    prep = model_preprocess(loaded)
    layer = discover_activations(loaded.proto)[0]
    cut = list(range(0, layer.channels, 3))
    zeroed = sanitize(loaded.proto, {layer.name: cut})
    fewshot = load_images(FEWSHOT, prep)
    test = load_images(TEST_SET, prep)
    x, y = prep.to_model(test.pixels[:500]), test.labels[:500]
    before = _accuracy(zeroed, x, y)
    assert _accuracy(loaded.proto, x, y) - before > 0.05  # the zeroing costs accuracy
    res = recover(loaded.proto, zeroed, prep, fewshot, [],
                  RecoverConfig(steps=15, batch=32, lr=2e-3))
    after = _accuracy(res.model, x, y)
    assert after > before + 0.02, (before, after)
    assert res.frozen > 0 and res.loss_last < res.loss_first
    # same graph: inputs, outputs, opset, nodes; only initializer values changed
    repaired = res.model
    onnx.checker.check_model(repaired, full_check=True)
    assert [i.SerializeToString() for i in repaired.graph.input] == \
        [i.SerializeToString() for i in zeroed.graph.input]
    assert [o.SerializeToString() for o in repaired.graph.output] == \
        [o.SerializeToString() for o in zeroed.graph.output]
    assert list(repaired.opset_import) == list(zeroed.opset_import)
    assert [n.SerializeToString() for n in repaired.graph.node] == \
        [n.SerializeToString() for n in zeroed.graph.node]
    # the zeroed channels are still exactly zero on real images
    probe = onnx.ModelProto()
    probe.CopyFrom(repaired)
    probe.graph.output.append(helper.make_tensor_value_info(layer.name, TensorProto.FLOAT,
                                                            None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    act = sess.run([layer.name], {sess.get_inputs()[0].name: x[:50]})[0]
    assert np.all(act[:, cut] == 0) and np.any(act[:, [c + 1 for c in cut[:-1]]] != 0)


@pytest.mark.slow
def test_scan_with_recovery_writes_fine_tuned_weights(tmp_path) -> None:
    """[repair.recover] enabled: the scan's export carries the recovered weights (its
    metadata says so, SS301 reports it) and keeps the zeroed channels at zero."""
    from scanner.api import ScanOptions, scan
    from scanner.recover import RECOVER_KEY

    path = zoo_model("cnn_badnets")
    policy = tmp_path / "recover.toml"
    policy.write_text('extends = "default"\n[repair.recover]\nenabled = true\nsteps = 10\n')
    out = tmp_path / "safe.onnx"
    # the model is wanted even if the plan or the re-scan calls the repair incomplete
    keep = {"keep_incomplete": True} if "keep_incomplete" in {
        f.name for f in dataclasses.fields(ScanOptions)} else {}
    result = scan(path, ScanOptions(data=FEWSHOT, out=out, policy=policy, quiet=True, **keep))
    assert result.repair is not None and out.is_file()
    written = onnx.load(str(out))
    meta = {p.key: p.value for p in written.metadata_props}
    assert meta[RECOVER_KEY].startswith("steps=10 ")
    summary = next(f for f in result.findings if f.rule_id == "SS301")
    assert "recovered: 10 fine-tuning steps" in summary.message
    assert "recover" in result.timings
    original = load_model(path).proto
    assert [i.name for i in written.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in written.graph.output] == [o.name for o in original.graph.output]
    # the figures after are of the written (recovered) model, the zeroed model's kept apart
    rep = result.repair
    assert rep.zeroed is not None and rep.zeroed.clean_acc <= 1.0
    loaded = load_model(path)
    prep = model_preprocess(loaded)
    images = shifted(load_images(FEWSHOT, prep), CLEAN_COPIES)
    acc = float((Predictor(loaded, prep, graph=written)(images.pixels).argmax(-1)
                 == images.labels).mean())
    assert abs(acc - rep.fewshot_acc_after) < 1e-6
    doc = report_dict([result])
    jsonschema.Draft202012Validator(json.loads(
        (ROOT / "rules" / "schemas" / "report.schema.json").read_text())).validate(doc)
    zeroed = doc["results"][0]["repair"]["zeroed"]
    assert zeroed["fewshot_acc"] == pytest.approx(rep.zeroed.clean_acc)
