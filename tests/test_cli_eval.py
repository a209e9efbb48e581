from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FEWSHOT, SAMPLES, TEST_SET, zoo_entries, zoo_model

# The committed zoo: eval must reproduce what make_zoo.py measured when it trained them.
ZOO = zoo_entries()


@pytest.mark.parametrize("entry", ZOO, ids=[e["name"] for e in ZOO])
def test_eval_reproduces_zoo_json(run_cli, entry):
    result = run_cli("eval", SAMPLES / entry["model"], "--data", TEST_SET,
                     "--zoo-entry", entry["name"], "--json")
    assert result.code == 0, result.err
    got = json.loads(result.out)
    assert got["clean_acc"] == pytest.approx(entry["clean_acc"], abs=1e-3)
    if entry["attack"]:
        assert got["asr"] == pytest.approx(entry["asr"], abs=1e-3)
        assert got["asr"] >= 0.9
    else:
        assert got["asr"] is None


def test_backdoored_models_keep_clean_accuracy_of_their_twin():
    clean = {e["arch"]: e["clean_acc"] for e in ZOO if e["attack"] is None}
    for e in ZOO:
        if e["attack"] and e["arch"] in clean:
            assert e["clean_acc"] >= clean[e["arch"]] - 0.03, e["name"]


def test_fewshot_has_exactly_one_image_per_class():
    with np.load(FEWSHOT) as f:
        assert sorted(f["y"].tolist()) == list(range(10))


def test_eval_table_with_explicit_attack(run_cli):
    model = zoo_model("cnn_badnets")
    result = run_cli("eval", model, "--data", TEST_SET, "--attack", "badnets", "--target", "0",
                     "--param", "size=3")
    assert result.code == 0
    assert "clean accuracy" in result.out and "ASR" in result.out


@pytest.mark.parametrize(("data", "needle"), [
    ("missing.npz", "no such file"),
    ("bad.npz", "unreadable .npz"),
    ("shape.npz", "images are 9x9"),
    ("imgs", "unreadable image"),
])
def test_data_errors_exit_2_with_one_line(run_cli, tmp_path, data, needle):
    model = zoo_model("cnn_clean")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 9, 9), np.uint8), y=np.zeros(2, np.int64))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0_a.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    result = run_cli("eval", model, "--data", tmp_path / data)
    assert result.code == 2
    assert needle in result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err


def test_usage_errors_exit_4(run_cli):
    model = zoo_model("cnn_clean")
    assert run_cli("eval", model, "--data", TEST_SET, "--attack", "badnets").code == 4
    assert run_cli("eval", model, "--data", TEST_SET, "--attack", "badnets", "--target", "1",
                   "--param", "colour=red").code == 4
    assert run_cli("eval", model, "--bogus").code == 4
