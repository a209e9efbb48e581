"""File-level mutants for the loader fuzzer (benchmarks/fuzz_mutations.py): tensor storage
lies, external-data tricks (files and links beside the model), raw byte mutations."""

from __future__ import annotations

import random

import onnx
from onnx import TensorProto, helper

MODEL_NAME = "model.onnx"


class Side:
    """What a proto mutator leaves beside the model."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.links: dict[str, str] = {}
        self.dirs: list[str] = []
        self.outside: dict[str, bytes] = {}
        self.nest = 0  # wrap the last node in this many If bodies when serializing


# ---------------------------------------------------------------- tensor storage

def init_dims_lie(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    t = rng.choice(list(p.graph.initializer))
    dims = list(t.dims)
    how = rng.choice(["double", "huge", "overflow", "negative", "drop", "add", "zero"])
    if how == "double" and dims:
        dims[0] *= 2
    elif how == "huge":
        dims = [2**20, 2**20, 2**20]
    elif how == "overflow":  # product wraps around in int64
        dims = [2**32, 2**32, 1]
    elif how == "negative" and dims:
        dims[0] = -dims[0]
    elif how == "drop" and dims:
        dims = dims[1:]
    elif how == "add":
        dims = dims + [1, 1]
    else:
        dims = [0] + dims
    del t.dims[:]
    t.dims.extend(dims)
    return f"initializer {t.name!r} dims -> {dims} ({how})"


def data_fields_lie(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    t = rng.choice([t for t in p.graph.initializer if t.raw_data])
    n = len(t.raw_data) // 4
    how = rng.choice(["both", "both-short", "truncate", "extend", "clear", "int64",
                      "typed-nan", "sparse"])
    if how.startswith("both"):
        t.float_data.extend([1.0] * (n if how == "both" else 1))
    elif how == "truncate":
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))]
    elif how == "extend":
        t.raw_data = t.raw_data + b"\0" * rng.choice([1, 4, 4096])
    elif how == "clear":
        t.ClearField("raw_data")
    elif how == "int64":
        t.ClearField("raw_data")
        t.int64_data.extend([1] * n)
    elif how == "typed-nan":
        t.ClearField("raw_data")
        t.float_data.extend([float("nan")] * n)
    else:  # moved to a sparse initializer whose indices lie
        dense = onnx.TensorProto()
        dense.CopyFrom(t)
        p.graph.initializer.remove(t)
        values = helper.make_tensor(dense.name, TensorProto.FLOAT, [2], [1.0, 2.0])
        indices = helper.make_tensor(f"{dense.name}_idx", TensorProto.INT64, [2],
                                     rng.choice([[0, 10**12], [-1, 0], [1, 1], [0, 1]]))
        p.graph.sparse_initializer.append(
            helper.make_sparse_tensor(values, indices, list(dense.dims)))
    return f"initializer {t.name!r} storage: {how}"


# ---------------------------------------------------------------- external data

def external_data(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    """Move an initializer to a file beside the model, then (usually) lie about it."""
    t = rng.choice([t for t in p.graph.initializer if t.raw_data])
    payload = t.raw_data
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    side.files["weights.bin"] = payload
    entries = {"location": "weights.bin", "offset": "0", "length": str(len(payload))}
    trick = rng.choice([
        "valid", "absolute", "dev", "proc", "windows", "escape", "escape-inner", "missing",
        "offset-past-end", "length-past-end", "negative-offset", "offset-not-int",
        "huge-length", "symlink-out", "symlink-in", "symlink-loop", "directory", "self",
        "dot", "empty", "nul", "newline", "long", "no-entries", "default-location",
        "raw-too", "length-lies", "no-length", "backslash"])
    loc = entries["location"]
    if trick == "absolute":
        loc = "/etc/passwd"
    elif trick == "dev":
        loc = "/dev/zero"
    elif trick == "proc":
        loc = "/proc/self/environ"
    elif trick == "windows":
        loc = "C:\\weights.bin"
    elif trick == "escape":
        loc = "../outside.bin"
        side.outside["outside.bin"] = payload
    elif trick == "escape-inner":
        loc = "sub/../../outside.bin"
        side.outside["outside.bin"] = payload
    elif trick == "missing":
        loc = "absent.bin"
    elif trick == "offset-past-end":
        entries["offset"] = str(len(payload) + 1)
    elif trick == "length-past-end":
        entries["length"] = str(len(payload) * 2)
    elif trick == "negative-offset":
        entries["offset"] = "-4"
    elif trick == "offset-not-int":
        entries["offset"] = rng.choice(["abc", "1e3", "0x10", " 4", "", "4.0"])
    elif trick == "huge-length":
        entries["length"] = str(2**63)
    elif trick == "symlink-out":
        side.outside["outside.bin"] = payload
        side.links["link.bin"] = "../outside.bin"
        loc = "link.bin"
    elif trick == "symlink-in":
        side.links["link.bin"] = "weights.bin"
        loc = "link.bin"
    elif trick == "symlink-loop":
        side.links["loop_a.bin"] = "loop_b.bin"
        side.links["loop_b.bin"] = "loop_a.bin"
        loc = "loop_a.bin"
    elif trick == "directory":
        side.dirs.append("weights.d")
        loc = "weights.d"
    elif trick == "self":
        loc = MODEL_NAME
        entries["length"] = str(len(payload))
    elif trick == "dot":
        loc = "."
    elif trick == "empty":
        loc = ""
    elif trick == "nul":
        loc = "weights\x00.bin"
    elif trick == "newline":
        loc = "weights\n.bin"
        side.files["weights\n.bin"] = payload
    elif trick == "long":
        loc = "d/" * 3000 + "w.bin"
    elif trick == "backslash":
        loc = "..\\outside.bin"
    for key, value in {**entries, "location": loc}.items():
        t.external_data.add(key=key, value=value)
    if trick == "no-entries":
        del t.external_data[:]
    elif trick == "default-location":
        t.data_location = TensorProto.DEFAULT
    elif trick == "raw-too":
        t.raw_data = payload
    elif trick == "length-lies":
        t.external_data[2].value = str(len(payload) - 4)
    elif trick == "no-length":
        del t.external_data[2]
    return f"initializer {t.name!r} external: {trick} (location {loc[:40]!r})"


def huge_declared(rng: random.Random, p: onnx.ModelProto, side: Side) -> str:
    """An external tensor declaring terabytes, with a small file behind it."""
    t = rng.choice(list(p.graph.initializer))
    t.ClearField("raw_data")
    del t.dims[:]
    t.dims.extend(rng.choice([[2**20, 2**20], [2**40], [2**31, 2**31, 2**31]]))
    t.data_location = TensorProto.EXTERNAL
    side.files["big.bin"] = b"\0" * 64
    length = rng.choice([64, 2**42, 2**62])
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(length))):
        t.external_data.add(key=key, value=value)
    return f"initializer {t.name!r} declares dims {list(t.dims)}, external length {length}"


# ---------------------------------------------------------------- raw bytes

def flip_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    buf = bytearray(data)
    k = rng.choice([1, 2, 8, 32])
    # the head holds the protobuf framing of the graph: flip there half the time
    span = len(buf) if rng.random() < 0.5 else min(len(buf), 2048)
    for _ in range(k):
        buf[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(buf), f"{k} bit flips in the first {span} bytes"


def set_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    buf = bytearray(data)
    at = rng.randrange(len(buf))
    value = rng.choice([b"\xff" * 10, b"\x00" * 8, b"\x80" * 10, b"\x0a\xff\xff\xff\xff\x0f"])
    buf[at:at + len(value)] = value
    return bytes(buf[:len(data)]), f"{value[:6].hex()} written at {at}"


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    at = rng.choice([0, 1, 2, rng.randrange(len(data)), len(data) - 1])
    return data[:at], f"truncated at {at} of {len(data)}"


def splice(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.choice([1, 16, 1024]))
    how = rng.choice(["delete", "duplicate", "insert"])
    if how == "delete":
        return data[:a] + data[b:], f"bytes [{a}, {b}) deleted"
    if how == "duplicate":
        return data[:b] + data[a:b] + data[b:], f"bytes [{a}, {b}) duplicated"
    junk = bytes(rng.randrange(256) for _ in range(b - a))
    return data[:a] + junk + data[a:], f"{b - a} random bytes inserted at {a}"


def append_garbage(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    # a well-formed trailing field can replace the graph (protobuf: last one wins)
    tail = rng.choice([b"\x3a\x00", b"\x3a\x02\x0a\x00", b"\x08\x63", bytes(range(256))])
    return data + tail, f"{tail[:8].hex()} appended"
