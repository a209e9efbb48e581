"""Feature-axis inference: on which axis of an activation tensor its channels (units) lie.

NCHW feature maps and [N, C] features carry them on axis 1; channels-last blocks (ConvNeXt
runs Transpose -> LayerNormalization -> MatMul -> GELU -> MatMul) and token tensors
[N, T, D] (a ViT's MLP) on the last axis. The axis is read from the ops that *define* one:
a Conv, pooling or BatchNormalization reads axis 1, a MatMul with a constant weight
contracts the last axis of its left operand and writes its last axis, a Gemm reads and
writes axis 1, a LayerNormalization over one axis normalises that axis. Every such op
reachable from the tensor through ops that keep axes in place (elementwise arithmetic,
other activations, Transpose with its permutation, Concat, Slice, Pad, ...) votes, on the
consumer side and on the producer side; one agreed axis decides. No vote or two different
votes leave the axis undecided, and the layer is skipped rather than guessed.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

# ops whose output keeps the axes (and their order) of their data inputs, right-aligned
# under numpy broadcasting
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Elu", "Selu", "Gelu", "Softplus", "Erf", "Neg", "Abs", "Sqrt", "Exp", "Log",
    "Identity", "Dropout", "Cast", "Reciprocal", "Mish", "ThresholdedRelu", "Celu",
    "Floor", "Ceil", "Round", "Sign", "Softsign",
})
# ops that move data within an axis but keep every axis where it is
SAME_AXES = frozenset({"Concat", "Slice", "Split", "Pad", "Resize", "Upsample", "Tile",
                       "Expand"})
# ops that read (and write) the channel on axis 1, by ONNX's own definition of them
CHANNEL_FIRST = frozenset({"Conv", "ConvTranspose", "BatchNormalization",
                           "InstanceNormalization", "LRN", "MaxPool", "AveragePool",
                           "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
                           "MaxRoiPool", "GroupNormalization"})
MAX_HOPS = 24  # a residual block spans < 10 nodes; farther votes say little about this one

Ranks = Callable[[str], int | None]


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


class AxisVotes:
    """Vote collection over one graph's producer / consumer index."""

    def __init__(self, producer: dict[str, onnx.NodeProto],
                 consumers: dict[str, list[onnx.NodeProto]], rank: Ranks,
                 constants: set[str]):
        self.producer = producer
        self.consumers = consumers
        self.rank = rank
        self.constants = constants  # initializers and Constant outputs

    def feature_axis(self, tensor: str, pre: str | None = None) -> int | None:
        """The agreed feature axis of `tensor` (non-negative), or None when undecided.

        `pre` is the activation's input: its producers vote too (the activation keeps axes).
        """
        rank = self.rank(tensor)
        if rank is None or rank < 2:
            return None
        votes: set[int] = set()
        self._forward(tensor, rank - 1, votes, set(), 0)
        self._backward(pre if pre is not None else tensor, rank, votes, set(), 0)
        votes = {v for v in votes if 0 < v < rank}  # axis 0 is the batch
        return votes.pop() if len(votes) == 1 else None

    # ---- consumers: what reads the tensor defines its axis ----
    def _forward(self, tensor: str, last: int, votes: set[int], seen: set[tuple[str, int]],
                 hops: int) -> None:
        """Votes from the readers of `tensor`, whose rank is last + 1, as axes of it."""
        if hops > MAX_HOPS or (tensor, last) in seen:
            return
        seen.add((tensor, last))
        for node in self.consumers.get(tensor, []):
            if node.domain not in ("", "ai.onnx"):
                continue
            for axis in self._read_axes(node, tensor, last, seen, hops):
                votes.add(axis)

    def _read_axes(self, node: onnx.NodeProto, tensor: str, last: int,
                   seen: set[tuple[str, int]], hops: int) -> list[int]:
        op, rank = node.op_type, last + 1
        if op in CHANNEL_FIRST:
            return [1] if node.input[0] == tensor else []
        if op == "Gemm":
            return [1] if node.input[0] == tensor and not _attr(node, "transA", 0) else []
        if op == "MatMul":
            # a constant right operand is a weight: the left operand's last axis its features
            if node.input[0] == tensor and node.input[1] in self.constants \
                    and self.rank(node.input[1]) == 2:
                return [last]
            return []
        if op == "LayerNormalization":
            axis = _attr(node, "axis", -1) % rank
            return [axis] if node.input[0] == tensor and axis == last else []
        out = node.output[0] if node.output else ""
        out_rank = self.rank(out)
        if out_rank is None:
            return []
        if op == "Transpose":
            perm = [a.ints for a in node.attribute if a.name == "perm"]
            order = list(perm[0]) if perm else list(reversed(range(rank)))
            return [order[v] for v in self._collect(out, out_rank, seen, hops)]
        if op in ELEMENTWISE or op in SAME_AXES:
            if op in SAME_AXES and node.input[0] != tensor and op != "Concat":
                return []  # a Slice's starts, a Pad's pads: not data
            shift = out_rank - rank
            return [v - shift for v in self._collect(out, out_rank, seen, hops) if v >= shift]
        return []  # Reshape, Flatten, Squeeze, reductions...: axes change, no vote

    def _collect(self, tensor: str, rank: int, seen: set[tuple[str, int]], hops: int
                 ) -> set[int]:
        found: set[int] = set()
        self._forward(tensor, rank - 1, found, seen, hops + 1)
        return found

    # ---- producers: what wrote the tensor defines its axis too ----
    def _backward(self, tensor: str, rank: int, votes: set[int], seen: set[str],
                  hops: int) -> None:
        if hops > MAX_HOPS or tensor in seen or tensor in self.constants:
            return
        seen.add(tensor)
        node = self.producer.get(tensor)
        if node is None or node.domain not in ("", "ai.onnx"):
            return
        op = node.op_type
        if op in CHANNEL_FIRST or op == "Gemm":
            votes.add(1)
        elif op == "MatMul":
            if node.input[1] in self.constants and self.rank(node.input[1]) == 2:
                votes.add(rank - 1)
        elif op == "LayerNormalization":
            if _attr(node, "axis", -1) % rank == rank - 1:
                votes.add(rank - 1)
        elif op == "Transpose":
            perm = [a.ints for a in node.attribute if a.name == "perm"]
            order = list(perm[0]) if perm else list(reversed(range(rank)))
            inner: set[int] = set()
            self._backward(node.input[0], rank, inner, seen, hops + 1)
            votes.update(order.index(v) for v in inner if v < rank)
        elif op in ELEMENTWISE or op in SAME_AXES:
            data = [i for i in node.input if i and i not in self.constants]
            if op in SAME_AXES and op != "Concat":
                data = data[:1]
            for name in data:
                in_rank = self.rank(name)
                if in_rank is None:
                    continue
                inner = set()
                self._backward(name, in_rank, inner, seen, hops + 1)
                votes.update(v + rank - in_rank for v in inner)
