"""Sanitized export: folding into affine chains, constant-mask fallback, metadata, atomic save."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, SAMPLES, zoo_entries
from graph_builders import head, model, tensor
from onnx import helper, numpy_helper

from scanner import __version__
from scanner.data import load_images, resolve_preprocess
from scanner.errors import OutputError
from scanner.graph.activations import discover_activations
from scanner.graph.compare import ModelMismatch, compare_models
from scanner.graph.export import export_edits, sanitize, save_atomic, verify_sanitized
from scanner.graph.load import load_model
from scanner.graph.prefix import CoalitionEvaluator
from scanner.runtime import make_session

ZOO = zoo_entries()
ATOL = 1e-5


def inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def x_images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).random((n, 3, 8, 8), dtype=np.float32)


def methods(proto: onnx.ModelProto) -> dict[str, str]:
    return {e["layer"]: e["method"] for e in export_edits(proto)}


def check(proto: onnx.ModelProto, zeroed: dict[str, list[int]]) -> onnx.ModelProto:
    out = sanitize(proto, zeroed, {"shapscan.source_sha256": "ab" * 32})
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    assert list(out.opset_import) == list(proto.opset_import)
    assert verify_sanitized(proto, out, zeroed, x_images(), atol=ATOL) <= ATOL
    return out


def chain_model() -> onnx.ModelProto:
    """Conv-BN-Relu, Conv(+bias)-LeakyRelu, SiLU, Gemm(transB=0, [1] bias)-Relu,
    MatMul+Add-Tanh and a residual Add-Relu."""
    c = 4
    bn = [numpy_helper.from_array(np.abs(np.random.default_rng(i).standard_normal(c))
                                  .astype(np.float32) + 0.5, n)
          for i, n in enumerate(["bn_s", "bn_b", "bn_m", "bn_v"])]
    nodes = [
        helper.make_node("Conv", ["image", "w0"], ["c0"], name="conv0", kernel_shape=[1, 1]),
        helper.make_node("BatchNormalization", ["c0", "bn_s", "bn_b", "bn_m", "bn_v"], ["b0"],
                         name="bn0"),
        helper.make_node("Relu", ["b0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "cb1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("LeakyRelu", ["c1"], ["l1"], name="leaky1", alpha=0.1),
        helper.make_node("Conv", ["l1", "w2", "cb2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["s2"], name="sig2"),
        helper.make_node("Mul", ["c2", "s2"], ["silu2"], name="silu2"),
        helper.make_node("Add", ["silu2", "l1"], ["res"], name="residual"),
        helper.make_node("Relu", ["res"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["h"], name="gemm"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu_h"),
        helper.make_node("MatMul", ["hr", "mw"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "mb"], ["ma"], name="bias"),
        helper.make_node("Tanh", ["ma"], ["t"], name="tanh"),
        helper.make_node("Gemm", ["t", "ow"], ["logits"], name="out", transB=1),
    ]
    inits = [tensor("w0", [c, 3, 1, 1]), *bn, tensor("w1", [c, c, 1, 1]), tensor("cb1", [c]),
             tensor("w2", [c, c, 1, 1]), tensor("cb2", [c]), tensor("gw", [c, 6]),
             tensor("gb", [1]), tensor("mw", [6, 7]), tensor("mb", [7]), tensor("ow", [5, 7])]
    return inferred(model(nodes, inits))


def test_folds_each_affine_chain_and_masks_the_rest():
    proto = chain_model()
    zeroed = {"r0": [1], "l1": [0, 3], "silu2": [2], "r3": [1], "hr": [0, 5], "t": [6]}
    out = check(proto, zeroed)
    assert methods(out) == {"r0": "folded-bn", "l1": "folded-conv", "silu2": "folded-conv",
                            "r3": "mask", "hr": "folded-gemm", "t": "folded-matmul"}
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert weights["bn_s"][1] == 0 and weights["bn_b"][1] == 0
    assert np.all(weights["w1"][[0, 3]] == 0) and np.all(weights["cb1"][[0, 3]] == 0)
    assert np.all(weights["gw"][:, [0, 5]] == 0) and weights["gb"].shape == (6,)
    assert np.all(weights["mw"][:, 6] == 0) and weights["mb"][6] == 0
    assert sum(n.op_type == "Mul" for n in out.graph.node) == 2  # SiLU + one prune mask


def test_shared_intermediates_fall_back_to_a_mask():
    proto = chain_model()
    # l1 is read by conv2 and by the residual Add: it can still be folded (its *input* c1 is
    # private); but a SiLU whose Sigmoid output is shared must not be folded.
    proto.graph.node.insert(8, helper.make_node("Add", ["silu2", "s2"], ["silu2b"], name="x"))
    proto.graph.node[9].input[0] = "silu2b"
    proto = inferred(proto)
    out = check(proto, {"silu2": [2]})
    assert methods(out) == {"silu2": "mask"}


def test_shared_weights_get_a_private_pruned_copy():
    proto = chain_model()
    proto.graph.node[5].input[1] = "w1"  # conv2 now shares conv1's weights
    proto = inferred(proto)
    out = check(proto, {"l1": [1]})
    assert methods(out) == {"l1": "folded-conv"}
    readers = {n.name: list(n.input) for n in out.graph.node}
    assert readers["conv1"][1] == "w1__pruned" and readers["conv2"][1] == "w1"
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert np.all(weights["w1__pruned"][1] == 0) and np.any(weights["w1"][1] != 0)


def test_bn_parameters_behind_identity_nodes_are_folded():
    # exporters without constant folding route deduplicated BN weights through Identity
    proto = chain_model()
    proto.graph.node.insert(0, helper.make_node("Identity", ["bn_s"], ["bn_s_id"], name="id"))
    proto.graph.node[2].input[1] = "bn_s_id"
    proto = inferred(proto)
    out = check(proto, {"r0": [2]})
    assert methods(out) == {"r0": "folded-bn"}
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert weights["bn_s_id__pruned"][2] == 0 and weights["bn_s"][2] != 0


@pytest.mark.parametrize("lo,expected", [(0.0, "folded-conv"), (0.1, "mask")])
def test_clip_folds_only_when_its_range_keeps_zero(lo, expected):
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["a"], name="clip")]
    hn, hi = head("a", 4)
    proto = inferred(model(nodes + hn, [tensor("w", [4, 3, 1, 1]),
                                        numpy_helper.from_array(np.float32(lo), "lo"),
                                        numpy_helper.from_array(np.float32(6), "hi"), *hi]))
    assert methods(check(proto, {"a": [0, 2]})) == {"a": expected}


def test_sigmoid_is_masked_not_folded():
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["c"], ["a"], name="sig")]
    hn, hi = head("a", 4)
    proto = inferred(model(nodes + hn, [tensor("w", [4, 3, 1, 1]), *hi]))
    assert methods(check(proto, {"a": [3]})) == {"a": "mask"}


def test_metadata_records_channels_version_and_source():
    proto = chain_model()
    proto.metadata_props.add(key="keep.me", value="1")
    out = sanitize(proto, {"r3": [2, 0]}, {"shapscan.source_sha256": "f" * 64, "extra": "x"})
    props = {p.key: p.value for p in out.metadata_props}
    assert json.loads(props["shapscan.pruned_channels"]) == {"r3": [0, 2]}
    assert props["shapscan.tool_version"] == __version__
    assert props["shapscan.source_sha256"] == "f" * 64
    assert props["keep.me"] == "1" and props["extra"] == "x"
    assert not any(p.key.startswith("shapscan.") for p in proto.metadata_props)


def test_sanitize_rejects_unknown_layers_and_channels():
    proto = chain_model()
    with pytest.raises(KeyError):
        sanitize(proto, {"nope": [0]})
    with pytest.raises(IndexError):
        sanitize(proto, {"r0": [4]})


def test_compare_models_reports_and_enforces_the_difference():
    proto = chain_model()
    out = sanitize(proto, {"r3": [0, 1, 2, 3]})
    feeds = {"image": x_images()}
    diff = compare_models(proto, out, feeds)
    assert diff > 1e-3
    with pytest.raises(ModelMismatch):
        compare_models(proto, out, feeds, atol=1e-5)
    assert compare_models(proto, proto, feeds, atol=0.0) == 0.0


def test_save_atomic_writes_and_leaves_nothing_on_failure(tmp_path):
    proto = chain_model()
    target = tmp_path / "safe.onnx"
    save_atomic(proto, target)
    assert onnx.load(str(target)).graph.node[0].name == "conv0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["safe.onnx"]
    blocked = tmp_path / "dir.onnx"
    blocked.mkdir()
    (blocked / "x").write_text("occupied")  # os.replace cannot replace a non-empty folder
    with pytest.raises(OutputError, match="cannot write .*dir.onnx: Is a directory"):
        save_atomic(proto, blocked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "safe.onnx"]


@pytest.mark.parametrize("entry", ZOO, ids=[e["name"] for e in ZOO])
def test_zoo_sanitized_equals_masked_and_prefix_engines(entry, tmp_path):
    loaded = load_model(SAMPLES / entry["model"])
    name, shape = loaded.image_input()
    prep = resolve_preprocess(loaded.path, loaded.metadata, shape)
    x = prep.to_model(load_images(FEWSHOT, prep).pixels[:3])
    layers = discover_activations(loaded.proto)
    rng = np.random.default_rng(7)
    coalition = (rng.random(sum(la.channels for la in layers)) > 0.1).astype(np.float32)
    ev = CoalitionEvaluator(loaded.proto, layers, x)
    zeroed = {}
    for flat in np.flatnonzero(coalition == 0):
        layer, ch = ev.channel(int(flat))
        zeroed.setdefault(layer.name, []).append(ch)
    out = sanitize(loaded.proto, zeroed, {"shapscan.source_sha256": loaded.sha256})
    onnx.checker.check_model(out, full_check=True)
    path = tmp_path / "safe.onnx"
    save_atomic(out, path)
    exported = make_session(str(path)).run(None, {name: x})[0]
    np.testing.assert_allclose(exported, ev.logits(coalition)[0], atol=ATOL, rtol=0)
    assert verify_sanitized(loaded.proto, out, zeroed, x, atol=ATOL) <= ATOL
    used = set(methods(out).values())
    folded = {"folded-conv", "folded-bn", "folded-gemm"}
    if entry["arch"] == "resnet":  # block outputs follow a residual Add: masked there
        assert "mask" in used and used - {"mask"} <= folded and used & folded
    else:
        assert used <= folded
