"""Walking a model: its graphs (the main graph and every subgraph) and its image input."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graphs(g)


def first_input(proto: onnx.ModelProto) -> onnx.ValueInfoProto | None:
    """The image input: the first graph input that is not an initializer."""
    inits = {i.name for i in proto.graph.initializer}
    return next((i for i in proto.graph.input if i.name not in inits), None)
