"""Feature-axis inference (graph.axis): NCHW maps, channels-last maps behind a Transpose,
[N, T, D] tokens, [N, D] features, undecided axes; masks, export and squeeze-excitation gates
on those axes; the timm ConvNeXt and ViT fixtures in tests/models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_builders import head, model, save, tensor
from onnx import TensorProto, helper, numpy_helper

from scanner.graph.activations import AXIS_UNDECIDED, discover, discovery_findings
from scanner.graph.compare import run_model
from scanner.graph.export import export_edits, sanitize, verify_sanitized
from scanner.graph.load import load_model
from scanner.graph.mask import MaskedModel, insert_masks, mask_inputs

MODELS = Path(__file__).parent / "models"
RNG = np.random.default_rng(0)


def inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def arr(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def nhwc_block(side: bool = False) -> onnx.ModelProto:
    """ConvNeXt's block: Conv -> Transpose to NHWC -> LayerNorm(C) -> MatMul(C->12) -> Relu
    -> MatMul(12->4) -> Transpose back -> head. The Relu is [N, 8, 8, 12], channels on 3.
    With `side`, the Relu's input also feeds the logits through a second branch."""
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("LayerNormalization", ["t", "ln_s", "ln_b"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["act"], name="relu"),
             helper.make_node("MatMul", ["act", "w2"], ["o"]),
             helper.make_node("Transpose", ["o"], ["back"], perm=[0, 3, 1, 2])]
    hn, hi = head("back", 4, out="logits_pre" if side else "logits")
    if side:
        hn += [helper.make_node("ReduceMean", ["h"], ["s"], axes=[1, 2, 3], keepdims=1),
               helper.make_node("Reshape", ["s", "to_n1"], ["s1"]),
               helper.make_node("Add", ["logits_pre", "s1"], ["logits"])]
        hi.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "to_n1"))
    inits = [tensor("w", [4, 3, 1, 1]), arr("ln_s", np.ones(4)), arr("ln_b", np.zeros(4)),
             tensor("w1", [4, 12]), tensor("b1", [12]), tensor("w2", [12, 4]), *hi]
    return inferred(model(nodes + hn, inits))


def token_mlp() -> onnx.ModelProto:
    """A ViT MLP on [N, 6, 8] tokens: MatMul(8->10) -> Relu -> MatMul(10->5) -> mean over
    the tokens. The Relu is [N, 6, 10], units on axis 2."""
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", 6, 8])]
    nodes = [helper.make_node("MatMul", ["tokens", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["act"], name="relu"),
             helper.make_node("MatMul", ["act", "w2"], ["o"]),
             helper.make_node("ReduceMean", ["o"], ["logits"], axes=[1], keepdims=0)]
    return inferred(model(nodes, [tensor("w1", [8, 10]), tensor("w2", [10, 5])], inputs,
                          opset=17))


def features() -> onnx.ModelProto:
    """[N, 8] -> Gemm -> Tanh -> Gemm: the Tanh is [N, 6], units on axis 1."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Tanh", ["h"], ["act"], name="tanh"),
             helper.make_node("Gemm", ["act", "w2"], ["logits"], transB=1)]
    return inferred(model(nodes, [tensor("w1", [6, 8]), tensor("b1", [6]),
                                  tensor("w2", [5, 6])], inputs))


def nchw() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c"], ["act"], name="relu")]
    hn, hi = head("act", 4)
    return inferred(model(nodes + hn, [tensor("w", [4, 3, 1, 1]), *hi]))


@pytest.mark.parametrize(("build", "expected"), [
    (nchw, ("act", 4, 4, 1)), (nhwc_block, ("act", 12, 4, 3)),
    (token_mlp, ("act", 10, 3, 2)), (features, ("act", 6, 2, 1))])
def test_feature_axis_per_layout(build, expected):
    found = discover(build())
    assert [(la.name, la.channels, la.rank, la.axis) for la in found.layers] == [expected]
    assert not found.skipped and not found.gates


def test_undecided_axes_are_skipped_with_a_finding():
    # a Relu on the image read only by a Reshape: nothing says which axis holds channels
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 6, 8])]
    nodes = [helper.make_node("Relu", ["image"], ["lost"], name="relu_lost"),
             helper.make_node("Reshape", ["lost", "shape"], ["flat"]),
             # a second Relu read by a Conv (axis 1) and a MatMul with a weight (axis 2):
             # two axes disagree, so neither is taken
             helper.make_node("Relu", ["image"], ["torn"], name="relu_torn"),
             helper.make_node("Conv", ["torn", "cw"], ["c"], kernel_shape=[1]),
             helper.make_node("MatMul", ["torn", "mw"], ["m"]),
             helper.make_node("ReduceMean", ["c"], ["cm"], axes=[2], keepdims=0),
             helper.make_node("ReduceMean", ["m"], ["mm"], axes=[1], keepdims=0),
             helper.make_node("Concat", ["cm", "mm", "flat"], ["cat"], axis=1),
             helper.make_node("Gemm", ["cat", "fw"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(np.array([0, 48], np.int64), "shape"),
             tensor("cw", [3, 6, 1]), tensor("mw", [8, 2]), tensor("fw", [5, 53])]
    found = discover(inferred(model(nodes, inits, inputs)))
    assert found.layers == []
    assert [(s.name, s.reason) for s in found.skipped] == [("lost", AXIS_UNDECIDED),
                                                          ("torn", AXIS_UNDECIDED)]
    findings = discovery_findings(found)
    assert [(f.rule_id, f.location) for f in findings] == [("SS209", "relu_lost"),
                                                          ("SS209", "relu_torn")]


def test_inspect_shows_the_axis_and_the_undecided_layer(run_cli, tmp_path):
    path = save(nhwc_block(), tmp_path / "nhwc.onnx")
    out = run_cli("inspect", path)
    assert out.code == 0
    assert "3 of [N,H,W,C]" in out.out and "1 activation layers, 12 channels" in out.out
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 6, 8])]
    nodes = [helper.make_node("Relu", ["image"], ["lost"], name="relu_lost"),
             helper.make_node("Reshape", ["lost", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fw"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(np.array([0, 48], np.int64), "shape"),
             tensor("fw", [5, 48])]
    path = save(inferred(model(nodes, inits, inputs)), tmp_path / "lost.onnx")
    out = run_cli("inspect", path)
    assert out.code == 3  # nothing left to scan
    assert "SS209 low: activation 'lost' (Relu) not scanned" in out.out


def _with_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


@pytest.mark.parametrize("build", [nhwc_block, token_mlp, features, nchw])
def test_masks_broadcast_on_the_feature_axis(build):
    proto = build()
    layer = discover(proto).layers[0]
    spec = mask_inputs(proto, [layer])[0]
    expected_shape = [1] * layer.rank
    expected_shape[0], expected_shape[layer.axis] = 3, layer.channels
    assert spec.shape(3) == tuple(expected_shape)
    image = proto.graph.input[0]
    dims = [d.dim_value or 3 for d in image.type.tensor_type.shape.dim]
    x = RNG.standard_normal(dims).astype(np.float32)
    probe = _with_output(proto, layer.name)
    plain = run_model(probe, {image.name: x})
    masked = MaskedModel(probe, [layer])
    assert np.allclose(masked.run_ones(x), plain["logits"], atol=1e-6)
    # zero channel 2 on the layer's axis: the layer output (a graph output, so the gated
    # tensor takes its name) is 0 there and unchanged elsewhere
    mask = np.ones((3, layer.channels), np.float32)
    mask[:, 2] = 0
    feeds = {image.name: x, spec.input_name: spec.feed(mask)}
    act = run_model(insert_masks(probe, [layer]), feeds)[layer.name]
    want = np.moveaxis(plain[layer.name].copy(), layer.axis, -1)
    want[..., 2] = 0
    assert np.array_equal(act, np.moveaxis(want, -1, layer.axis))


def test_zeroing_a_token_unit_matches_numpy():
    proto = token_mlp()
    w1, w2 = (numpy_helper.to_array(t) for t in proto.graph.initializer)
    x = RNG.standard_normal((4, 6, 8)).astype(np.float32)
    layer = discover(proto).layers[0]
    mask = np.ones((4, 10), np.float32)
    mask[:, 7] = 0
    logits = MaskedModel(proto, [layer]).run(x, [mask])
    hidden = np.maximum(x @ w1, 0)
    hidden[..., 7] = 0
    assert np.allclose(logits, (hidden @ w2).mean(1), atol=1e-5)


@pytest.mark.parametrize("build", [nhwc_block, token_mlp])
def test_export_folds_a_channels_last_unit_into_the_matmul(build):
    proto = build()
    layer = discover(proto).layers[0]
    repaired = sanitize(proto, {layer.name: [0, 5]})  # verify: equals the masked engine
    assert [e["method"] for e in export_edits(repaired)] == ["folded-matmul"]
    assert [i.name for i in repaired.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in repaired.graph.output] == [o.name for o in proto.graph.output]
    image = proto.graph.input[0]
    dims = [d.dim_value or 5 for d in image.type.tensor_type.shape.dim]
    x = RNG.standard_normal(dims).astype(np.float32)
    assert verify_sanitized(proto, repaired, {layer.name: [0, 5]}, x) <= 1e-5
    act = run_model(_with_output(repaired, layer.name), {image.name: x})[layer.name]
    assert np.abs(np.take(act, [0, 5], axis=layer.axis)).max() == 0.0
    assert np.abs(np.take(act, [1, 2], axis=layer.axis)).max() > 0.0


def test_export_masks_a_channels_last_unit_it_cannot_fold():
    # the Relu's input is also read by a second branch: folding would change that branch,
    # so export gates the Relu with a constant [1, 1, 1, 12] mask
    proto = nhwc_block(side=True)
    layer = discover(proto).layers[0]
    repaired = sanitize(proto, {layer.name: [3]})
    assert [e["method"] for e in export_edits(repaired)] == ["mask"]
    mask = next(t for t in repaired.graph.initializer if t.name.endswith("__prune_mask"))
    assert list(mask.dims) == [1, 1, 1, 12]


def se_block() -> onnx.ModelProto:
    """timm EfficientNet's squeeze-excitation: Conv -> SiLU -> x * Sigmoid(Conv(Relu(Conv(
    GlobalAveragePool(x))))) -> Conv -> head."""
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["c"], ["cs"]),
             helper.make_node("Mul", ["c", "cs"], ["x"], name="silu"),
             helper.make_node("GlobalAveragePool", ["x"], ["pool"]),
             helper.make_node("Conv", ["pool", "wr"], ["r"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["r"], ["rr"], name="se_relu"),
             helper.make_node("Conv", ["rr", "we"], ["e"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["e"], ["gate"], name="se_gate"),
             helper.make_node("Mul", ["x", "gate"], ["gated"], name="se_mul"),
             helper.make_node("Conv", ["gated", "wp"], ["p"], kernel_shape=[1, 1])]
    hn, hi = head("p", 4)
    return inferred(model(nodes + hn, [tensor("w", [6, 3, 1, 1]), tensor("wr", [2, 6, 1, 1]),
                                       tensor("we", [6, 2, 1, 1]), tensor("wp", [4, 6, 1, 1]),
                                       *hi]))


def test_a_squeeze_excitation_gate_is_not_a_layer_and_zeroing_its_channel_zeroes_it():
    proto = se_block()
    found = discover(proto)
    assert [(la.name, la.op, la.channels) for la in found.layers] == [("x", "SiLU", 6),
                                                                       ("rr", "Relu", 2)]
    assert [(g.name, g.reason) for g in found.gates] == [("gate", "gate of x")]
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    probe = _with_output(proto, "gated")
    silu = found.layers[0]
    spec = mask_inputs(probe, [silu])[0]
    mask = np.ones((2, 6), np.float32)
    mask[:, 4] = 0
    gated = run_model(insert_masks(probe, [silu]), {"image": x, spec.input_name:
                                                    spec.feed(mask)})["gated"]
    assert np.abs(gated[:, 4]).max() == 0.0 and np.abs(gated[:, 3]).max() > 0.0
    repaired = sanitize(proto, {"x": [4]})
    assert [e["method"] for e in export_edits(repaired)] == ["folded-conv"]
    gated = run_model(_with_output(repaired, "gated"), {"image": x})["gated"]
    assert np.abs(gated[:, 4]).max() == 0.0


@pytest.mark.parametrize(("name", "layers", "axis", "channels"), [
    ("convnext_tiny10", 4, 3, 192), ("vit_tiny10", 2, 2, 64)])
def test_timm_fixtures(name, layers, axis, channels):
    loaded = load_model(MODELS / f"{name}.onnx")
    found = discover(loaded.analysed)
    assert not found.skipped
    gelus = [la for la in found.layers if la.op == "GELU"]
    assert len(gelus) == layers and {la.axis for la in gelus} == {axis}
    assert sum(la.channels for la in gelus) == channels
    x = RNG.random((2, 1, 32, 32), dtype=np.float32)
    plain = run_model(loaded.proto, {"image": x})["logits"]
    assert np.allclose(MaskedModel(loaded.proto, found.layers).run_ones(x), plain, atol=1e-5)
    zeroed = {la.name: [1, 6] for la in gelus}
    repaired = sanitize(loaded.proto, zeroed)
    assert {e["method"] for e in export_edits(repaired)} == {"folded-matmul"}
    assert verify_sanitized(loaded.proto, repaired, zeroed, x) <= 1e-5
    assert [o.name for o in repaired.graph.output] == ["logits"]


def test_attention_heads_are_players_masked_before_the_output_projection():
    loaded = load_model(MODELS / "vit_tiny10.onnx")
    heads = [la for la in discover(loaded.analysed).layers if la.op == "AttentionHeads"]
    assert [(la.channels, la.rank, la.axis) for la in heads] == [(2, 4, 1), (2, 4, 1)]
    # the projection's input: the heads joined to [N, T, 16], head h in columns 8h..8h+7
    proj = next(n for n in loaded.proto.graph.node
                if n.op_type == "MatMul" and "blocks.0/attn/proj" in n.name)
    x = RNG.random((2, 1, 32, 32), dtype=np.float32)
    repaired = sanitize(loaded.proto, {heads[0].name: [1]})
    assert [e["method"] for e in export_edits(repaired)] == ["mask"]
    name = proj.input[0]
    joined = run_model(_with_output(repaired, name), {"image": x})[name]
    plain = run_model(_with_output(loaded.proto, name), {"image": x})[name]
    assert np.abs(joined[..., 8:]).max() == 0.0
    assert np.array_equal(joined[..., :8], plain[..., :8])


def test_a_weight_behind_transpose_still_votes():
    # tf2onnx and others feed a MatMul its weight through a Transpose of an initializer
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", 6, 8])]
    nodes = [helper.make_node("Transpose", ["w1t"], ["w1"], perm=[1, 0]),
             helper.make_node("MatMul", ["tokens", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["act"], name="relu"),
             helper.make_node("Identity", ["w2i"], ["w2"]),
             helper.make_node("MatMul", ["act", "w2"], ["o"]),
             helper.make_node("ReduceMean", ["o"], ["logits"], axes=[1], keepdims=0)]
    proto = inferred(model(nodes, [tensor("w1t", [10, 8]), tensor("w2i", [10, 5])], inputs))
    assert [(la.channels, la.axis) for la in discover(proto).layers] == [(10, 2)]


@pytest.mark.parametrize("name", ["convnext_tiny10", "vit_tiny10"])
def test_prefix_cached_coalitions_match_the_full_masked_model(name):
    # Shapley runs coalitions through the prefix cache: channels-last, token and head masks
    # must give there what the full masked model gives
    from scanner.graph.prefix import CoalitionEvaluator

    loaded = load_model(MODELS / f"{name}.onnx")
    layers = discover(loaded.analysed).layers
    x = RNG.random((3, 1, 32, 32), dtype=np.float32)
    n = sum(la.channels for la in layers)
    coalitions = (np.random.default_rng(1).random((4, n)) > 0.3).astype(np.float32)
    cached = CoalitionEvaluator(loaded.proto, layers, x).logits(coalitions)  # [4, 3, classes]
    full = MaskedModel(loaded.proto, layers)
    for c, row in enumerate(coalitions):
        want = full.run_flat(x, np.repeat(row[None], len(x), axis=0))
        assert np.allclose(cached[c], want, atol=1e-5)
