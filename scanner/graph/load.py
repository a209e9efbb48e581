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

import functools
import hashlib
import heapq
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import Message
from onnx import TensorProto, external_data_helper, version_converter

from ..errors import ModelRefused, out_of_memory
from ..findings import Finding, LayerInfo, ModelSummary, Severity
from ..runtime import CPU, MissingKernel, ort_message, session_options
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
    _check_names(proto)
    external = _check_tensors(proto, path.parent)
    if max_bytes is not None and size + external > max_bytes:
        raise refuse("SS112", f"{path}: {size + external} bytes with external data exceeds "
                     f"the limit of {max_bytes}")
    if external:
        # Every location was checked to lie inside the model folder and to hold its bytes.
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
        log.debug("%s: loaded %d bytes of external data", path, external)
    _toposort_checked(proto.graph)
    if not proto.graph.output:  # onnx.checker passes it; every stage reads the scores
        raise refuse("SS107", "model has no graph output")
    proto, converted = _check_opset(proto)
    if converted:
        findings.append(converted)
    _check_image_input(proto)
    proto = _check_and_infer(proto)
    _check_runtime(proto)
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
    field_name = _undecodable_text(proto)
    if field_name:
        raise refuse("SS101", f"{path}: not an ONNX model ({field_name} is not UTF-8 text)")
    return proto


def _undecodable_text(message: Message) -> str | None:
    """The first string field whose bytes are not UTF-8: protobuf hands those over as bytes,
    and every name check after this one expects str."""
    stack = [message]
    while stack:
        current = stack.pop()
        for fd, value in current.ListFields():
            repeated = (fd.is_repeated if hasattr(fd, "is_repeated")
                        else fd.label == fd.LABEL_REPEATED)
            values = value if repeated else [value]
            if fd.type == fd.TYPE_STRING and any(isinstance(v, bytes) for v in values):
                return fd.full_name
            if fd.type == fd.TYPE_MESSAGE:
                stack.extend(values)
    return None


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


# A newline or escape sequence in a name prints forged lines in `inspect` and in one-line
# errors (benchmarks/fuzz_loader.py: a layer named "x\nTraceback ..."); Unicode line
# separators do the same, and bidi overrides reorder what a reviewer reads.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _names(proto: onnx.ModelProto) -> Iterator[tuple[str, str]]:
    for graph in graphs(proto.graph):
        yield "graph", graph.name
        for value in (*graph.input, *graph.output, *graph.value_info):
            yield "tensor", value.name
            for dim in value.type.tensor_type.shape.dim:
                yield "dimension", dim.dim_param
        for tensor in graph.initializer:
            yield "initializer", tensor.name
    for node in _all_nodes(proto):
        yield "node", node.name
        yield "op", node.op_type
        for name in (*node.input, *node.output):
            yield "tensor", name
        for attr in node.attribute:
            yield "attribute", attr.name
    for function in proto.functions:
        yield "function", function.name


def _check_names(proto: onnx.ModelProto) -> None:
    """SS115: names reach terminals and one-line errors; none may hold a control character."""
    for what, name in _names(proto):
        if _CONTROL.search(name):
            shown = name if len(name) <= 60 else f"{name[:60]}...({len(name)} chars)"
            raise refuse("SS115", f"{what} name {shown!r} contains a control character",
                         shown)


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
    except OSError as exc:  # a name too long for the file system
        raise refuse("SS103", f"tensor {name!r} external data path {shown!r} cannot be "
                     f"resolved ({exc.strerror or exc})", name) from None
    except RuntimeError:  # pathlib's word for a loop of links (Python < 3.13)
        raise refuse("SS103", f"tensor {name!r} external data path {shown!r} cannot be "
                     "resolved (a loop of symbolic links)", name) from None
    if not target.is_relative_to(base):
        raise refuse("SS103", f"tensor {name!r} external data path {shown!r} escapes "
                     "the model folder", name)
    if target != base / os.path.normpath(location):  # onnx refuses links even inside
        raise refuse("SS103", f"tensor {name!r} external data path {shown!r} goes through "
                     "a symbolic link", name)
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
    deps = [{producer[i] for i in node.input if i in producer} | _outer_deps(node, producer)
            for node in graph.node]
    # Kahn's algorithm, lowest index first: a sorted graph keeps its order, and a chain of
    # 30,000 nodes stored in reverse takes milliseconds (rounds of "all ready nodes" were
    # quadratic: minutes, found by benchmarks/fuzz_loader.py)
    waiting = [len(d) for d in deps]
    consumers: list[list[int]] = [[] for _ in graph.node]
    for idx, d in enumerate(deps):
        for dep in d:
            consumers[dep].append(idx)
    ready = [idx for idx, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        idx = heapq.heappop(ready)
        order.append(idx)
        for consumer in consumers[idx]:
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                heapq.heappush(ready, consumer)
    if len(order) < len(graph.node):
        stuck = graph.node[min(set(range(len(graph.node))) - set(order))]
        where = stuck.name or stuck.op_type
        raise refuse("SS106", f"graph has a cycle through node {where!r}", where)
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


@functools.cache
def _newest_opsets() -> dict[str, int]:
    newest: dict[str, int] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        newest[schema.domain] = max(newest.get(schema.domain, 0), schema.since_version)
    return newest


def _check_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, Finding | None]:
    version = default_opset(proto)
    newest = onnx.defs.onnx_opset_version()
    if version is None:
        raise refuse("SS109", "model imports no default-domain opset")
    if version > newest:
        raise refuse("SS109", f"opset {version} is newer than this onnx supports ({newest})")
    for entry in proto.opset_import:
        known = _newest_opsets().get(entry.domain)
        if entry.domain not in ("", "ai.onnx") and known and entry.version > known:
            raise refuse("SS109", f"opset {entry.version} of domain {entry.domain!r} is newer "
                         f"than this onnx supports ({known})", entry.domain)
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


def _check_runtime(proto: onnx.ModelProto) -> None:
    """SS116: onnxruntime must build the graph onnx.checker accepted, and run it once on a
    zero input when the input shape is fixed. onnx passes a Conv with group -1 or a Gemm
    bias of the wrong shape, onnxruntime refuses them only when it runs them: found here
    as a refusal, not mid-scan as an internal error (benchmarks/fuzz_loader.py)."""
    if proto.ByteSize() >= 2**31:  # too large to pass as bytes; the scan's session says
        return
    try:
        session = ort.InferenceSession(proto.SerializeToString(),
                                       sess_options=session_options(), providers=[CPU])
        feeds = _zero_feeds(session)
        if feeds is not None:
            session.run(None, feeds)
    except MissingKernel:
        # a kernel this build lacks (bfloat16 Conv on CPU) is no fault of the model, and
        # another build may have it: the stage that needs the kernel says so (exit 3)
        return
    except Exception as exc:
        if out_of_memory(exc) is not None:  # the machine's limit, not the model's fault
            raise
        raise refuse("SS116", f"onnxruntime cannot run the model: {ort_message(exc)}"
                     ) from None


_PROBE_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
                "tensor(bool)": np.bool_}
_PROBE_VALUES = 1 << 24


def _zero_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray] | None:
    """Zeros for every input, batch 1; None when a shape beyond the batch is not fixed."""
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else (1 if axis == 0 else None)
                 for axis, d in enumerate(inp.shape)]
        dtype = _PROBE_TYPES.get(inp.type)
        if dtype is None or None in shape or math.prod(shape) > _PROBE_VALUES:
            return None
        feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


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
