"""The loader under mutation fuzzing (benchmarks/fuzz_loader.py, benchmarks/fuzz_mutations.py):
a fixed budget in CI, the oracle itself, and the engine's determinism. A longer campaign:
`python benchmarks/fuzz_loader.py --mutants 3000` (benchmarks/README.md, "Loader fuzzing")."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from fuzz_files import Side, external_data  # noqa: E402
from fuzz_loader import DEFAULT_MODELS, FAST_POLICY, FEWSHOT, Run, campaign, judge  # noqa: E402
from fuzz_mutations import Mutant, load_bases, make_mutant  # noqa: E402


@pytest.fixture(scope="module")
def bases() -> dict[str, bytes]:
    return load_bases(list(DEFAULT_MODELS))


def test_mutants_replay_from_seed_and_index(bases):
    first = [make_mutant(bases, 3, i) for i in range(40)]
    assert first == [make_mutant(bases, 3, i) for i in range(40)]
    assert len({m.model for m in first}) >= 38  # a mutation nearly always changes the bytes
    assert [m.model for m in first] != [make_mutant(bases, 4, i).model for i in range(40)]
    kinds = {m.kind.split(".")[0] for m in first}
    assert kinds == {"proto", "bytes"}


def test_external_data_mutants_lay_out_their_files(bases, tmp_path):
    proto = onnx.ModelProto.FromString(bases["cnn_badnets"])
    for seed in range(1000):  # the first seed that draws this trick
        mutated, side = onnx.ModelProto(), Side()
        mutated.CopyFrom(proto)
        if "symlink-out" in external_data(random.Random(seed), mutated, side):
            break
    mutant = Mutant(0, seed, "cnn_badnets", "proto.external_data", "symlink-out",
                    mutated.SerializeToString(), side.files, side.links, side.dirs,
                    side.outside)
    path = mutant.write(tmp_path / "m")
    proto = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    link = tmp_path / "m" / "link.bin"
    assert link.is_symlink() and link.resolve() == (tmp_path / "outside.bin").resolve()


@pytest.mark.parametrize("run,kinds", [
    (Run("inspect", 2, "", "shapscan: error: SS101: not an ONNX model\n", 0.1), []),
    (Run("inspect", 0, "model  m.onnx\n", "", 0.1), []),
    (Run("inspect", 2, "", "Traceback (most recent call last):\n  File x\nKeyError: 1\n", 0.1),
     ["traceback", "output", "output"]),
    (Run("inspect", 2, "", "shapscan: error: SS115: node name 'x\\nTraceback (most recent "
         "call last):' contains a control character\n", 0.1), []),
    (Run("inspect", 2, "", "shapscan: internal error: KeyError: 'x' (rerun with --debug)\n",
         0.1), ["crash"]),
    (Run("inspect", 5, "", "shapscan: error: x\n", 0.1), ["exit"]),
    (Run("inspect", 2, "", "shapscan: error: a\nshapscan: error: b\n", 0.1), ["output"]),
    (Run("inspect", 2, "", "", 0.1), ["output"]),
    (Run("inspect", 0, "", "2026-12-06 [W:onnxruntime:, graph.cc:1] Removing initializer\n",
         0.1), ["output"]),
    (Run("inspect", 2, "", "shapscan: error: " + "a" * 5000 + "\n", 0.1), ["output"]),
    (Run("inspect", None, "", "", 30.0, hung=True), ["hang"]),
    (Run("inspect", None, "", "worker died (exit -11)", 1.0), ["crash"]),
])
def test_oracle_flags_each_broken_promise(run, kinds):
    assert [kind for kind, _ in judge(run, one_error_line=True)] == kinds


def test_fuzz_budget(tmp_path):
    """The CI campaign: up to 150 mutants or 15 s, every 15th also scanned. A violation
    names the mutant's seed and mutation: replay it with
    `python benchmarks/fuzz_loader.py --replay INDEX --seed 0 --keep DIR`."""
    result = campaign(mutants=150, seconds=15, seed=0, scan_every=15, subprocess_every=75,
                      root=tmp_path)
    assert result.tried >= 10
    assert sum(result.codes["inspect"].values()) == result.tried
    assert "scan" in result.codes
    assert not result.violations, "\n".join(str(v) for v in result.violations)


def test_scan_of_a_gemm_with_an_extreme_transpose_flag(run_cli, tmp_path):
    # found by the campaign (seed 0, mutant 1360): onnx and onnxruntime read transB = -2**63
    # as "transpose", the gradient rule's 1 - transB overflowed: an internal error mid-scan
    proto = onnx.ModelProto.FromString(load_bases(list(DEFAULT_MODELS))["cnn_badnets"])
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    next(a for a in gemm.attribute if a.name == "transB").i = -2**63
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    policy = tmp_path / "fast.toml"
    policy.write_text(FAST_POLICY)
    result = run_cli("scan", path, "--data", FEWSHOT, "--policy", policy, "--quiet")
    assert result.code in (0, 1), result.err
    assert result.err == ""

