"""Prefix caching and the coalition evaluator the Shapley stage calls.

Every node that does not (transitively) read a mask input computes the same tensors for
every coalition. Those nodes form the prefix: it runs once for the K images, and its tensors
that the rest of the graph reads (the cut) are cached. The suffix, the nodes downstream of
the masks, runs per coalition batch with the cached tensors as inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..findings import LayerInfo
from ..runtime import Device, Runner, batches, make_runner
from .mask import MaskSpec, batch_dim, insert_masks, mask_inputs

IMAGE_INDEX = "shapscan_image_index"
CACHED_SUFFIX = "__cached"


@dataclass(frozen=True)
class PrefixSplit:
    """The suffix reads each cut tensor t as Gather(t__cached, shapscan_image_index): the
    cache (K rows) stays put between runs and only the row -> image index and the masks
    change, so on CUDA the cache can live on the device (IOBinding)."""

    prefix: onnx.ModelProto | None  # None when the cut reads only graph inputs
    suffix: onnx.ModelProto | None  # None when the output does not depend on any mask
    cut: tuple[str, ...]  # tensors crossing from prefix to suffix
    output: str

    def cached_input(self, tensor: str) -> str:
        return tensor + CACHED_SUFFIX


def split_at_masks(masked: onnx.ModelProto, masks: Sequence[str], output: str) -> PrefixSplit:
    """Split a masked model into the mask-independent prefix and the mask-dependent suffix.

    The cut holds only batch-major tensors that depend on the images (one row per image:
    they can be cached and gathered per row). Constants (e.g. Identity of an initializer)
    and image-dependent tensors that are not batch-major (e.g. Shape(x) feeding a Reshape:
    its value depends on the batch size) are recomputed in the suffix instead.
    """
    masked = onnx.shape_inference.infer_shapes(masked)  # dtypes and shapes for the cut
    graph = gs.import_onnx(masked)
    graph.toposort()
    tensors = graph.tensors()
    image_inputs = [t for t in graph.inputs if t.name not in masks]
    batch = image_inputs[0].shape[0] if image_inputs and image_inputs[0].shape else None
    dynamic = {t.name for t in image_inputs}
    downstream: set[str] = set(masks)
    for node in graph.nodes:
        names = {t.name for t in _inputs(node, tensors)}
        if names & dynamic:
            dynamic.update(t.name for t in node.outputs)
        if names & downstream:
            downstream.update(t.name for t in node.outputs)
    if output not in downstream:
        return PrefixSplit(_subgraph(masked, [t.name for t in image_inputs], [output],
                                     tensors), None, (), output)
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    stack = [n for n in graph.nodes if any(t.name in downstream for t in _inputs(n, tensors))]
    in_suffix = {id(n) for n in stack}
    cut: set[str] = set()
    while stack:
        node = stack.pop()
        for t in _inputs(node, tensors):
            if not isinstance(t, gs.Variable) or t.name in downstream or t.name in cut:
                continue
            if t.name in dynamic and _batch_major(t, batch):
                cut.add(t.name)
            elif t.inputs and id(t.inputs[0]) not in in_suffix:
                in_suffix.add(id(t.inputs[0]))
                stack.append(t.inputs[0])
    graph_inputs = {t.name for t in image_inputs}
    ordered = sorted(cut, key=lambda n: (n not in graph_inputs,
                                         position.get(id(tensors[n].inputs[0]), -1)
                                         if tensors[n].inputs else -1, n))
    produced = [c for c in ordered if c not in graph_inputs]
    prefix = _subgraph(masked, [t.name for t in image_inputs], produced, tensors) \
        if produced else None
    suffix = _gather_cut(_subgraph(masked, [*ordered, *masks], [output], tensors), ordered)
    return PrefixSplit(prefix, suffix, tuple(ordered), output)


def _inputs(node: gs.Node, tensors: dict[str, gs.Tensor]) -> list[gs.Tensor]:
    """The node's inputs and the outer-scope tensors its subgraphs read (an If branch that
    uses the image): both must be computed, or cut, before the node runs."""
    outer = [tensors[name] for sub in node.subgraphs()
             for name in sub._foreign_tensors() if name in tensors]
    return [*node.inputs, *outer]


def _batch_major(t: gs.Variable, batch: int | str | None) -> bool:
    """Leading dim is the images' batch dim (a fixed batch needs rank >= 2 to tell a
    [b, ...] activation from a shape vector of length b)."""
    if t.shape is None or len(t.shape) == 0 or batch is None:
        return False
    if isinstance(batch, int):
        return len(t.shape) >= 2 and t.shape[0] == batch
    return t.shape[0] == batch


def _gather_cut(suffix: onnx.ModelProto, cut: Sequence[str]) -> onnx.ModelProto:
    graph = gs.import_onnx(suffix)
    tensors = graph.tensors()
    index = gs.Variable(IMAGE_INDEX, dtype=np.int64, shape=["rows"])
    cached_inputs = []
    for name in cut:
        t = tensors[name]
        shape = ["cached_rows", *t.shape[1:]] if t.shape is not None else None
        cached = gs.Variable(name + CACHED_SUFFIX, dtype=t.dtype, shape=shape)
        graph.nodes.append(gs.Node("Gather", name=f"{name}/CacheGather", attrs={"axis": 0},
                                   inputs=[cached, index], outputs=[t]))
        cached_inputs.append(cached)
    graph.inputs = [*cached_inputs, index, *[t for t in graph.inputs if t.name not in cut]]
    graph.toposort()
    out = gs.export_onnx(graph)
    out.ir_version = suffix.ir_version
    del out.opset_import[:]
    out.opset_import.extend(suffix.opset_import)
    return out


def _subgraph(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str],
              reference: dict[str, gs.Tensor]) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for name in [*inputs, *outputs]:
        if tensors[name].dtype is None:
            tensors[name].dtype = reference[name].dtype or np.float32
    graph.inputs = [tensors[n] for n in inputs]
    graph.outputs = [tensors[n] for n in outputs]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    return out


@dataclass
class _Engine:
    """Sessions shared by evaluators over different image sets."""

    masks: list[MaskSpec]
    input_name: str
    output: str
    full: Runner | None
    split: PrefixSplit | None
    prefix: Runner | None
    suffix: Runner | None
    fixed_batch: int | None  # the model's batch dim when it is not dynamic


class CoalitionEvaluator:
    """Logits of the model with channel coalitions switched on, on a fixed set of K images.

    A coalition is a row of `n_channels` values in {0, 1} (floats allowed: a soft mask);
    flat channel index order follows `layers`. One batch row is one (coalition, image) pair.
    """

    def __init__(self, proto: onnx.ModelProto, layers: Sequence[LayerInfo],
                 images: np.ndarray, device: Device | None = None, max_batch_rows: int = 1024,
                 prefix_cache: bool = True, threads: int | None = None):
        if not layers:
            raise ValueError("no layers to mask")
        engine = _build_engine(proto, list(layers), device, prefix_cache, threads)
        self._setup(engine, layers, images, max_batch_rows, prefix_cache)

    def _setup(self, engine: _Engine, layers: Sequence[LayerInfo], images: np.ndarray,
               max_batch_rows: int, prefix_cache: bool) -> None:
        self._engine = engine
        self.layers = list(layers)
        self.offsets = np.cumsum([0] + [layer.channels for layer in self.layers])
        self.n_channels = int(self.offsets[-1])
        self.max_batch_rows = max(1, int(max_batch_rows))
        self.prefix_cache = prefix_cache
        self.forward_passes = 0
        self.images = np.ascontiguousarray(images)
        self._cache = self._run_prefix()
        split, suffix = engine.split, engine.suffix
        # the cached tensors, uploaded once when the suffix runs on CUDA
        self._resident = {split.cached_input(name): suffix.resident(value)
                          for name, value in self._cache.items()} \
            if split is not None and suffix is not None else {}

    def with_images(self, images: np.ndarray) -> CoalitionEvaluator:
        """An evaluator on other images sharing this one's sessions (no rebuild)."""
        other = CoalitionEvaluator.__new__(CoalitionEvaluator)
        other._setup(self._engine, self.layers, images, self.max_batch_rows, self.prefix_cache)
        return other

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def device(self) -> str:
        runner = self._engine.suffix or self._engine.full or self._engine.prefix
        return runner.device if runner else "cpu"

    def channel(self, flat: int) -> tuple[LayerInfo, int]:
        if not 0 <= flat < self.n_channels:
            raise IndexError(f"channel {flat} out of range [0, {self.n_channels})")
        i = int(np.searchsorted(self.offsets, flat, side="right")) - 1
        return self.layers[i], int(flat - self.offsets[i])

    def flat_index(self, layer: str, channel: int) -> int:
        i = next(k for k, info in enumerate(self.layers) if info.name == layer)
        return int(self.offsets[i]) + channel

    def logits(self, coalitions: np.ndarray) -> np.ndarray:
        """[M, n_channels] -> [M, K, classes]."""
        coalitions = np.asarray(coalitions, np.float32)
        if coalitions.ndim == 1:
            coalitions = coalitions[None]
        if coalitions.ndim != 2 or coalitions.shape[1] != self.n_channels:
            raise ValueError(f"coalitions have shape {coalitions.shape}; expected "
                             f"[M, {self.n_channels}]")
        if coalitions.size and coalitions.min() < 0:
            raise ValueError("coalition values must be >= 0 (masks commute with pooling)")
        m, k = len(coalitions), self.n_images
        eng = self._engine
        if eng.split is not None and eng.suffix is None:  # output ignores every mask
            out = np.broadcast_to(self._cache[eng.output], (m, *self._cache[eng.output].shape))
            self.forward_passes += m * k
            return np.array(out)
        cached = eng.split is not None
        runner = eng.suffix if cached else eng.full
        parts = []
        for rows in self._row_chunks(m * k):
            idx = np.arange(rows.start, rows.stop)
            image, coalition = idx % k, idx // k
            if cached:
                feeds = {IMAGE_INDEX: image.astype(np.int64)}
            else:
                feeds = {eng.input_name: self.images[image]}
            for i, spec in enumerate(eng.masks):
                block = coalitions[coalition, self.offsets[i]:self.offsets[i + 1]]
                feeds[spec.input_name] = spec.feed(block)
            parts.append(self._run(runner, feeds, len(idx)))
        self.forward_passes += m * k
        out = np.concatenate(parts)
        return out.reshape(m, k, *out.shape[1:])

    def _row_chunks(self, total: int) -> list[slice]:
        size = self._engine.fixed_batch or self.max_batch_rows
        return list(batches(total, size))

    def _run(self, runner: Runner, feeds: dict[str, np.ndarray], rows: int) -> np.ndarray:
        """Run per-row `feeds` (plus the resident cache); pads a static batch dim."""
        fixed = self._engine.fixed_batch
        if fixed and rows < fixed:  # a static batch dim: pad the last chunk, drop the padding
            feeds = {n: np.concatenate([v, np.repeat(v[:1], fixed - rows, axis=0)])
                     for n, v in feeds.items()}
        return runner.run([self._engine.output], feeds, self._resident)[0][:rows]

    def _run_prefix(self) -> dict[str, np.ndarray]:
        eng = self._engine
        if eng.split is None:
            return {eng.input_name: self.images}
        cache: dict[str, np.ndarray] = {}
        if eng.input_name in eng.split.cut:
            cache[eng.input_name] = self.images
        produced = [c for c in eng.split.cut if c != eng.input_name]
        if eng.suffix is None:
            produced = [eng.output]
        if produced and eng.prefix is not None:
            parts: dict[str, list[np.ndarray]] = {c: [] for c in produced}
            for rows in self._row_chunks(self.n_images):
                feeds = {eng.input_name: self.images[rows]}
                n = rows.stop - rows.start
                fixed = eng.fixed_batch
                if fixed and n < fixed:
                    feeds = {k: np.concatenate([v, np.repeat(v[:1], fixed - n, axis=0)])
                             for k, v in feeds.items()}
                outs = eng.prefix.run(produced, feeds)
                for c, value in zip(produced, outs, strict=True):
                    parts[c].append(value[:n])
            cache.update({c: np.concatenate(v) for c, v in parts.items()})
        return cache


def _build_engine(proto: onnx.ModelProto, layers: list[LayerInfo], device: Device | None,
                  prefix_cache: bool, threads: int | None) -> _Engine:
    masked = insert_masks(proto, layers)
    masks = mask_inputs(proto, layers)
    inits = {i.name for i in proto.graph.initializer}
    input_name = next(i.name for i in proto.graph.input if i.name not in inits)
    output = proto.graph.output[0].name
    fixed = batch_dim(proto)
    fixed_batch = fixed if isinstance(fixed, int) and fixed > 0 else None
    if not prefix_cache:
        return _Engine(masks, input_name, output, make_runner(masked, device, threads), None,
                       None, None, fixed_batch)
    split = split_at_masks(masked, [m.input_name for m in masks], output)
    prefix = make_runner(split.prefix, device, threads) if split.prefix is not None else None
    suffix = make_runner(split.suffix, device, threads) if split.suffix is not None else None
    return _Engine(masks, input_name, output, None, split, prefix, suffix, fixed_batch)
