"""Graph-level mutants for the loader fuzzer (benchmarks/fuzz_mutations.py): structure,
attributes, shapes and dtypes, opsets, domains, names and metadata."""

from __future__ import annotations

import random

import onnx
from fuzz_files import Side
from onnx import AttributeProto, TensorProto, helper

# standard ops a node may be retyped to (each with its own inference and kernel paths)
OPS = ("Relu", "Conv", "Gemm", "Add", "MatMul", "Reshape", "Concat", "Identity", "Softmax",
       "BatchNormalization", "MaxPool", "Sigmoid", "Transpose", "Flatten", "Split", "Resize",
       "Pad", "Slice", "ConstantOfShape", "Expand", "Tile", "Range", "LSTM", "Einsum", "LRN",
       "Sum", "If", "Loop", "Scan", "Constant", "Dropout", "TopK", "NonZero", "Gather")
HUGE_INTS = (2**62, -(2**63), 2**31, -1, 0, 10**9, -7, 2**40)
# names a hostile supplier picks: newlines and escapes (one-line errors), size, emptiness
ODD_NAMES = ("", "x\nTraceback (most recent call last):", "\x1b[31mred\x1b[0m", "a" * 100_000,
             "../../etc/passwd", "名前", "\r", "%s%n{0}", "image")
ELEM_TYPES = (0, TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT64, TensorProto.STRING,
              TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.COMPLEX64,
              TensorProto.BFLOAT16, 23, 999)


def _node(rng: random.Random, g: onnx.GraphProto) -> tuple[int, onnx.NodeProto]:
    i = rng.randrange(len(g.node))
    return i, g.node[i]


def _tensor_names(g: onnx.GraphProto) -> list[str]:
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    return names + [o for n in g.node for o in n.output]


# ---------------------------------------------------------------- graph structure

def drop_node(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    i, n = _node(rng, p.graph)
    del p.graph.node[i]
    return f"drop node {i} ({n.op_type})"


def duplicate_node(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    i, n = _node(rng, p.graph)
    copy = onnx.NodeProto()
    copy.CopyFrom(n)
    at = rng.randrange(len(p.graph.node) + 1)
    p.graph.node.insert(at, copy)
    return f"duplicate node {i} ({n.op_type}) at {at}: two producers of {list(n.output)}"


def retype_node(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    i, n = _node(rng, p.graph)
    new = rng.choice(OPS + ("NoSuchOp", ""))
    old, n.op_type = n.op_type, new
    return f"retype node {i} {old} -> {new!r}"


def rewire_input(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    i, n = _node(rng, p.graph)
    if not n.input:
        n.input.append("ghost")
        return f"node {i} ({n.op_type}) gets input 'ghost'"
    j = rng.randrange(len(n.input))
    choice = rng.choice(["ghost", "", "own-output", "graph-output", "other"])
    new = {"ghost": "ghost", "": "", "own-output": n.output[0] if n.output else "x",
           "graph-output": p.graph.output[0].name,
           "other": rng.choice(_tensor_names(p.graph))}[choice]
    old, n.input[j] = n.input[j], new
    return f"node {i} ({n.op_type}) input {j} {old!r} -> {new!r} ({choice})"


def rename_output(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    i, n = _node(rng, p.graph)
    choice = rng.choice(["ghost", "", "existing", "graph-input"])
    new = {"ghost": "ghost_out", "": "", "existing": rng.choice(_tensor_names(p.graph)),
           "graph-input": p.graph.input[0].name}[choice]
    old, n.output[0] = n.output[0], new
    return f"node {i} ({n.op_type}) output {old!r} -> {new!r} ({choice})"


def graph_io_lie(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    g = p.graph
    what = rng.choice(["output-ghost", "input-ghost", "no-inputs", "no-outputs",
                       "extra-input", "duplicate-output", "output-is-input"])
    if what == "output-ghost":
        g.output[0].name = "ghost"
    elif what == "input-ghost":
        g.input[0].name = "ghost_in"
    elif what == "no-inputs":
        del g.input[:]
    elif what == "no-outputs":
        del g.output[:]
    elif what == "extra-input":
        g.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, 3]))
    elif what == "duplicate-output":
        g.output.append(g.output[0])
    else:
        g.output[0].name = g.input[0].name
    return f"graph inputs/outputs: {what}"


def cycle(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    nodes = p.graph.node
    i = rng.randrange(len(nodes) - 1)
    j = rng.randrange(i, len(nodes))
    if not nodes[i].input:
        nodes[i].input.append("")
    nodes[i].input[0] = nodes[j].output[0]
    return f"cycle: node {i} ({nodes[i].op_type}) reads node {j}'s output"


def shuffle_nodes(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    nodes = list(p.graph.node)
    order = rng.choice(["reverse", "shuffle"])
    if order == "reverse":
        nodes.reverse()
    else:
        rng.shuffle(nodes)
    del p.graph.node[:]
    p.graph.node.extend(nodes)
    return f"node order: {order}"


def deep_chain(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    """A long Identity chain on one edge, in forward or reverse node order."""
    length = rng.choice([200, 2_000, 10_000, 30_000])
    i, n = _node(rng, p.graph)
    src = n.output[0]
    chain = [helper.make_node("Identity", [src if k == 0 else f"chain_{k - 1}"], [f"chain_{k}"])
             for k in range(length)]
    for other in p.graph.node[i + 1:]:
        for j, name in enumerate(other.input):
            if name == src:
                other.input[j] = f"chain_{length - 1}"
    for out in p.graph.output:
        if out.name == src:
            out.name = f"chain_{length - 1}"
    order = rng.choice(["forward", "reverse"])
    if order == "reverse":
        chain.reverse()
    nodes = list(p.graph.node)
    del p.graph.node[:]
    p.graph.node.extend(nodes[:i + 1] + chain + nodes[i + 1:])
    return f"{length} Identity nodes after node {i} ({n.op_type}), {order} order"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_subgraphs(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    """Mark the graph's last node for wrapping in nested If bodies (see `nest`)."""
    side.nest = rng.choice([2, 10, 30, 120])
    return f"last node wrapped in {side.nest} nested If subgraphs"


def nest(p: onnx.ModelProto, depth: int) -> bytes:
    """The model with its last node wrapped in `depth` If bodies (then-branch only: nesting
    both would double the size per level). Encoded by hand: protobuf's Python API refuses
    to build a message past its nesting limit, which the loader must meet as a file."""
    if not p.graph.node or not p.graph.output:  # an earlier mutation left nothing to wrap
        return p.SerializeToString()
    last = p.graph.node[-1]
    out_vi = p.graph.output[0].SerializeToString()
    flat = _field(1, last.SerializeToString()) + _field(2, b"flat") + _field(12, out_vi)
    node = last.SerializeToString()
    for level in range(depth):
        body = _field(1, node) + _field(2, f"body_{level}".encode()) + _field(12, out_vi)
        attrs = b"".join(_field(5, _field(1, key) + _varint(20 << 3) + _varint(5)
                                + _field(6, branch))
                         for key, branch in ((b"then_branch", body), (b"else_branch", flat)))
        node = (_field(1, f"cond_{level}".encode()) + _field(2, last.output[0].encode())
                + _field(4, b"If") + attrs)
        p.graph.initializer.append(helper.make_tensor(f"cond_{level}", TensorProto.BOOL, [],
                                                      [True]))
    p.graph.node.pop()
    # a repeated field appended after the graph merges into it: the If is its last node
    return p.SerializeToString() + _field(7, _field(1, node))


def duplicate_graph(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    g = p.graph
    if rng.random() < 0.5:  # same names: every tensor gets two producers
        g.node.extend([onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node])
        return "every node duplicated under the same names"
    keep = {i.name for i in g.input} | {t.name for t in g.initializer}
    copies = []
    for n in g.node:
        c = onnx.NodeProto.FromString(n.SerializeToString())
        c.name = f"{n.name}_copy"
        for j, name in enumerate(c.input):
            if name and name not in keep:
                c.input[j] = f"{name}_copy"
        for j, name in enumerate(c.output):
            c.output[j] = f"{name}_copy"
        copies.append(c)
    g.node.extend(copies)
    out = onnx.ValueInfoProto.FromString(g.output[0].SerializeToString())
    out.name = f"{out.name}_copy"
    g.output.append(out)
    return "the whole graph duplicated beside itself with a second output"


def huge_op(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    """An op whose output size comes from data: a request for terabytes at run time."""
    g = p.graph
    src = g.output[0].name
    dims = rng.choice([[2**24, 2**24], [2**31, 2**31], [-1, 2**40], [2**62]])
    kind = rng.choice(["Expand", "ConstantOfShape", "Tile", "Reshape"])
    g.initializer.append(helper.make_tensor("huge_shape", TensorProto.INT64, [len(dims)], dims))
    if kind == "Expand":
        node = helper.make_node("Expand", [src, "huge_shape"], ["huge"])
    elif kind == "ConstantOfShape":
        node = helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"])
    elif kind == "Tile":
        g.initializer[-1].CopyFrom(helper.make_tensor("huge_shape", TensorProto.INT64, [2],
                                                      [2**31, 2**31]))
        node = helper.make_node("Tile", [src, "huge_shape"], ["huge"])
    else:
        node = helper.make_node("Reshape", [src, "huge_shape"], ["huge"])
    g.node.append(node)
    g.output.append(helper.make_tensor_value_info("huge", TensorProto.FLOAT, None))
    return f"{kind} to {dims} as a second output"


# ---------------------------------------------------------------- attributes

def attr_type_lie(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    nodes = [n for n in p.graph.node if n.attribute]
    n = rng.choice(nodes)
    a = rng.choice(n.attribute)
    old = AttributeProto.AttributeType.Name(a.type)
    new = rng.choice([t for t in AttributeProto.AttributeType.values() if t != a.type] + [99])
    a.type = new
    if rng.random() < 0.5:  # a value in the field the new type names, too
        if new == AttributeProto.FLOAT:
            a.f = 1.5
        elif new == AttributeProto.STRING:
            a.s = b"\xff\xfe"
        elif new == AttributeProto.TENSOR:
            a.t.CopyFrom(helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0]))
        elif new == AttributeProto.GRAPH:
            a.g.CopyFrom(helper.make_graph([], "empty", [], []))
    return f"{n.op_type}.{a.name} type {old} -> {new}"


def attr_value_lie(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    nodes = [n for n in p.graph.node if n.attribute]
    n = rng.choice(nodes)
    a = rng.choice(n.attribute)
    if a.type == AttributeProto.INTS:
        values = list(a.ints)
        how = rng.choice(["one", "all", "longer", "empty"])
        if how == "one" and values:
            values[rng.randrange(len(values))] = rng.choice(HUGE_INTS)
        elif how == "all":
            values = [rng.choice(HUGE_INTS)] * max(len(values), 1)
        elif how == "longer":
            values += [rng.choice(HUGE_INTS)] * rng.choice([1, 5, 100])
        else:
            values = []
        del a.ints[:]
        a.ints.extend(values)
        return f"{n.op_type}.{a.name} = {values[:8]}{'...' if len(values) > 8 else ''}"
    if a.type == AttributeProto.INT:
        a.i = rng.choice(HUGE_INTS)
        return f"{n.op_type}.{a.name} = {a.i}"
    if a.type == AttributeProto.FLOAT:
        a.f = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e38])
        return f"{n.op_type}.{a.name} = {a.f}"
    a.s = rng.choice([b"", b"\xff", b"NOT_A_MODE" * 100])
    return f"{n.op_type}.{a.name} = {a.s[:20]!r}"


def negative_kernel(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    convs = [n for n in p.graph.node if n.op_type in ("Conv", "MaxPool")]
    n = rng.choice(convs)
    name = rng.choice(["kernel_shape", "strides", "pads", "dilations"])
    value = rng.choice([[-3, -3], [0, 0], [2**31, 2**31], [-1, 3], [3], [1, 1, 1, 1, 1, 1]])
    for a in n.attribute:
        if a.name == name:
            del a.ints[:]
            a.ints.extend(value)
            break
    else:
        n.attribute.append(helper.make_attribute(name, value))
    return f"{n.op_type}.{name} = {value}"


def attr_drop_or_add(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    n = rng.choice(list(p.graph.node))
    how = rng.choice(["drop", "unknown", "duplicate"])
    if how == "drop" and n.attribute:
        a = n.attribute.pop(rng.randrange(len(n.attribute)))
        return f"{n.op_type}: drop attribute {a.name}"
    if how == "duplicate" and n.attribute:
        n.attribute.append(n.attribute[0])
        return f"{n.op_type}: attribute {n.attribute[0].name} twice"
    n.attribute.append(helper.make_attribute("evil", 7))
    return f"{n.op_type}: unknown attribute 'evil'"


# ---------------------------------------------------------------- shapes, dtypes, storage

def _value_infos(p: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    # the samples store no value_info: add one for an inner tensor, so it can lie too
    g = p.graph
    n = g.node[len(g.node) // 2]
    g.value_info.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT,
                                                      [1, 32, 14, 14]))
    return list(g.input) + list(g.output) + list(g.value_info)


def shape_lie(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    vi = rng.choice(_value_infos(p))
    dims = vi.type.tensor_type.shape.dim
    how = rng.choice(["value", "param", "rank", "clear"])
    if how == "value" and dims:
        d = dims[rng.randrange(len(dims))]
        d.dim_value = rng.choice([0, 2**62, 3, 7, 100_000])
        if rng.random() < 0.3:
            d.dim_value = -5
    elif how == "param" and dims:
        dims[rng.randrange(len(dims))].dim_param = rng.choice(ODD_NAMES[:4])
    elif how == "rank":
        for _ in range(rng.choice([1, 3, 40])):
            dims.add().dim_value = 2
    else:
        vi.type.tensor_type.ClearField("shape")
    return f"shape of {vi.name[:40]!r}: {how}"


def dtype_lie(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    new = rng.choice(ELEM_TYPES)
    if rng.random() < 0.5:
        vi = rng.choice(_value_infos(p))
        if rng.random() < 0.2:  # not a tensor at all
            vi.type.ClearField("tensor_type")
            vi.type.sequence_type.elem_type.tensor_type.elem_type = TensorProto.FLOAT
            return f"{vi.name[:40]!r} typed as a sequence"
        vi.type.tensor_type.elem_type = new
        return f"elem_type of {vi.name[:40]!r} -> {new}"
    t = rng.choice(list(p.graph.initializer))
    t.data_type = new
    return f"initializer {t.name!r} data_type -> {new}"


# ---------------------------------------------------------------- opsets, domains, names

def opset_lie(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    how = rng.choice(["version", "drop", "duplicate", "ml-future", "ir"])
    if how == "version":
        p.opset_import[0].version = rng.choice([0, -1, 1, 7, 9, 12, 99, 2**40])
        return f"default opset -> {p.opset_import[0].version}"
    if how == "drop":
        del p.opset_import[:]
    elif how == "duplicate":
        p.opset_import.append(helper.make_opsetid("", rng.choice([9, 13, 18])))
    elif how == "ml-future":
        p.opset_import.append(helper.make_opsetid("ai.onnx.ml", 99))
    else:
        p.ir_version = rng.choice([0, 1, 3, 7, 11, 99, 2**40, -1])
        return f"ir_version -> {p.ir_version}"
    return f"opset imports: {how}"


def custom_domain(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    i, n = _node(rng, p.graph)
    domain = rng.choice(["com.evil", "ai.onnx.ml", "ai.onnx.training", "com.microsoft",
                         "local", "ai.onnx", "AI.ONNX"])
    n.domain = domain
    how = "no import"
    if rng.random() < 0.6:
        p.opset_import.append(helper.make_opsetid(domain, 1))
        how = "imported"
    if domain == "local" and rng.random() < 0.5:  # a model-local function that calls itself
        body = helper.make_node(n.op_type, ["x"], ["y"], domain="local")
        p.functions.append(helper.make_function("local", n.op_type, ["x"], ["y"], [body],
                                                [helper.make_opsetid("", 17)]))
        how += ", a recursive local function"
    return f"node {i} ({n.op_type}) in domain {domain!r} ({how})"


def odd_names(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    """Rename a tensor everywhere (a valid model) or a node, to a hostile name."""
    name = rng.choice(ODD_NAMES)
    g = p.graph
    if rng.random() < 0.5:
        old = rng.choice([g.input[0].name] + [n.output[0] for n in g.node])
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.name == old:
                vi.name = name
        for n in g.node:
            for seq in (n.input, n.output):
                for j, v in enumerate(seq):
                    if v == old:
                        seq[j] = name
        return f"tensor {old!r} renamed to {name[:40]!r}"
    i, n = _node(rng, g)
    n.name = name
    return f"node {i} named {name[:40]!r}"


def metadata_lie(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    value = rng.choice([
        "{", "[]", "null", '"NCHW"', '{"layout": "NCHW", "channels": -1}',
        '{"height": 100000, "width": 100000}', '{"height": 0, "width": 28}',
        '{"mean": [1e309], "std": [0]}', '{"scale": "x"}', '{"layout": "NWHC"}',
        '{"channels": 3, "height": 28, "width": 28}', '{"extra": 1}',
        '{"mean": [0.0, 0.0, 0.0, 0.0], "std": [1, 1, 1, 1]}', "\x00\n" * 10])
    for prop in p.metadata_props:
        if prop.key == "shapscan.preprocess":
            prop.value = value
            break
    else:
        p.metadata_props.add(key="shapscan.preprocess", value=value)
    if rng.random() < 0.2:
        p.metadata_props.add(key="shapscan.preprocess", value="{}")
    return f"metadata shapscan.preprocess = {value[:50]!r}"
