"""Deterministic mutants of the sample models, for fuzzing the loader (benchmarks/fuzz_loader.py,
tests/test_fuzz_loader.py).

`make_mutant(bases, campaign_seed, index)` is a pure function of its arguments: the same
seed and index give the same bytes, so a violation is replayed from the two numbers it
prints (with the same version of these modules). Three families: protobuf field mutations
(fuzz_graph.py: graph structure, attributes, shapes and dtypes, opsets, domains, names,
metadata, size; fuzz_files.py: tensor storage and external-data tricks with files and links
beside the model) and raw byte mutations of the serialized file (fuzz_files.py). No torch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fuzz_files as files
import fuzz_graph as graph
import onnx
from fuzz_files import MODEL_NAME, Side

ProtoMutator = Callable[[random.Random, onnx.ModelProto, Side], str]
ByteMutator = Callable[[random.Random, bytes], tuple[bytes, str]]


@dataclass
class Mutant:
    index: int
    seed: int
    base: str  # the sample model's stem
    kind: str  # the mutator family and name
    description: str
    model: bytes
    files: dict[str, bytes] = field(default_factory=dict)  # beside the model
    links: dict[str, str] = field(default_factory=dict)  # name -> link target as written
    dirs: list[str] = field(default_factory=list)
    outside: dict[str, bytes] = field(default_factory=dict)  # in the folder's parent

    def label(self) -> str:
        return f"mutant #{self.index} (seed {self.seed}, {self.base}, {self.kind}): " \
               f"{self.description}"

    def write(self, folder: Path) -> Path:
        """Lay the mutant out in `folder` (created); returns the model's path."""
        folder.mkdir(parents=True)
        for name, payload in self.outside.items():
            (folder.parent / name).write_bytes(payload)
        for name in self.dirs:
            (folder / name).mkdir(parents=True, exist_ok=True)
        for name, payload in self.files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(payload)
        for name, target in self.links.items():
            (folder / name).symlink_to(target)
        path = folder / MODEL_NAME
        path.write_bytes(self.model)
        return path


PROTO_MUTATORS: dict[str, ProtoMutator] = {f.__name__: f for f in (
    graph.drop_node, graph.duplicate_node, graph.retype_node, graph.rewire_input,
    graph.rename_output, graph.graph_io_lie, graph.cycle, graph.shuffle_nodes, graph.deep_chain,
    graph.nested_subgraphs, graph.duplicate_graph, graph.huge_op, graph.attr_type_lie,
    graph.attr_value_lie, graph.negative_kernel, graph.attr_drop_or_add, graph.shape_lie,
    graph.dtype_lie, graph.opset_lie, graph.custom_domain, graph.odd_names, graph.metadata_lie,
    files.init_dims_lie, files.data_fields_lie, files.external_data, files.huge_declared)}
# external data has some 30 tricks of its own: drawn as often as four other mutators
WEIGHTS = {"external_data": 4}

BYTE_MUTATORS: dict[str, ByteMutator] = {f.__name__: f for f in (
    files.flip_bytes, files.set_bytes, files.truncate, files.splice, files.append_garbage)}


# ---------------------------------------------------------------- the engine

def load_bases(paths: list[Path]) -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in paths}


def mutant_seed(campaign_seed: int, index: int) -> int:
    return campaign_seed * 1_000_003 + index


def make_mutant(bases: dict[str, bytes], campaign_seed: int, index: int) -> Mutant:
    seed = mutant_seed(campaign_seed, index)
    rng = random.Random(seed)
    base = rng.choice(sorted(bases))
    data = bases[base]
    family = rng.choices(["proto", "bytes"], weights=[3, 1])[0]
    if family == "bytes":
        name = rng.choice(sorted(BYTE_MUTATORS))
        model, description = BYTE_MUTATORS[name](rng, data)
        return Mutant(index, seed, base, f"bytes.{name}", description, model)
    proto = onnx.ModelProto.FromString(data)
    side = Side()
    # one mutation, sometimes two or three stacked: refusals that each pass alone can
    # interact (a shape lie on a node another mutation retyped)
    count = rng.choices([1, 2, 3], weights=[6, 2, 1])[0]
    kinds = sorted(PROTO_MUTATORS)
    names = rng.choices(kinds, weights=[WEIGHTS.get(k, 1) for k in kinds], k=count)
    described = []
    for name in names:
        try:
            described.append(PROTO_MUTATORS[name](rng, proto, side))
        except Exception as exc:  # nothing left to mutate (an earlier drop), or too deep
            # for protobuf to build
            described.append(f"{name} skipped ({type(exc).__name__})")
    model = graph.nest(proto, side.nest) if side.nest else proto.SerializeToString()
    return Mutant(index, seed, base, "proto." + "+".join(names), "; ".join(described), model,
                  side.files, side.links, side.dirs, side.outside)
