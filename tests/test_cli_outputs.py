"""`shapscan scan` output paths: a gate never overwrites its input, never leaves half its
outputs, and refuses an unusable output path up front (exit 4, one line)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from graph_builders import conv_relu_model, head, model, save, tensor
from onnx import helper, numpy_helper

CHANNELS = 16


def planted(path: Path, layer: str = "r") -> Path:
    """image -> Conv(3->16) -> Relu (output `layer`) -> head, channel 5's kernel 50x the
    others: CLP (the data-free `--method clp`, fast) zeroes it, so `--out` gets a model."""
    w = numpy_helper.to_array(tensor("w", [CHANNELS, 3, 3, 3])).copy()
    w[5] *= 50
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1] * 4,
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], [layer], name="relu")]
    hn, hi = head(layer, CHANNELS)
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"), tensor("b", [CHANNELS])]
    return save(model(nodes + hn, inits + hi), path)


def clp(run_cli, *args: object):
    return run_cli("scan", *args, "--method", "clp", "--quiet")


def assert_refused(result, needle: str) -> None:
    assert result.code == 4, result.out + result.err
    assert needle in result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err, result.err


def test_a_repaired_model_is_written_where_out_says(run_cli, tmp_path):
    out = tmp_path / "safe.onnx"
    assert clp(run_cli, planted(tmp_path / "m.onnx"), "--out", out).code == 0
    assert out.is_file()


@pytest.mark.parametrize("flag", ["--out", "--report", "--sarif", "--html"])
@pytest.mark.parametrize("spelling", ["same", "relative", "symlink"])
def test_an_output_naming_the_input_model_is_refused(run_cli, tmp_path, monkeypatch, flag,
                                                     spelling):
    source = planted(tmp_path / "m.onnx")
    original = source.read_bytes()
    target: Path | str = source
    if spelling == "relative":
        monkeypatch.chdir(tmp_path)
        target = "./sub/../m.onnx"
        (tmp_path / "sub").mkdir()
    elif spelling == "symlink":
        (tmp_path / "link.onnx").symlink_to(source)
        source = tmp_path / "link.onnx"
    before = set(tmp_path.rglob("*"))
    assert_refused(clp(run_cli, source, flag, target), "input model")
    assert (tmp_path / "m.onnx").read_bytes() == original
    assert set(tmp_path.rglob("*")) == before


def test_a_report_naming_a_refused_input_model_is_refused_too(run_cli, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    assert_refused(clp(run_cli, broken, "--report", broken), "input model")
    assert broken.read_bytes() == b"not a model"


@pytest.mark.parametrize(("flag", "name"), [("--out", "m.sanitized.onnx"), ("--html", "m.html")])
@pytest.mark.parametrize("folder", ["existing", "trailing-separator"])
def test_an_output_naming_a_folder_gets_one_file_per_model_in_it(run_cli, tmp_path, flag, name,
                                                                 folder):
    target = tmp_path / "outputs"
    if folder == "existing":
        target.mkdir()
    result = clp(run_cli, planted(tmp_path / "m.onnx"), flag,
                 str(target) + (os.sep if folder != "existing" else ""))
    assert result.code == 0, result.err
    assert target.is_dir() and [p.name for p in target.iterdir()] == [name]


def test_the_readme_ci_step_with_one_model_in_the_folder(run_cli, tmp_path, monkeypatch):
    # shapscan scan models/ ... --out repaired/ --sarif shapscan.sarif --quiet
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    planted(tmp_path / "models" / "only.onnx")
    result = clp(run_cli, "models/", "--out", "repaired/", "--sarif", "shapscan.sarif")
    assert result.code == 0, result.err
    assert (tmp_path / "repaired" / "only.sanitized.onnx").is_file()
    assert json.loads((tmp_path / "shapscan.sarif").read_text())["version"] == "2.1.0"


def test_a_second_scan_into_the_models_folder_is_refused_and_says_why(run_cli, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    planted(models / "a.onnx")
    planted(models / "b.onnx")
    assert clp(run_cli, models, "--out", models).code == 0
    before = sorted(p.name for p in models.iterdir())
    assert before == ["a.onnx", "a.sanitized.onnx", "b.onnx", "b.sanitized.onnx"]
    # the repairs are models of the folder too: scanned, never skipped by their name, so
    # a.onnx's repair would overwrite an input
    assert_refused(clp(run_cli, models, "--out", models), "write repairs to another folder")
    assert sorted(p.name for p in models.iterdir()) == before
    report = tmp_path / "all.json"
    assert clp(run_cli, models, "--out", tmp_path / "second", "--report", report).code == 0
    scanned = [Path(r["model_path"]).name for r in json.loads(report.read_text())["results"]]
    assert scanned == before


def test_a_folder_output_is_created_only_inside_an_existing_folder(run_cli, tmp_path):
    assert_refused(clp(run_cli, planted(tmp_path / "m.onnx"), "--out",
                       f"{tmp_path}/no/repaired/"), "does not exist")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("flag", ["--out", "--report", "--sarif", "--html"])
@pytest.mark.parametrize("where", ["folder", "unwritable", "missing-folder"])
def test_an_unusable_output_path_is_refused_before_the_scan(run_cli, tmp_path, flag, where):
    (tmp_path / "dir").mkdir()
    target = {"folder": tmp_path / "dir",
              "unwritable": Path("/proc/r.json"),
              "missing-folder": tmp_path / "none" / "r.json"}[where]
    if where == "folder" and flag in ("--out", "--html"):
        (tmp_path / "dir" / "m.html").mkdir()  # an existing folder is the output folder:
        (tmp_path / "dir" / "m.sanitized.onnx").mkdir()  # its model's file is a folder
    source = planted(tmp_path / "m.onnx")
    before = set(tmp_path.rglob("*"))
    assert_refused(clp(run_cli, source, flag, target), flag)
    assert set(tmp_path.rglob("*")) == before


def test_report_and_sarif_ending_with_a_separator_are_refused(run_cli, tmp_path):
    assert_refused(clp(run_cli, planted(tmp_path / "m.onnx"), "--report", f"{tmp_path}/r/"),
                   "folder")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("first", "second"), [("--report", "--sarif"), ("--report", "--html"),
                                               ("--sarif", "--out"), ("--html", "--out")])
def test_two_outputs_naming_one_file_are_refused(run_cli, tmp_path, first, second):
    source = planted(tmp_path / "m.onnx")
    before = set(tmp_path.rglob("*"))
    target = tmp_path / "same"
    assert_refused(clp(run_cli, source, first, target, second, target), "same")
    assert set(tmp_path.rglob("*")) == before


def test_models_with_one_name_in_two_folders_get_numbered_outputs(run_cli, tmp_path):
    first, second = tmp_path / "s1", tmp_path / "s2"
    first.mkdir()
    second.mkdir()
    planted(first / "model.onnx")
    save(conv_relu_model(), second / "model.onnx")  # CLP zeroes nothing in this one
    html, out = tmp_path / "html", tmp_path / "out"
    html.mkdir()
    out.mkdir()
    result = clp(run_cli, first / "model.onnx", second / "model.onnx", "--html", html,
                 "--out", out, "--report", tmp_path / "r.json")
    assert result.code == 0, result.err
    assert sorted(p.name for p in html.iterdir()) == ["model-1.html", "model-2.html"]
    assert str(second / "model.onnx") in (html / "model-2.html").read_text()
    assert [p.name for p in out.iterdir()] == ["model-1.sanitized.onnx"]
    scanned = json.loads((tmp_path / "r.json").read_text())["results"]
    assert scanned[0]["repair"]["output_path"] == str(out / "model-1.sanitized.onnx")


def test_outputs_get_the_mode_the_umask_gives(run_cli, tmp_path):
    names = ("safe.onnx", "r.json", "r.sarif", "r.html")
    out, report, sarif, html = (tmp_path / n for n in names)
    old = os.umask(0o022)
    try:
        result = clp(run_cli, planted(tmp_path / "m.onnx"), "--out", out, "--report", report,
                     "--sarif", sarif, "--html", html)
    finally:
        os.umask(old)
    assert result.code == 0, result.err
    assert {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in names} == \
        dict.fromkeys(names, 0o644)


def test_a_model_lacking_the_layers_named_is_an_error_and_every_report_is_written(run_cli,
                                                                               tmp_path):
    first = save(conv_relu_model(), tmp_path / "a.onnx")  # its activation layer is "r"
    second = planted(tmp_path / "b.onnx", layer="q")
    (tmp_path / "html").mkdir()
    report = tmp_path / "html" / "r.json"
    result = clp(run_cli, first, second, "--layers", "r", "--html", tmp_path / "html",
                 "--report", report)
    assert result.code == 2, result.err
    assert "--layers" in result.err
    scanned = json.loads(report.read_text())["results"]
    assert [r["verdict"] for r in scanned] == ["repair-only", "error"]
    assert "--layers" in scanned[1]["errors"][0]
    assert (tmp_path / "html" / "b.html").is_file()
    # one model: still a usage error
    assert_refused(clp(run_cli, second, "--layers", "r"), "--layers")


def test_several_models_with_out_naming_a_file_say_it_is_a_file(run_cli, tmp_path):
    (tmp_path / "taken").write_text("")
    assert_refused(clp(run_cli, planted(tmp_path / "a.onnx"), planted(tmp_path / "b.onnx"),
                       "--out", tmp_path / "taken"), "is a file, not a folder")


@pytest.mark.parametrize("flag", ["--report", "--sarif", "--out", "--html"])
def test_an_output_naming_the_data_or_the_policy_file_is_refused(run_cli, tmp_path, flag):
    model = save(conv_relu_model(), tmp_path / "m.onnx")
    policy = tmp_path / "p.toml"
    policy.write_text((Path("rules/policies/default.toml")).read_text())
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((2, 8, 8, 3), np.uint8), y=np.array([0, 1]))
    for victim, what in ((data, "the --data file"), (policy, "the --policy file")):
        before = victim.read_bytes()
        result = run_cli("scan", model, "--data", data, "--policy", policy, "-q", flag, victim)
        assert result.code == 4 and f"is {what} {victim}; refusing" in result.err
        assert victim.read_bytes() == before


def test_a_folder_scan_finds_every_case_of_onnx_and_each_model_once(run_cli, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    planted(models / "a.onnx")
    planted(models / "VENDOR.ONNX")  # a case-sensitive glob would pass over it
    report = tmp_path / "r.json"
    result = clp(run_cli, models, models / "a.onnx", models, "--report", report)
    assert result.code == 0, result.err
    scanned = [Path(r["model_path"]).name for r in json.loads(report.read_text())["results"]]
    assert scanned == ["VENDOR.ONNX", "a.onnx"]
