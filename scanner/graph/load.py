"""Safe model loading. Every refusal raises ModelRefused with a stable rule id.

Loading is an attack surface: the checks here run on the parsed protobuf *before* onnx or
onnxruntime touch external data or execute anything, in this order: file (SS101, SS112),
op domains (SS102), tensor storage (SS103-SS105), graph structure (SS106, SS107), opset
(SS108/SS109), image input type (SS110), then onnx.checker and strict shape inference
(SS111). The model kept in `LoadedModel.proto` is the shape-inferred one. A float16 or
bfloat16 model then gets its float32 copy (SS113, graph.precision): the first step that runs
the model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, external_data_helper, version_converter

from ..errors import ModelRefused
from ..findings import Finding, LayerInfo, ModelSummary, Severity
from .precision import low_precision, widen
from .quantized import dequantize, is_qdq
from .scores import scores_copy
from .walk import first_input, graphs

log = logging.getLogger(__name__)

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
# ONNX's own training domains: onnxruntime's quant_pre_process imports them unused. Imports
# of them are accepted; a node from them is still refused unless the policy allows it.
IMPORT_ONLY_DOMAINS = frozenset({"ai.onnx.training", "ai.onnx.preview.training"})
MIN_OPSET = 13
TARGET_OPSET = 17
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                         TensorProto.BFLOAT16})
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                "double_data", "uint64_data")
_FOUR_BIT = frozenset(getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
                      if hasattr(TensorProto, n))


@dataclass
class LoadedModel:
    proto: onnx.ModelProto
    path: Path
    sha256: str
    size_bytes: int
    findings: list[Finding] = field(default_factory=list)
    # the float32 copy of a float16 / bfloat16 model (graph.precision) or of an int8 QDQ
    # model (graph.quantized), or a copy whose only output is the class scores (graph.scores):
    # what is analysed
    widened: onnx.ModelProto | None = None
    # what ONNX Runtime runs when set: a copy of `analysed` taking any batch size (graph.batch)
    batch_free: onnx.ModelProto | None = None

    @property
    def analysed(self) -> onnx.ModelProto:
        """The graph every stage reads: `proto`, or its float32 copy."""
        return self.proto if self.widened is None else self.widened

    @property
    def layer_graph(self) -> onnx.ModelProto | None:
        """Where export finds the activation layers when `proto` has none of its own (a QDQ
        model's ReLUs live in its float copy only); None: in `proto`."""
        return self.widened if self.widened is not None and is_qdq(self.proto) else None

    @property
    def runnable(self) -> onnx.ModelProto:
        """The proto sessions run; `proto` stays what reports describe and export edits."""
        return self.analysed if self.batch_free is None else self.batch_free

    @property
    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}

    @property
    def opset(self) -> int:
        return default_opset(self.proto) or 0

    def summary(self, layers: list[LayerInfo]) -> ModelSummary:
        """What reports show of the model: identity, graph inputs/outputs, scanned layers."""
        inits = {i.name for i in self.proto.graph.initializer}
        inputs = [(i.name, value_shape(i)) for i in self.proto.graph.input
                  if i.name not in inits]
        outputs = [(o.name, value_shape(o)) for o in self.proto.graph.output]
        return ModelSummary(str(self.path), self.sha256, self.opset, inputs, outputs, layers,
                            self.size_bytes)

    def image_input(self) -> tuple[str, list[int | str]]:
        """The (name, shape) of the model's image input (the first non-initializer input)."""
        inp = first_input(self.proto)
        if inp is None:
            raise ModelRefused("model has no graph input", rule_id="SS107")
        return inp.name, value_shape(inp)


def refuse(rule_id: str, message: str, location: str | None = None) -> ModelRefused:
    return ModelRefused(f"{rule_id}: {message}", rule_id=rule_id, location=location)


def value_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def default_opset(proto: onnx.ModelProto) -> int | None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def load_model(path: str | Path, *, allowed_domains: Iterable[str] | None = None,
               max_bytes: int | None = None) -> LoadedModel:
    """Parse, vet and shape-infer the model at `path`; raise ModelRefused on any rule."""
    path = Path(path)
    if not path.is_file():
        what = "no such file" if not path.exists() else (
            "a folder, not a model file" if path.is_dir() else "not a regular file")
        raise refuse("SS101", f"{path}: {what}")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise refuse("SS112", f"{path}: {size} bytes exceeds the limit of {max_bytes}")
    raw = path.read_bytes()
    proto = _parse(raw, path)
    findings: list[Finding] = []

    _check_domains(proto, STANDARD_DOMAINS | set(allowed_domains or ()))
    external = _check_tensors(proto, path.parent)
    if max_bytes is not None and size + external > max_bytes:
        raise refuse("SS112", f"{path}: {size + external} bytes with external data exceeds "
                     f"the limit of {max_bytes}")
    if external:
        # Every location was checked to lie inside the model folder and to hold its bytes.
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
        log.debug("%s: loaded %d bytes of external data", path, external)
    _toposort_checked(proto.graph)
    proto, converted = _check_opset(proto)
    if converted:
        findings.append(converted)
    _check_image_input(proto)
    proto = _check_and_infer(proto)
    widened = None
    precision = low_precision(proto)
    if precision:
        widened = widen(proto)
        findings.append(Finding(
            "SS113", Severity.INFO, f"{precision} model analysed as a float32 copy; a repaired "
            f"model keeps {precision}", details={"precision": precision}))
    elif is_qdq(proto):
        widened = dequantize(proto)
        findings.append(Finding(
            "SS114", Severity.INFO, "integer-quantized (QDQ) model analysed as a float copy; "
            "a repaired model keeps its quantization"))
    # skl2onnx classifiers output an int64 label first (and a ZipMap): analyse the scores
    widened = scores_copy(widened or proto) or widened
    return LoadedModel(proto, path, hashlib.sha256(raw).hexdigest(), size, findings, widened)


def _parse(raw: bytes, path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.ModelProto.FromString(raw)
    except Exception:
        raise refuse("SS101", f"{path}: not an ONNX model (protobuf parse failed)") from None
    # Arbitrary bytes sometimes parse as a protobuf with only unknown fields.
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.node:
        raise refuse("SS101", f"{path}: not an ONNX model (no IR version or graph nodes)")
    return proto


# ---------------------------------------------------------------- walking the model

def _all_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for graph in graphs(proto.graph):
        yield from graph.node
    for function in proto.functions:
        yield from function.node


def _all_tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    for graph in graphs(proto.graph):
        for t in graph.initializer:
            yield t.name, t
        for s in graph.sparse_initializer:
            yield s.values.name, s.values
            yield s.indices.name, s.indices
    for node in _all_nodes(proto):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield f"{node.name or node.op_type}.{attr.name}", attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    yield f"{node.name or node.op_type}.{attr.name}", t
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield f"{node.name or node.op_type}.{attr.name}", attr.sparse_tensor.values


# ---------------------------------------------------------------- checks

def _check_domains(proto: onnx.ModelProto, allowed: set[str]) -> None:
    local = {(f.domain, f.name) for f in proto.functions}
    for node in _all_nodes(proto):
        if node.domain not in allowed:
            where = node.name or node.op_type
            raise refuse("SS102", f"node {where!r} uses op {node.op_type!r} from custom "
                         f"domain {node.domain!r}", where)
    for entry in proto.opset_import:
        if entry.domain not in allowed | IMPORT_ONLY_DOMAINS and not any(
                d == entry.domain for d, _ in local):
            raise refuse("SS102", f"opset import of custom domain {entry.domain!r}",
                         entry.domain)


def _check_tensors(proto: onnx.ModelProto, folder: Path) -> int:
    """SS103-SS105 on every stored tensor; returns the external data bytes referenced."""
    external = 0
    for name, tensor in _all_tensors(proto):
        is_external = (tensor.data_location == TensorProto.EXTERNAL
                       or len(tensor.external_data) > 0)
        fields = [f for f in _DATA_FIELDS if len(getattr(tensor, f))]
        if len(fields) + is_external > 1:
            stored = fields + (["external_data"] if is_external else [])
            raise refuse("SS104", f"tensor {name!r} stores data in more than one field "
                         f"({', '.join(stored)})", name)
        if any(d < 0 for d in tensor.dims):
            raise refuse("SS105", f"tensor {name!r} declares negative dims "
                         f"{list(tensor.dims)}", name)
        if is_external:
            external += _check_external(name, tensor, folder)
        else:
            _check_stored_size(name, tensor, fields[0] if fields else None)
    return external


def _element_count(tensor: TensorProto) -> int:
    # Python ints: hostile dims such as [2**40, 2**40] must not wrap around in int64
    return math.prod(tensor.dims)


def _byte_size(tensor: TensorProto) -> int | None:
    n = _element_count(tensor)
    if tensor.data_type in _FOUR_BIT:
        return (n + 1) // 2
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    return n * itemsize


def _check_stored_size(name: str, tensor: TensorProto, stored: str | None) -> None:
    n = _element_count(tensor)
    if stored is None:
        if n:
            raise refuse("SS105", f"tensor {name!r} declares {n} elements but stores none",
                         name)
        return
    if stored == "raw_data":
        expected = _byte_size(tensor)
        have = len(tensor.raw_data)
        unit = "bytes"
    else:
        complex_types = (TensorProto.COMPLEX64, TensorProto.COMPLEX128)
        expected = 2 * n if tensor.data_type in complex_types else n
        if tensor.data_type in _FOUR_BIT:  # packed two per entry
            expected = (n + 1) // 2
        have = len(getattr(tensor, stored))
        unit = f"{stored} entries"
    if expected is not None and have != expected:
        raise refuse("SS105", f"tensor {name!r} declares dims {list(tensor.dims)} "
                     f"({expected} {unit}) but stores {have}", name)


def _check_external(name: str, tensor: TensorProto, folder: Path) -> int:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise refuse("SS103", f"tensor {name!r} has external data without a location", name)
    shown = location if len(location) <= 80 else f"{location[:40]}...({len(location)} chars)"
    if (os.path.isabs(location) or location.startswith(("/", "\\"))
            or (len(location) > 1 and location[1] == ":")):
        raise refuse("SS103", f"tensor {name!r} external data path {shown!r} is absolute",
                     name)
    if "\x00" in location:
        raise refuse("SS103", f"tensor {name!r} external data path contains a NUL byte", name)
    base = folder.resolve()
    try:
        target = (base / location).resolve()
        present = target.is_file()
    except OSError as exc:  # a name too long for the file system, a loop of links
        raise refuse("SS103", f"tensor {name!r} external data path {shown!r} cannot be "
                     f"resolved ({exc.strerror or exc})", name) from None
    if not target.is_relative_to(base):
        raise refuse("SS103", f"tensor {name!r} external data path {shown!r} escapes "
                     "the model folder", name)
    if not present:
        raise refuse("SS105", f"tensor {name!r} external data file {shown!r} is missing",
                     name)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise refuse("SS105", f"tensor {name!r} external data offset/length are not "
                     "integers", name) from None
    file_size = target.stat().st_size
    if length is None:
        length = file_size - offset
    if offset < 0 or length < 0 or offset + length > file_size:
        raise refuse("SS105", f"tensor {name!r} external data [{offset}, {offset + length}) "
                     f"lies outside {shown!r} ({file_size} bytes)", name)
    expected = _byte_size(tensor)
    if expected is not None and expected != length:
        raise refuse("SS105", f"tensor {name!r} declares dims {list(tensor.dims)} "
                     f"({expected} bytes) but its external data holds {length}", name)
    return length


def _toposort_checked(graph: onnx.GraphProto) -> None:
    """SS107 (dangling input) and SS106 (cycle); reorders the nodes topologically."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    available |= {s.values.name for s in graph.sparse_initializer}
    producer: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer[out] = idx
    for node in graph.node:
        for inp in node.input:
            if inp and inp not in available and inp not in producer:
                where = node.name or node.op_type
                raise refuse("SS107", f"node {where!r} reads {inp!r}, which nothing produces",
                             where)
    deps = [{producer[i] for i in node.input if i in producer} for node in graph.node]
    deps = [_outer_deps(node, producer) | d for node, d in zip(graph.node, deps, strict=True)]
    order: list[int] = []
    done: set[int] = set()
    remaining = list(range(len(graph.node)))
    while remaining:
        ready = [i for i in remaining if deps[i] <= done]
        if not ready:
            stuck = graph.node[remaining[0]]
            where = stuck.name or stuck.op_type
            raise refuse("SS106", f"graph has a cycle through node {where!r}", where)
        order.extend(ready)
        done.update(ready)
        remaining = [i for i in remaining if i not in done]
    if order != list(range(len(graph.node))):
        log.debug("graph nodes were not in topological order; reordered")
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)


def _outer_deps(node: onnx.NodeProto, producer: dict[str, int]) -> set[int]:
    """Subgraph bodies may read outer-scope tensors: those are dependencies too."""
    names: set[str] = set()
    for attr in node.attribute:
        subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in subgraphs:
            for sub in graphs(g):
                for n in sub.node:
                    names.update(n.input)
    return {producer[n] for n in names if n in producer}


def _check_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, Finding | None]:
    version = default_opset(proto)
    newest = onnx.defs.onnx_opset_version()
    if version is None:
        raise refuse("SS109", "model imports no default-domain opset")
    if version > newest:
        raise refuse("SS109", f"opset {version} is newer than this onnx supports ({newest})")
    if version >= MIN_OPSET:
        return proto, None
    try:
        converted = version_converter.convert_version(proto, TARGET_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise refuse("SS109", f"opset {version} is older than {MIN_OPSET} and could not be "
                     f"converted to {TARGET_OPSET} ({_first_line(exc)})") from None
    finding = Finding("SS108", Severity.INFO,
                      f"opset {version} converted to {TARGET_OPSET} with onnx.version_converter",
                      details={"from": version, "to": TARGET_OPSET})
    return converted, finding


def _check_image_input(proto: onnx.ModelProto) -> None:
    inp = first_input(proto)
    if inp is None:
        raise refuse("SS107", "model has no graph input")
    elem = inp.type.tensor_type.elem_type
    if elem not in FLOAT_TYPES:
        type_name = TensorProto.DataType.Name(elem) if elem else "non-tensor"
        raise refuse("SS110", f"image input {inp.name!r} has type {type_name}; a float "
                     "tensor is required", inp.name)


def _check_and_infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                                 data_prop=True)
    except Exception as exc:
        raise refuse("SS111", f"onnx checker / shape inference failed: {_first_line(exc)}"
                     ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
