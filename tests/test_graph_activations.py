"""Activation discovery on hand-built graphs and on the sample zoo."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, zoo_entries
from graph_builders import head, model, tensor
from onnx import TensorProto, helper, numpy_helper

from scanner.graph.activations import (
    ACTIVATION_OPS,
    activation_maps_zero,
    discover_activations,
)
from scanner.graph.compare import run_model
from scanner.graph.export import sanitize
from scanner.graph.load import load_model

ZOO = zoo_entries()
# Activation channels per architecture (make_zoo.py: count_channels).
EXPECTED_CHANNELS = {"cnn": 416, "resnet": 1136, "silunet": 304}
EXPECTED_OPS = {"cnn": {"Relu"}, "resnet": {"Relu"}, "silunet": {"SiLU", "HardSwish"}}


def inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def act_node(op: str, src: str, out: str) -> tuple[list[onnx.NodeProto], list]:
    if op == "PRelu":
        return [helper.make_node(op, [src, "slope"], [out], name=out)], \
            [numpy_helper.from_array(np.full((4, 1, 1), 0.1, np.float32), "slope")]
    if op == "Clip":
        return [helper.make_node(op, [src, "lo", "hi"], [out], name=out)], \
            [numpy_helper.from_array(np.float32(0), "lo"),
             numpy_helper.from_array(np.float32(6), "hi")]
    return [helper.make_node(op, [src], [out], name=out)], []


@pytest.mark.parametrize("op", sorted(ACTIVATION_OPS))
def test_each_activation_op_on_feature_maps(op):
    conv = helper.make_node("Conv", ["image", "w"], ["c"], name="conv", kernel_shape=[1, 1])
    nodes, inits = act_node(op, "c", "a")
    hn, hi = head("a", 4)
    opset = 20 if op == "Gelu" else 17
    proto = inferred(model([conv, *nodes, *hn], [tensor("w", [4, 3, 1, 1]), *inits, *hi],
                           opset=opset))
    layers = discover_activations(proto)
    assert [(la.name, la.op, la.channels, la.rank) for la in layers] == [("a", op, 4, 4)]


def test_rank2_features_and_topological_order():
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
             helper.make_node("Gemm", ["t", "w2"], ["logits"], name="fc2", transB=1)]
    proto = inferred(model(nodes, [tensor("w", [4, 3, 1, 1]), tensor("w1", [6, 4]),
                                   tensor("w2", [5, 6])]))
    layers = discover_activations(proto)
    assert [(la.name, la.channels, la.rank) for la in layers] == [("r", 4, 4), ("t", 6, 2)]


@pytest.mark.parametrize("swap", [False, True])
def test_silu_pattern_is_one_layer_and_hides_its_sigmoid(swap):
    operands = ["s", "c"] if swap else ["c", "s"]
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Mul", operands, ["silu"], name="mul")]
    hn, hi = head("silu", 4)
    proto = inferred(model(nodes + hn, [tensor("w", [4, 3, 1, 1]), *hi]))
    layers = discover_activations(proto)
    assert [(la.name, la.op, la.node) for la in layers] == [("silu", "SiLU", "mul")]


def test_sigmoid_gate_of_another_tensor_is_a_sigmoid_layer():
    # Mul(y, Sigmoid(x)) with y != x is a gate, not SiLU: the Sigmoid is its own layer
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["image", "w2"], ["d"], name="conv2", kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Mul", ["d", "s"], ["m"], name="mul")]
    hn, hi = head("m", 4)
    proto = inferred(model(nodes + hn, [tensor("w", [4, 3, 1, 1]), tensor("w2", [4, 3, 1, 1]),
                                        *hi]))
    assert [(la.name, la.op) for la in discover_activations(proto)] == [("s", "Sigmoid")]


def _gelu_nodes(x: str, out: str, form: str) -> list[onnx.NodeProto]:
    """Gelu as torch exports it below opset 20: tanh form (approximate="tanh") or erf form."""
    def const(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.array(value, np.float32)))
    if form == "tanh":
        nodes = [helper.make_node("Mul", [x, x], ["sq"]),
                 helper.make_node("Mul", [x, "sq"], ["cu"]),
                 const("k", 0.044715), helper.make_node("Mul", ["k", "cu"], ["kc"]),
                 helper.make_node("Add", [x, "kc"], ["inner"]), const("r", 0.7978845),
                 helper.make_node("Mul", ["r", "inner"], ["arg"]),
                 helper.make_node("Tanh", ["arg"], ["gate"], name="tanh")]
    else:
        nodes = [const("r", 1.4142135), helper.make_node("Div", [x, "r"], ["arg"]),
                 helper.make_node("Erf", ["arg"], ["gate"], name="erf")]
    return nodes + [const("one", 1.0), helper.make_node("Add", ["one", "gate"], ["one_plus"]),
                    helper.make_node("Mul", [x, "one_plus"], [f"{out}_x"], name="gelu"),
                    const("half", 0.5), helper.make_node("Mul", ["half", f"{out}_x"], [out])]


@pytest.mark.parametrize("form", ["tanh", "erf"])
def test_decomposed_gelu_is_one_layer_whose_zeroed_channels_are_zero(form):
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", kernel_shape=[1, 1])]
    gelu = _gelu_nodes("c", "act", form)
    hn, hi = head("act", 4)
    proto = inferred(model(nodes + gelu + hn, [tensor("w", [4, 3, 1, 1]), *hi]))
    layers = discover_activations(proto)
    # the Mul that makes x * (1 + gate): not the inner Tanh, whose zero would leave x / 2
    assert [(la.name, la.op, la.node) for la in layers] == [("act_x", "GELU", "gelu")]
    sanitized = sanitize(proto, {"act_x": [0, 2]})
    sanitized.graph.output.append(helper.make_tensor_value_info("act", TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    act = run_model(sanitized, {"image": x})["act"]
    assert np.abs(act[:, [0, 2]]).max() == 0.0  # zeroed channels: exactly 0
    assert (np.abs(act[:, [1, 3]]).mean(axis=(0, 2, 3)) > 0.05).all()  # the others live


def test_unknown_channel_count_is_skipped_with_a_debug_log(caplog):
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", "C", 8, 8])]
    nodes = [helper.make_node("Relu", ["image"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["logits"], name="flat")]
    proto = model(nodes, [], inputs=inputs)
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "C"
    with caplog.at_level(logging.DEBUG, logger="scanner.graph.activations"):
        assert discover_activations(inferred(proto)) == []
    assert "channel count unknown" in caplog.text


def test_activation_maps_zero_table():
    zero = {"Relu", "LeakyRelu", "PRelu", "Clip", "HardSwish", "Tanh", "Elu", "Selu", "Gelu",
            "SiLU", "GELU"}
    for op in ACTIVATION_OPS | {"SiLU", "GELU"}:
        assert activation_maps_zero(op) is (op in zero), op
    assert not activation_maps_zero("Sigmoid")
    assert not activation_maps_zero("Softplus")


@pytest.mark.parametrize("entry", ZOO, ids=[e["name"] for e in ZOO])
def test_zoo_discovery_counts(entry):
    loaded = load_model(SAMPLES / entry["model"])
    layers = discover_activations(loaded.proto)
    assert sum(la.channels for la in layers) == EXPECTED_CHANNELS[entry["arch"]]
    assert sum(la.channels for la in layers) == entry["channels"]
    assert {la.op for la in layers} == EXPECTED_OPS[entry["arch"]]
    assert all(la.rank in (2, 4) for la in layers)


def test_layers_after_a_runtime_reshape_get_their_channels_from_a_probe_run():
    # a ShuffleNet channel shuffle: the Reshape targets are computed from Shape at run
    # time, so shape inference loses the channel dim of the Relu after it
    def runtime_shape(name: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Shape", ["c"], [f"{name}_s"]),
                helper.make_node("Slice", [f"{name}_s", "zero", "one"], [f"{name}_n"]),
                helper.make_node("Concat", [f"{name}_n", f"{name}_tail"], [name], axis=0)]
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], kernel_shape=[1, 1]),
             *runtime_shape("t1"),
             helper.make_node("Reshape", ["c", "t1"], ["g"]),
             helper.make_node("Transpose", ["g"], ["gt"], perm=[0, 2, 1, 3, 4]),
             *runtime_shape("t2"),
             helper.make_node("Reshape", ["gt", "t2"], ["shuffled"]),
             helper.make_node("Relu", ["shuffled"], ["r"], name="relu")]
    hn, hi = head("r", 4)
    inits = [tensor("w", [4, 3, 1, 1]), *hi,
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([2, 2, 8, 8], np.int64), "t1_tail"),
             numpy_helper.from_array(np.array([4, 8, 8], np.int64), "t2_tail")]
    proto = inferred(model(nodes + hn, inits))
    value = {v.name: v for v in proto.graph.value_info}.get("r")
    assert value is None or not value.type.tensor_type.shape.dim[1].HasField("dim_value")
    assert [(la.name, la.channels) for la in discover_activations(proto)] == [("r", 4)]
