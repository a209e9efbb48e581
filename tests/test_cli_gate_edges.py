"""The gate at its edges (issue 23): wrong-size images are refused unless --resize asks,
`--out` always says what it got, and exit codes for Ctrl-C and paths that are not there."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FEWSHOT, ROOT, zoo_model
from graph_builders import conv_relu_model, save
from PIL import Image
from test_cli_outputs import planted

import scanner.api

# few steps and no second view: cnn_clean stays clean (every anomaly index below 1) in
# seconds, enough to see what --out does with a clean verdict
QUICK = "[detection]\nreverse_steps = 3\nsynthesised_view = false\n"
SCHEMA = json.loads((ROOT / "rules" / "schemas" / "report.schema.json").read_text())


def quick_policy(tmp_path: Path) -> Path:
    policy = tmp_path / "quick.toml"
    policy.write_text(QUICK)
    return policy


def class_folders(root: Path, size: int) -> Path:
    """The 10 few-shot images as PNGs in class folders, at `size` x `size` (issue 23's
    newcomer saved them at 64x64)."""
    shot = np.load(FEWSHOT)
    for x, y in zip(shot["x"], shot["y"], strict=True):
        folder = root / str(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(x.squeeze())
        (image.resize((size, size), Image.BILINEAR) if size != 28 else image).save(
            folder / "a.png")
    return root


def valid_report(path: Path) -> dict:
    doc = json.loads(path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    return doc


# ------------------------------------------------------------------ 1. wrong-size images


def test_a_folder_of_wrong_size_images_is_refused_like_the_npz(run_cli, tmp_path):
    # before: resized silently, and this clean model came out BACKDOOR towards class 8
    big, model = class_folders(tmp_path / "big", 64), zoo_model("cnn_clean")
    out, report = tmp_path / "safe.onnx", tmp_path / "r.json"
    result = run_cli("scan", model, "--data", big, "--out", out, "--report", report, "-q")
    assert result.code == 2, result.out + result.err
    assert result.err == (f"shapscan: {model}: {big}: images are 64x64, the model expects "
                          "28x28; resize them to 28x28, or give --resize to have them resized "
                          "(bilinear)\n")
    assert not out.exists()
    scanned = valid_report(report)["results"][0]
    assert scanned["verdict"] == "error" and scanned["output"]["written"] is False
    # the .npz says the same, and says how to go on
    shot = np.load(FEWSHOT)
    padded = tmp_path / "padded.npz"
    np.savez(padded, x=np.pad(shot["x"], ((0, 0), (2, 2), (2, 2), (0, 0))), y=shot["y"])
    result = run_cli("scan", zoo_model("cnn_clean"), "--data", padded, "-q")
    assert result.code == 2 and "images are 32x32, the model expects 28x28" in result.err
    assert "--resize" in result.err


def test_mixed_sizes_name_every_size_and_the_first_file(run_cli, tmp_path):
    data = class_folders(tmp_path / "mixed", 28)
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(data / "3" / "b.png")
    result = run_cli("eval", zoo_model("cnn_clean"), "--data", data)
    assert result.code == 2 and result.err.count("\n") == 1
    assert (f"1 of 11 images are 40x30 (first: {data / '3' / 'b.png'}), the model expects "
            "28x28") in result.err


def test_resize_resizes_and_the_report_says_so(run_cli, tmp_path):
    big = class_folders(tmp_path / "big", 64)
    report, sarif = tmp_path / "r.json", tmp_path / "r.sarif"
    # CLP (data-free pruning, fast) loads and checks the --data images like every method
    result = run_cli("scan", zoo_model("cnn_clean"), "--data", big, "--resize", "--method",
                     "clp", "--report", report, "--sarif", sarif)
    assert result.code == 0, result.err
    assert ("[LOW] SS208 10 of 10 clean images were resized from 64x64 to 28x28 (--resize, "
            "bilinear): the verdict rests on resized images") in result.out
    [finding] = [f for f in valid_report(report)["results"][0]["findings"]
                 if f["rule_id"] == "SS208"]
    assert finding["details"] == {"count": 10, "sizes": {"64x64": 10}}
    assert "SS208" in [r["ruleId"] for r in json.loads(sarif.read_text())["runs"][0]["results"]]
    # images of the model's size are never resized, --resize or not
    exact = class_folders(tmp_path / "exact", 28)
    result = run_cli("scan", zoo_model("cnn_clean"), "--data", exact, "--resize", "--method",
                     "clp", "--report", report, "-q")
    assert result.code == 0
    assert "SS208" not in [f["rule_id"] for f in valid_report(report)["results"][0]["findings"]]


def test_eval_refuses_wrong_sizes_and_resizes_on_request(run_cli, tmp_path):
    big = class_folders(tmp_path / "big", 64)
    result = run_cli("eval", zoo_model("cnn_clean"), "--data", big)
    assert result.code == 2 and "images are 64x64, the model expects 28x28" in result.err
    result = run_cli("eval", zoo_model("cnn_clean"), "--data", big, "--resize")
    assert result.code == 0, result.err
    rows = dict(line.split("  ", 1) for line in result.out.splitlines())
    assert rows["resized"].strip() == "10 of 10 images, from 64x64 (--resize)"
    got = json.loads(run_cli("eval", zoo_model("cnn_clean"), "--data", big, "--resize",
                             "--json").out)
    assert got["resized"] == {"64x64": 10} and got["images"] == 10
    exact = json.loads(run_cli("eval", zoo_model("cnn_clean"), "--data", FEWSHOT, "--json").out)
    assert exact["resized"] == {}


def test_resize_without_data_is_a_usage_error(run_cli):
    result = run_cli("scan", zoo_model("cnn_clean"), "--data-free", "--resize", "-q")
    assert result.code == 4 and "--resize resizes the --data images" in result.err


# ------------------------------------------------------------------ 2. --out on every verdict


def test_a_clean_scan_writes_an_unchanged_copy_and_says_so(run_cli, tmp_path):
    model = zoo_model("cnn_clean")
    out, report, html = tmp_path / "safe.onnx", tmp_path / "r.json", tmp_path / "r.html"
    result = run_cli("scan", model, "--data", FEWSHOT, "--policy", quick_policy(tmp_path),
                     "--out", out, "--report", report, "--html", html)
    assert result.code == 0, result.out + result.err
    assert out.read_bytes() == model.read_bytes()
    assert f"model copied unchanged to {out} (found clean: nothing to repair)" in result.out
    scanned = valid_report(report)["results"][0]
    assert scanned["verdict"] == "clean"
    assert scanned["output"] == {"path": str(out), "written": True, "kind": "unchanged-copy",
                                 "reason": None}
    assert f"model copied unchanged to <code>{out}</code>" in html.read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_a_clean_model_with_external_data_is_copied_as_one_file(run_cli, tmp_path):
    source = tmp_path / "vendor" / "model.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(str(zoo_model("cnn_clean"))), str(source), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    out = tmp_path / "deploy" / "safe.onnx"
    out.parent.mkdir()
    result = run_cli("scan", source, "--data", FEWSHOT, "--policy", quick_policy(tmp_path),
                     "--out", out, "-q")
    assert result.code == 0, result.err
    copied = onnx.load(str(out), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t)
                   for t in copied.graph.initializer)
    original = onnx.load(str(zoo_model("cnn_clean")))
    assert copied.graph == original.graph  # the same graph and weights, now in one file
    x = np.load(FEWSHOT)["x"].transpose(0, 3, 1, 2).astype(np.float32) / 255
    logits = [ort.InferenceSession(str(p)).run(None, {"image": x})[0]
              for p in (out, zoo_model("cnn_clean"))]
    np.testing.assert_array_equal(*logits)


@pytest.mark.parametrize(("case", "code", "reason"), [
    ("refused", 2, "the model was refused or could not be scanned"),
    ("inconclusive", 3, "the scan was inconclusive"),
])
def test_a_scan_that_passes_nothing_writes_nothing_and_says_so(run_cli, tmp_path, case, code,
                                                               reason):
    if case == "refused":
        model = tmp_path / "broken.onnx"
        model.write_bytes(b"not a model")
        extra: tuple[str, ...] = ()
    else:  # --scale 255 on a [0, 1] model: it misreads its images (SS206)
        model, extra = zoo_model("cnn_badnets"), ("--scale", "255")
    out, report, html = tmp_path / "safe.onnx", tmp_path / "r.json", tmp_path / "r.html"
    result = run_cli("scan", model, "--data", FEWSHOT, "--out", out, "--report", report,
                     "--html", html, *extra)
    assert result.code == code, result.out + result.err
    assert f"  nothing written to {out}: {reason}" in result.out
    assert f"nothing written to <code>{out}</code>: {reason}" in html.read_text()
    assert not out.exists()
    assert valid_report(report)["results"][0]["output"] == {
        "path": str(out), "written": False, "kind": None, "reason": reason}


def test_a_baseline_that_zeroes_nothing_writes_nothing(run_cli, tmp_path):
    out = tmp_path / "safe.onnx"
    result = run_cli("scan", save(conv_relu_model(), tmp_path / "m.onnx"), "--method", "clp",
                     "--out", out)
    assert result.code == 0 and not out.exists()
    assert f"nothing written to {out}: --method clp zeroed no channel" in result.out


def test_a_copy_of_a_model_changed_during_the_scan_is_refused(tmp_path):
    from report_fixtures import clean_result

    from scanner.commands.outputs import deliver_model

    source = save(conv_relu_model(), tmp_path / "m.onnx")
    result = clean_result(str(source))
    result.model.sha256 = "0" * 64  # what was scanned is not what is on disk now
    output = deliver_model(result, source, tmp_path / "safe.onnx")
    assert not output.written and "changed on disk during the scan" in output.reason
    assert result.errors == [output.reason] and not (tmp_path / "safe.onnx").exists()


# ------------------------------------------------------------------ 6. exit codes at the edges


@pytest.mark.parametrize("command", ["scan", "eval", "inspect"])
def test_a_missing_model_is_a_usage_error_said_once(run_cli, tmp_path, command):
    missing = tmp_path / "missing.onnx"
    extra = ("--data", str(FEWSHOT)) if command != "inspect" else ()
    result = run_cli(command, missing, *extra)
    assert result.code == 4
    assert result.out == ""
    assert result.err == f"shapscan: error: {missing}: no such file or folder\n"


@pytest.mark.parametrize("command", ["scan", "eval"])
def test_a_missing_data_path_is_a_usage_error_before_any_model_is_loaded(
        run_cli, tmp_path, monkeypatch, command):
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before --data was checked")

    monkeypatch.setattr(scanner.api, "load_model", never)
    missing = tmp_path / "few_shot"
    result = run_cli(command, zoo_model("cnn_clean"), "--data", missing)
    assert result.code == 4
    assert result.err == f"shapscan: error: --data: {missing}: no such file or folder\n"


def interrupt_at(monkeypatch, name: str) -> None:
    """Ctrl-C while the model called `name` loads: the real loader for the others."""
    load = scanner.api.load_model

    def loading(path, *args, **kwargs):
        if Path(path).name == name:
            raise KeyboardInterrupt
        return load(path, *args, **kwargs)

    monkeypatch.setattr(scanner.api, "load_model", loading)


def test_ctrl_c_exits_130(run_cli, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, "m.onnx")
    result = run_cli("scan", planted(tmp_path / "m.onnx"), "--method", "clp", "-q")
    assert result.code == 130
    assert result.err.strip().splitlines()[-1].startswith("shapscan: interrupted")
    assert "Traceback" not in result.err


def test_ctrl_c_outside_a_scan_exits_130_too(run_cli, tmp_path, monkeypatch):
    # click turns KeyboardInterrupt into Abort: that is not a refused model (2)
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("scanner.commands.inspect.load_model", interrupted)
    result = run_cli("inspect", planted(tmp_path / "m.onnx"))
    assert result.code == 130 and result.err.strip() == "shapscan: interrupted"


def test_an_interrupted_folder_scan_writes_what_finished_marked_partial(run_cli, tmp_path,
                                                                       monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b", "c"):
        planted(models / f"{name}.onnx")
    out, html = tmp_path / "out", tmp_path / "html"
    report, sarif = tmp_path / "r.json", tmp_path / "r.sarif"
    interrupt_at(monkeypatch, "b.onnx")
    result = run_cli("scan", models, "--method", "clp", "--out", out, "--html", html,
                     "--report", report, "--sarif", sarif, "-q")
    assert result.code == 130
    assert result.err == (f"shapscan: interrupted while scanning {models / 'b.onnx'} (model 2 "
                          f"of 3); --report {report} and --sarif {sarif} hold the 1 model that "
                          "finished, marked partial\n")
    doc = valid_report(report)
    assert doc["partial"] is True and doc["gate"]["exit_code"] == 130
    assert [Path(r["model_path"]).name for r in doc["results"]] == ["a.onnx"]
    assert doc["not_scanned"] == [str(models / "b.onnx"), str(models / "c.onnx")]
    run = json.loads(sarif.read_text())["runs"][0]
    invocation = run["invocations"][0]
    assert invocation["executionSuccessful"] is False and invocation["exitCode"] == 130
    assert run["properties"]["partial"] is True
    assert "interrupted: 1 of 3 models scanned" in \
        invocation["toolExecutionNotifications"][-1]["message"]["text"]
    # the finished model's own outputs stay; nothing of the interrupted one
    assert sorted(p.name for p in out.iterdir()) == ["a.sanitized.onnx"]
    assert sorted(p.name for p in html.iterdir()) == ["a.html"]


def test_a_finished_scan_is_not_partial(run_cli, tmp_path):
    report = tmp_path / "r.json"
    result = run_cli("scan", planted(tmp_path / "m.onnx"), "--method", "clp", "--report",
                     report, "-q")
    assert result.code == 0
    doc = valid_report(report)
    assert doc["partial"] is False and "not_scanned" not in doc
