"""Mask insertion, the full masked model and the prefix-cached coalition evaluator."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, SAMPLES, zoo_entries
from graph_builders import conv_relu_model, head, model, tensor
from onnx import helper, numpy_helper

from scanner.data import load_images, resolve_preprocess
from scanner.graph.activations import discover_activations
from scanner.graph.export import sanitize
from scanner.graph.load import load_model
from scanner.graph.mask import MaskedModel, insert_masks, mask_inputs
from scanner.graph.prefix import CoalitionEvaluator, split_at_masks
from scanner.runtime import make_session

ZOO = zoo_entries()
ATOL = 1e-5


def inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def residual_model() -> onnx.ModelProto:
    """conv1 -> relu1 -> conv2 -> (+ relu1) -> relu2 -> head; relu1 feeds two consumers."""
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3],
                              pads=[1] * 4),
             helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2")]
    hn, hi = head("r2", 4)
    return inferred(model(nodes + hn, [tensor("w1", [4, 3, 1, 1]), tensor("w2", [4, 4, 3, 3]),
                                       *hi]))


def images(n: int, shape=(3, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def plain(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(proto).run(None, {"image": x})[0]


def test_insert_masks_copies_and_rewires_every_consumer():
    proto = residual_model()
    before = proto.SerializeToString()
    layers = discover_activations(proto)
    masked = insert_masks(proto, layers)
    assert proto.SerializeToString() == before, "the caller's model was modified"
    onnx.checker.check_model(masked, full_check=True)
    assert [o.name for o in masked.graph.output] == ["logits"]
    specs = mask_inputs(proto, layers)
    names = [i.name for i in masked.graph.input]
    assert names == ["image", *[s.input_name for s in specs]]
    # r1 is read by conv2 and add: both must read the masked tensor now
    readers = [n.name for n in masked.graph.node if "r1" in n.input]
    assert readers == ["r1_masked/Mul"]
    dims = [d.dim_param or d.dim_value for d in masked.graph.input[1].type.tensor_type.shape.dim]
    assert dims == ["N", 4, 1, 1]


def test_mask_moves_past_sole_consumer_pooling_only():
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["c2"], ["s"], name="sig"),
             helper.make_node("MaxPool", ["s"], ["p2"], name="pool2", kernel_shape=[2, 2]),
             helper.make_node("Add", ["s", "s"], ["d"], name="double")]
    hn, hi = head("d", 4)
    proto = inferred(model(nodes + hn, [tensor("w", [4, 3, 1, 1]), tensor("w2", [4, 4, 1, 1]),
                                        *hi]))
    layers = discover_activations(proto)
    specs = mask_inputs(proto, layers)
    assert [(s.layer.name, s.gated) for s in specs] == [("r", "p"), ("s", "s")]
    x = images(3)
    mm = MaskedModel(proto, layers)
    np.testing.assert_array_equal(mm.run_ones(x), plain(proto, x))
    rng = np.random.default_rng(5)
    masks = [rng.random((3, 4)).astype(np.float32) > 0.5 for _ in layers]
    # the same zeros applied right after the activations (export: folded / constant Mul)
    zeroed = {la.name: [1, 2] for la in layers}
    fixed = [np.tile(np.isin(np.arange(4), [1, 2], invert=True), (3, 1)) for _ in layers]
    np.testing.assert_allclose(mm.run(x, fixed), plain(sanitize(proto, zeroed), x),
                               atol=1e-6, rtol=0)
    assert mm.run(x, masks).shape == (3, 5)
    with pytest.raises(ValueError):
        CoalitionEvaluator(proto, layers, x).logits(-np.ones((1, 8)))


def test_all_ones_and_zeroed_channels_on_a_residual_graph():
    proto = residual_model()
    layers = discover_activations(proto)
    x = images(5)
    mm = MaskedModel(proto, layers)
    np.testing.assert_allclose(mm.run_ones(x), plain(proto, x), atol=1e-6, rtol=0)
    # zeroing every channel of the last layer leaves only the classifier bias
    masks = [np.ones((5, 4), np.float32), np.zeros((5, 4), np.float32)]
    bias = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer
                                           if t.name == "fc_b"))
    np.testing.assert_allclose(mm.run(x, masks), np.broadcast_to(bias, (5, 5)), atol=1e-6)


def test_activation_that_is_a_graph_output_keeps_the_output_name():
    nodes = [helper.make_node("Flatten", ["image"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["h"], name="fc", transB=1),
             helper.make_node("Relu", ["h"], ["logits"], name="relu")]
    proto = inferred(model(nodes, [tensor("w", [5, 192])]))
    layers = discover_activations(proto)
    assert [la.name for la in layers] == ["logits"]
    mm = MaskedModel(proto, layers)
    assert [o.name for o in mm.proto.graph.output] == ["logits"]
    x = images(3)
    np.testing.assert_array_equal(mm.run_ones(x), plain(proto, x))
    mask = np.ones((3, 5), np.float32)
    mask[:, 2] = 0
    out = mm.run(x, [mask])
    assert np.all(out[:, 2] == 0)
    np.testing.assert_array_equal(np.delete(out, 2, 1), np.delete(plain(proto, x), 2, 1))


def test_split_puts_mask_independent_nodes_in_the_prefix():
    proto = residual_model()
    layers = discover_activations(proto)
    last = layers[1:]
    masked = insert_masks(proto, last)
    split = split_at_masks(masked, [s.input_name for s in mask_inputs(proto, last)], "logits")
    # relu2's only reader is GlobalAveragePool, which commutes with the mask: the cut (and
    # the cache) is the pooled [N, 4, 1, 1] tensor
    assert split.cut == ("gap",)
    assert {n.name for n in split.prefix.graph.node} == {"conv1", "relu1", "conv2", "add",
                                                         "relu2", "gap"}
    assert {n.op_type for n in split.suffix.graph.node} == {"Gather", "Mul", "Flatten", "Gemm"}
    assert [i.name for i in split.suffix.graph.input][:2] == ["gap__cached",
                                                             "shapscan_image_index"]
    first = split_at_masks(insert_masks(proto, layers),
                           [s.input_name for s in mask_inputs(proto, layers)], "logits")
    assert first.cut == ("r1",)  # the residual branch reads r1 after its mask


@pytest.mark.parametrize("which", ["all", "last"])
def test_evaluator_prefix_equals_full_on_a_residual_graph(which):
    proto = residual_model()
    layers = discover_activations(proto)
    layers = layers if which == "all" else layers[-1:]
    x = images(3)
    fast = CoalitionEvaluator(proto, layers, x, max_batch_rows=4)
    full = CoalitionEvaluator(proto, layers, x, max_batch_rows=4, prefix_cache=False)
    coalitions = (np.random.default_rng(1).random((7, fast.n_channels)) > 0.4)
    a, b = fast.logits(coalitions), full.logits(coalitions)
    assert a.shape == (7, 3, 5)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    rows = MaskedModel(proto, layers).run_flat(np.tile(x, (7, 1, 1, 1)),
                                               np.repeat(coalitions, 3, axis=0))
    np.testing.assert_allclose(a.reshape(21, 5), rows, atol=ATOL, rtol=0)
    assert fast.forward_passes == full.forward_passes == 21
    np.testing.assert_allclose(fast.logits(np.ones(fast.n_channels))[0], plain(proto, x),
                               atol=1e-6, rtol=0)


def test_evaluator_channel_indexing_and_soft_masks():
    proto = residual_model()
    layers = discover_activations(proto)
    ev = CoalitionEvaluator(proto, layers, images(2))
    assert ev.n_channels == 8
    assert ev.channel(0) == (layers[0], 0)
    assert ev.channel(5) == (layers[1], 1)
    assert ev.flat_index(layers[1].name, 1) == 5
    with pytest.raises(IndexError):
        ev.channel(8)
    half = ev.logits(np.full((1, 8), 0.5))
    assert np.isfinite(half).all()
    other = ev.with_images(images(4, seed=3))
    assert other.logits(np.ones((2, 8))).shape == (2, 4, 5)


def test_evaluator_on_a_fixed_batch_model_pads_the_last_chunk():
    proto = conv_relu_model()
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 2
    proto = inferred(proto)
    layers = discover_activations(proto)
    x = images(3)
    ev = CoalitionEvaluator(proto, layers, x)
    full = CoalitionEvaluator(proto, layers, x, prefix_cache=False)
    coalitions = np.random.default_rng(2).random((3, 4)) > 0.5
    np.testing.assert_allclose(ev.logits(coalitions), full.logits(coalitions), atol=ATOL)


def zoo_images(entry: dict, n: int) -> tuple[object, np.ndarray]:
    loaded = load_model(SAMPLES / entry["model"])
    name, shape = loaded.image_input()
    prep = resolve_preprocess(loaded.path, loaded.metadata, shape)
    pixels = load_images(FEWSHOT, prep).pixels[:n]
    return loaded, prep.to_model(pixels)


@pytest.mark.parametrize("entry", ZOO, ids=[e["name"] for e in ZOO])
def test_zoo_all_ones_masks_reproduce_the_model(entry):
    loaded, x = zoo_images(entry, 4)
    name, _ = loaded.image_input()
    layers = discover_activations(loaded.proto)
    expected = make_session(loaded.proto).run(None, {name: x})[0]
    got = MaskedModel(loaded.proto, layers).run_ones(x)
    # 1e-6 relative to the logit: the masked graph's extra Muls change ORT's float32
    # fusion order; on the trained ResNet (logits ~10) that moves the last bits (2.4e-6)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("entry", ZOO, ids=[e["name"] for e in ZOO])
def test_zoo_prefix_cached_equals_full_masked(entry):
    loaded, x = zoo_images(entry, 3)
    layers = discover_activations(loaded.proto)
    rng = np.random.default_rng(0)
    for selected in (layers, layers[2 * len(layers) // 3:]):
        fast = CoalitionEvaluator(loaded.proto, selected, x, max_batch_rows=8)
        full = CoalitionEvaluator(loaded.proto, selected, x, prefix_cache=False)
        coalitions = rng.random((4, fast.n_channels)) > 0.2
        np.testing.assert_allclose(fast.logits(coalitions), full.logits(coalitions),
                                   atol=ATOL, rtol=0)


def test_cut_that_reads_the_image_input_directly():
    nodes = [helper.make_node("Relu", ["image"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "image"], ["s"], name="add")]
    hn, hi = head("s", 3)
    proto = inferred(model(nodes + hn, hi))
    layers = discover_activations(proto)
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    fast = CoalitionEvaluator(proto, layers, x)
    full = CoalitionEvaluator(proto, layers, x, prefix_cache=False)
    assert set(fast._engine.split.cut) == {"r", "image"}
    coalitions = np.random.default_rng(1).random((4, 3)) > 0.5
    np.testing.assert_allclose(fast.logits(coalitions), full.logits(coalitions), atol=ATOL)


def test_float16_model_gets_float16_masks():
    proto = conv_relu_model()
    for init in proto.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                              init.name))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    proto = inferred(proto)
    layers = discover_activations(proto)
    assert mask_inputs(proto, layers)[0].dtype == np.float16
    x = images(2).astype(np.float16)
    ev = CoalitionEvaluator(proto, layers, x)
    out = ev.logits(np.ones((1, 4)))
    assert out.dtype == np.float16
    # float16 kernels differ by fusion: an ulp at these magnitudes is ~1e-4
    np.testing.assert_allclose(out[0].astype(np.float32), plain(proto, x).astype(np.float32),
                               atol=5e-4, rtol=0)


def test_cut_keeps_constants_and_shape_tensors_out_of_the_cache():
    # Identity(initializer) and Shape(x) are mask-independent but not per-image rows: the
    # suffix must recompute them (a cached Shape(x) would carry the prefix's batch size)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Identity", ["w2"], ["w2_id"], name="w2_identity"),
             helper.make_node("Conv", ["r", "w2_id"], ["c2"], name="conv2", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Shape", ["c2"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="take_n", axis=0),
             helper.make_node("Concat", ["n", "minus_one"], ["flat_shape"], name="cat", axis=0),
             helper.make_node("Reshape", ["r2", "flat_shape"], ["flat"], name="reshape"),
             helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc", transB=1)]
    inits = [tensor("w", [4, 3, 1, 1]), tensor("w2", [4, 4, 1, 1]), tensor("fc_w", [5, 256]),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    proto = inferred(model(nodes, inits))
    layers = discover_activations(proto)
    assert [la.name for la in layers] == ["r", "r2"]
    x = images(3)
    coalitions = np.random.default_rng(3).random((5, 8)) > 0.5
    full = CoalitionEvaluator(proto, layers, x, prefix_cache=False).logits(coalitions)
    for selected, cut in (([layers[0]], ("r",)), ([layers[1]], ("c2", "r2"))):
        fast = CoalitionEvaluator(proto, selected, x, max_batch_rows=7)
        assert fast._engine.split.cut == cut
        reference = CoalitionEvaluator(proto, selected, x, prefix_cache=False)
        part = coalitions[:, :4]
        np.testing.assert_allclose(fast.logits(part), reference.logits(part), atol=ATOL)
    assert full.shape == (5, 3, 5)


def test_a_branch_that_reads_the_image_from_the_outer_scope_is_cut_after_it():
    # If(cond) { then: Identity(image) } else { Neg(image) }: the If has no explicit input
    # but the condition, yet it needs the image; the suffix must get the image before it
    proto = conv_relu_model()
    g = proto.graph
    for node in g.node:
        node.input[:] = ["picked" if i == "image" else i for i in node.input]
    out = helper.make_tensor_value_info("branch", onnx.TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Identity", ["image"], ["branch"])], "then",
                             [], [out])
    other = helper.make_graph([helper.make_node("Neg", ["image"], ["branch"])], "else", [],
                              [out])
    g.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    g.node.insert(0, helper.make_node("If", ["cond"], ["picked"], then_branch=then,
                                      else_branch=other))
    layers = discover_activations(proto)
    x = images(3)
    ev = CoalitionEvaluator(proto, layers, x)
    np.testing.assert_allclose(ev.logits(np.ones(ev.n_channels))[0], plain(proto, x),
                               atol=1e-6, rtol=0)
