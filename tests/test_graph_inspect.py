"""`shapscan inspect` through the real CLI entry point."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import SAMPLES, zoo_entries
from graph_builders import model, save
from onnx import helper

ZOO = zoo_entries()


@pytest.mark.parametrize("entry", ZOO[:1] + [e for e in ZOO if e["arch"] == "silunet"][:1],
                         ids=lambda e: e["name"])
def test_inspect_table_and_json(run_cli, entry):
    path = SAMPLES / entry["model"]
    table = run_cli("inspect", path)
    assert table.code == 0, table.err
    assert hashlib.sha256(path.read_bytes()).hexdigest() in table.out
    assert f"{entry['channels']:,} channels" in table.out
    assert "findings: none" in table.out
    result = run_cli("inspect", path, "--json")
    assert result.code == 0, result.err
    got = json.loads(result.out)
    assert got["channels_total"] == entry["channels"]
    assert got["opset"] == 17 and got["size_bytes"] == path.stat().st_size
    assert [i["name"] for i in got["inputs"]] == ["image"]
    assert [o["name"] for o in got["outputs"]] == ["logits"]
    assert got["findings"] == []
    assert all(la["channels"] > 0 for la in got["layers"])


def test_inspect_without_activations_is_inconclusive(run_cli, tmp_path):
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["logits"], name="fc", transB=1)]
    w = helper.make_tensor("w", 1, [5, 3], [0.1] * 15)
    path = save(model(nodes, [w]), tmp_path / "linear.onnx")
    result = run_cli("inspect", path)
    assert result.code == 3
    assert result.err.strip().count("\n") == 0 and "SS204" in result.err
    assert "Traceback" not in result.err
    assert "0 activation layers" in result.out
