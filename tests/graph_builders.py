"""Small ONNX models built with onnx.helper for the graph-engine tests."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tensor(name: str, shape: Sequence[int], scale: float = 0.5) -> onnx.TensorProto:
    """Random weights seeded by the name: the same model whatever the tests ran before."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                   name)


def model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
          inputs: list[onnx.ValueInfoProto] | None = None, output: str = "logits",
          opset: int = 17, classes: int = 5, extra_opsets: Sequence[tuple[str, int]] = ()
          ) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                      ["N", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    return proto


def head(src: str, channels: int, classes: int = 5, out: str = "logits"
         ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """GlobalAveragePool -> Flatten -> Gemm from a [N, C, H, W] tensor to logits."""
    nodes = [helper.make_node("GlobalAveragePool", [src], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [out], name="fc", transB=1)]
    return nodes, [tensor("fc_w", [classes, channels]), tensor("fc_b", [classes])]


def conv_relu_model(opset: int = 17) -> onnx.ModelProto:
    """image -> Conv(3->4) -> Relu -> head: one activation layer of 4 channels."""
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1] * 4,
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    hn, hi = head("r", 4)
    return model(nodes + hn, [tensor("w", [4, 3, 3, 3]), tensor("b", [4])] + hi, opset=opset)


def save(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path
