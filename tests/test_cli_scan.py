"""`shapscan scan` end to end on real zoo models, and its error paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, TEST_SET, zoo_model
from graph_builders import conv_relu_model, save
from onnx import TensorProto, helper

from scanner.errors import Inconclusive


def test_backdoored_model_is_flagged_repaired_and_reports_written(run_cli, tmp_path):
    model = zoo_model("cnn_badnets")
    out, report, sarif, html = (tmp_path / n for n in ("safe.onnx", "r.json", "r.sarif", "r.html"))
    # --keep-incomplete: the repaired model is written whether or not the plan reached its
    # target (the report says which), so what it does to the real trigger is measured
    result = run_cli("scan", model, "--data", FEWSHOT, "--out", out, "--report", report,
                     "--sarif", sarif, "--html", html, "--quiet", "--keep-incomplete")
    assert result.code == 1, result.err
    data = json.loads(report.read_text())
    scanned = data["results"][0]
    assert scanned["verdict"] == "backdoor"
    assert scanned["detection"]["flagged_targets"][0] == 0
    assert {f["rule_id"] for f in scanned["findings"]} >= {"SS201", "SS301"}
    status = scanned["repair"]["status"]
    assert (status == "incomplete") == ("SS305" in {f["rule_id"] for f in scanned["findings"]})
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["shapscan.repair"] == status
    assert json.loads(sarif.read_text())["version"] == "2.1.0"
    assert "<svg" in html.read_text()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    # the repaired model: the real trigger stops working (0.6 % measured, from 99.5 %), for
    # some clean accuracy (zeroing 22 channels, then recovery: 91.0 -> 85.5 %)
    before = json.loads(run_cli("eval", model, "--data", TEST_SET, "--zoo-entry",
                                "cnn_badnets", "--json").out)
    after = json.loads(run_cli("eval", out, "--data", TEST_SET, "--zoo-entry", "cnn_badnets",
                               "--json").out)
    assert before["asr"] > 0.95 and after["asr"] < 0.03
    assert after["clean_acc"] > before["clean_acc"] - 0.07


@pytest.mark.slow
def test_data_free_scan_flags_repairs_and_says_clean_data_was_synthesised(run_cli, tmp_path):
    # no images at all: synthesis, reverse, Shapley and pruning on what the model remembers
    out, report = tmp_path / "safe.onnx", tmp_path / "r.json"
    # --keep-incomplete: class 6's surviving trigger (SS304) makes the repair incomplete,
    # and the repaired model is measured below
    result = run_cli("scan", zoo_model("cnn_trojan"), "--data-free", "--out", out,
                     "--report", report, "--quiet", "--keep-incomplete")
    assert result.code == 1, result.err
    scanned = json.loads(report.read_text())["results"][0]
    assert scanned["detection"]["flagged_targets"][0] == 8
    repaired = [f for f in scanned["findings"] if f["rule_id"] == "SS301"]
    assert repaired and "synthesised inputs" in repaired[0]["message"]
    # class 6 is flagged too (anomaly index 3.2); the repair, planned for 8, leaves its
    # reversed trigger working (87% measured), and the report says so (a data-free scan
    # zeroes alone: recovery on synthesised inputs gave this backdoor back, 37 % ASR)
    assert scanned["detection"]["flagged_targets"][1:] == [6]
    [missed] = [f for f in scanned["findings"] if f["rule_id"] == "SS304"]
    assert missed["location"] == "class 6" and "synthesised images" in missed["message"]
    after = json.loads(run_cli("eval", out, "--data", TEST_SET, "--zoo-entry", "cnn_trojan",
                               "--json").out)
    assert after["asr"] < 0.10  # 1.00 before; 0.007 measured
    assert after["clean_acc"] > 0.91 - 0.08  # 0.853 measured: data-free costs accuracy


def test_clean_model_passes_the_gate_and_out_gets_it_unchanged(run_cli, tmp_path):
    model = zoo_model("cnn_clean")
    out = tmp_path / "safe.onnx"
    result = run_cli("scan", model, "--data", FEWSHOT, "--out", out, "--json")
    assert result.code == 0, result.out + result.err
    scanned = json.loads(result.out)["results"][0]
    assert scanned["verdict"] == "clean"
    # a pipeline deploys --out whatever the verdict: a clean model is its own safe copy
    assert out.read_bytes() == model.read_bytes()
    assert scanned["output"]["kind"] == "unchanged-copy"
    # the few-shot view flagged nothing, so the synthesised view looked too: both clean
    views = scanned["detection"]["views"]
    assert [v["inputs"] for v in views] == ["few-shot", "synthesised"]
    assert all(v["decision_score"] < 1 for v in views)


@pytest.mark.slow
def test_blended_backdoor_hidden_from_the_few_shot_view_is_found_on_synthesised_inputs(
        run_cli, tmp_path):
    # resnet_blended's target is no easier to reach from 1 real image per class than an
    # honest class; on inputs synthesised from the model it stands out
    out, report = tmp_path / "safe.onnx", tmp_path / "r.json"
    result = run_cli("scan", zoo_model("resnet_blended"), "--data", FEWSHOT, "--out", out,
                     "--report", report, "--quiet")
    assert result.code == 1, result.err
    scanned = json.loads(report.read_text())["results"][0]
    detection = scanned["detection"]
    assert detection["flagged_targets"][0] == 3
    scores = {v["inputs"]: v["decision_score"] for v in detection["views"]}
    assert scores["few-shot"] < 1 < scores["synthesised"]
    flagged = [f for f in scanned["findings"] if f["rule_id"] == "SS201"]
    assert "found on inputs synthesised from the model" in flagged[0]["message"]
    after = json.loads(run_cli("eval", out, "--data", TEST_SET, "--zoo-entry",
                               "resnet_blended", "--json").out)
    assert after["asr"] < 0.05  # 0.999 before; 0.005 measured
    assert after["clean_acc"] > 0.908 - 0.06  # 0.883 measured
    # few channels zeroed on the ResNet: 16 of 1,136 measured (then recovery); 9 when
    # zeroing alone had the 2 % budget
    assert scanned["repair"]["pruned_fraction"] <= 0.02
    # the report names the channels it gave back, none of them among the zeroed ones
    back = {(c["layer"], c["channel"]) for c in scanned["repair"]["given_back"]}
    assert back and not back & {(c["layer"], c["channel"]) for c in scanned["repair"]["pruned"]}


def no_activation_model(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"])], "g", [x], [y])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                tmp_path / "flat.onnx")


@pytest.mark.parametrize(("args", "code", "needle"), [
    (("missing.onnx", "--data", str(FEWSHOT)), 4, "missing.onnx: no such file or folder"),
    (("{clean}",), 4, "--data"),
    (("{clean}", "--data", str(FEWSHOT), "--data-free"), 4, "exclude"),
    (("{clean}", "--data", str(FEWSHOT), "--policy", "nonexistent.toml"), 4, "policy"),
    (("{clean}", "--data", "{tmp}/none.npz"), 4, "--data: {tmp}/none.npz: no such file"),
    (("{clean}", "--data", str(FEWSHOT), "--out", "{tmp}/no/dir/safe.onnx"), 4, "does not exist"),
    (("{flat}", "--data", str(FEWSHOT)), 3, "SS204"),
])
def test_error_paths(run_cli, tmp_path, args, code, needle):
    subst = {"clean": str(save(conv_relu_model(), tmp_path / "small.onnx")),
             "tmp": str(tmp_path), "flat": str(no_activation_model(tmp_path))}
    argv = [a.format(**subst) for a in args]
    before = set(tmp_path.rglob("*"))
    result = run_cli("scan", *argv, "--quiet")
    assert result.code == code, result.out + result.err
    assert needle.format(**subst) in result.out + result.err
    assert "Traceback" not in result.out + result.err
    assert set(tmp_path.rglob("*")) == before, "nothing may be written on failure"


def test_several_models_get_a_table_and_the_worst_exit_code(run_cli, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    no_activation_model(folder)
    (folder / "broken.onnx").write_bytes(b"not a model")
    result = run_cli("scan", folder, "--data", FEWSHOT)
    assert result.code == 2  # an error outranks an inconclusive model: the gate never passes
    assert "broken.onnx" in result.out and "flat.onnx" in result.out
    assert "error" in result.out and "inconclusive" in result.out


def test_a_model_that_misreads_its_clean_images_is_inconclusive_not_a_verdict(run_cli,
                                                                              tmp_path):
    # --scale 255 on a model trained on [0, 1] pixels: every image becomes class noise,
    # and every reversed trigger would look like a backdoor or none
    sarif = tmp_path / "s.sarif"
    result = run_cli("scan", "samples/models/cnn_badnets.onnx", "--data", FEWSHOT, "--scale",
                     "255", "-q", "--sarif", sarif)
    assert result.code == 3
    assert result.err.count("\n") == 1 and "SS206" in result.err
    assert "classifies 10% of the 10 clean images correctly" in result.err
    rule_ids = [r["ruleId"] for r in json.loads(sarif.read_text())["runs"][0]["results"]]
    assert "SS206" in rule_ids
    # the policy sets the floor: at 0 the scan goes on to reverse triggers
    policy = tmp_path / "p.toml"
    policy.write_text("[detection]\nmin_clean_accuracy = 0.0\n")
    assert run_cli("rules", "--policy", policy).code == 0


def test_clean_images_that_leave_out_a_class_are_inconclusive_not_a_verdict(run_cli,
                                                                           tmp_path):
    # zoo: cnn_clean scanned without the trouser image flags class 8 (README, "Detection")
    shot = np.load(FEWSHOT)
    keep = shot["y"] != 1
    partial = tmp_path / "partial.npz"
    np.savez(partial, x=shot["x"][keep], y=shot["y"][keep])
    sarif = tmp_path / "s.sarif"
    result = run_cli("scan", "samples/models/cnn_clean.onnx", "--data", partial, "-q",
                     "--sarif", sarif)
    assert result.code == 3
    assert result.err.count("\n") == 1 and "SS207" in result.err
    assert "cover 9 of the model's 10 classes (missing 1;" in result.err
    assert "--data-free" in result.err
    rule_ids = [r["ruleId"] for r in json.loads(sarif.read_text())["runs"][0]["results"]]
    assert rule_ids == ["SS207"]
    # the policy sets the share: at 0.9 the scan goes on to the next check (here the
    # clean-accuracy floor, made to fail with a wrong scale so that the test stays fast)
    policy = tmp_path / "p.toml"
    policy.write_text("[detection]\nmin_class_coverage = 0.9\n")
    result = run_cli("scan", "samples/models/cnn_clean.onnx", "--data", partial, "-q",
                     "--policy", policy, "--scale", "255")
    assert result.code == 3 and "SS206" in result.err


def test_dynamically_quantized_models_are_inconclusive_with_a_way_forward(run_cli, tmp_path):
    quantization = pytest.importorskip("onnxruntime.quantization")
    dynamic = tmp_path / "dynamic.onnx"
    quantization.quantize_dynamic(str(zoo_model("cnn_badnets")), str(dynamic))
    result = run_cli("scan", dynamic, "--data", FEWSHOT, "-q")
    assert result.code == 3 and result.err.count("\n") == 1
    assert "SS205: cannot differentiate op" in result.err
    assert "a quantized model: scan the float model it was quantized from" in result.err


@pytest.mark.parametrize(("share", "covered", "inconclusive"), [
    (0.55, 55, False), (0.55, 54, True), (0.07, 7, False), (0.999, 99, True), (1.0, 100, False),
    (0.0, 2, False)])
def test_class_coverage_is_counted_in_whole_classes(share, covered, inconclusive):
    # 0.55 * 100 is 55.00000000000001 in floats: 55 classes must be enough
    from scanner.api import _check_class_coverage
    from scanner.data import ImageSet
    from scanner.policy import DetectionPolicy

    images = ImageSet(np.zeros((covered, 1, 2, 2), np.float32), np.arange(covered))
    policy = DetectionPolicy(min_class_coverage=share)
    if inconclusive:
        with pytest.raises(Inconclusive, match=f"cover {covered} of the model's 100 classes"):
            _check_class_coverage(images, 100, policy)
    else:
        _check_class_coverage(images, 100, policy)


def test_every_method_checks_the_clean_images_the_same_way(run_cli, tmp_path):
    # fine-pruning on one image of one class zeroed 102 of 416 channels (test accuracy 17%)
    shot = np.load(FEWSHOT)
    one = tmp_path / "one.npz"
    np.savez(one, x=shot["x"][3:4], y=shot["y"][3:4])
    for method in ("shapley", "fp", "clp"):
        result = run_cli("scan", zoo_model("cnn_clean"), "--data", one, "--method", method, "-q")
        assert result.code == 3 and "SS207" in result.err, method
    result = run_cli("scan", zoo_model("cnn_clean"), "--data-free", "--method", "fp", "-q")
    assert result.code == 4 and "--method fp ranks channels on clean images" in result.err


def test_errors_reach_stderr_with_or_without_quiet(run_cli, tmp_path):
    shot = np.load(FEWSHOT)
    partial = tmp_path / "partial.npz"
    np.savez(partial, x=shot["x"][:9], y=shot["y"][:9])
    result = run_cli("scan", zoo_model("cnn_clean"), "--data", partial)
    assert result.code == 3
    assert [line for line in result.err.splitlines() if "SS207" in line] != []
    assert "SS207" in result.out  # and the summary says it too


def test_a_terminal_showing_both_streams_gets_each_error_once(run_cli, tmp_path, monkeypatch):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    result = run_cli("scan", bad, "--data", FEWSHOT)
    assert result.code == 2  # captured streams: the summary and a stderr line
    assert result.err.splitlines()[-1] == (f"shapscan: SS101: {bad}: not an ONNX model "
                                           "(protobuf parse failed)")
    monkeypatch.setattr("scanner.commands.scan.both_on_terminal", lambda: True)
    result = run_cli("scan", bad, "--data", FEWSHOT)
    assert result.code == 2 and "SS101" not in result.err and "SS101" in result.out
    result = run_cli("scan", bad, "--data", FEWSHOT, "-q")  # no summary: stderr says it
    assert result.code == 2 and "SS101" in result.err


@pytest.mark.parametrize(("path", "problem", "line"), [
    ("/t/bad.onnx", "SS101: /t/bad.onnx: not an ONNX model",
     "shapscan: SS101: /t/bad.onnx: not an ONNX model"),
    ("/t/bad.onnx", "/t/bad.onnx: no such file", "shapscan: /t/bad.onnx: no such file"),
    # the path only inside other words or names: still said which model it is
    ("model", "/d/few.npz: images are 28x28, the model expects 8x8",
     "shapscan: model: /d/few.npz: images are 28x28, the model expects 8x8"),
    ("m.onnx", "SS105: tensor 'w' external data file 'm.onnx.data' is missing",
     "shapscan: m.onnx: SS105: tensor 'w' external data file 'm.onnx.data' is missing"),
])
def test_the_stderr_line_names_its_model_once(path, problem, line):
    from scanner.commands.scan import problem_line

    assert problem_line(Path(path), problem) == line


def test_inputs_that_are_not_regular_files_are_refused_without_reading(run_cli, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # reading any of these would block forever
    result = run_cli("scan", fifo, "--data", FEWSHOT, "-q")
    assert result.code == 2 and "not a regular file" in result.err
    result = run_cli("scan", zoo_model("cnn_clean"), "--policy", fifo, "--data", FEWSHOT, "-q")
    assert result.code == 4 and "not a regular file" in result.err
    result = run_cli("inspect", tmp_path)
    assert result.code == 2 and "a folder, not a model file" in result.err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_report_that_cannot_be_written_is_one_line_not_a_traceback(run_cli):
    result = run_cli("scan", zoo_model("cnn_clean"), "--method", "clp", "-q",
                     "--report", "/dev/full")
    assert result.code == 2
    assert result.err.strip() == "shapscan: error: cannot write /dev/full: No space left on device"


def test_the_policy_sets_each_views_step_budget(tmp_path):
    from scanner.api import ScanOptions, scan

    policy = tmp_path / "short.toml"
    # evidence off: its passes (selectivity, MM-BD) are counted too, and are not steps
    policy.write_text("[detection]\nreverse_steps = 3\nsecond_view_steps = 2\n"
                      "evidence = false\n[repair]\nenabled = false\n")
    result = scan(zoo_model("cnn_clean"), ScanOptions(data=FEWSHOT, policy=policy, quiet=True))
    assert list(result.detection.views) == ["few-shot", "synthesised"]
    rows = 3 * 10 * 9  # families x targets x images of the other classes
    assert result.detection.forward_passes == 3 * rows + 2 * rows


@pytest.mark.parametrize(("forecast_s", "reason"), [(1e9, "forecast"), (-1e9, "stopped")])
def test_a_second_view_over_the_time_left_is_not_run_and_the_scan_says_so(
        tmp_path, monkeypatch, forecast_s, reason):
    """detection._second_view_in_time: the few-shot images flag nothing on cnn_clean; the
    second view's forecast (estimate.second_view_s, priced here) over the time left of
    detection.max_minutes: not started; forecast under it but the scan past the limit (a
    limit of 0.6 ms, a forecast that says it fits): stopped at its first step. Either way
    the verdict is the few-shot view's, and SS213 (low) says the second view did not run."""
    import scanner.estimate
    from scanner.api import ScanOptions, scan
    from scanner.findings import Verdict

    monkeypatch.setattr(scanner.estimate, "row_seconds", lambda *a: 1e-12)
    monkeypatch.setattr(scanner.estimate, "second_view_s", lambda ctx: forecast_s)
    policy = tmp_path / "limit.toml"
    limit = 60 if reason == "forecast" else 1e-5
    policy.write_text(f"[detection]\nreverse_steps = 3\nmax_minutes = {limit}\n"
                      "evidence = false\n[repair]\nenabled = false\n")
    result = scan(zoo_model("cnn_clean"), ScanOptions(data=FEWSHOT, policy=policy, quiet=True))
    assert result.verdict == Verdict.CLEAN
    assert list(result.detection.views) == ["few-shot"]
    (one,) = [f for f in result.findings if f.rule_id == "SS213"]
    assert one.severity.name == "LOW" and one.details["reason"] == reason
    assert "the verdict rests on the few-shot images alone" in one.message
    assert ("was not run" if reason == "forecast" else "was stopped") in one.message


def test_a_step_budget_in_scan_options_is_refused_not_ignored():
    from scanner.api import ScanOptions, scan
    from scanner.errors import UsageError
    from scanner.reverse import ReverseConfig

    with pytest.raises(UsageError, match="detection.reverse_steps"):
        scan(zoo_model("cnn_clean"), ScanOptions(data=FEWSHOT, quiet=True,
                                                 reverse=ReverseConfig(steps=10)))


def test_the_summary_says_which_rows_each_figure_was_measured_on(capsys):
    """The repair's figures are on the scan's own images and shifted copies (45 stamped and
    90 clean rows on a 10-class model), not a test set: the summary says so, and says
    "synthesised inputs" on a data-free scan."""
    from report_fixtures import data_free_result, isolation_flagged_result

    from scanner.commands.scan import print_summary

    print_summary(isolation_flagged_result())
    out = capsys.readouterr().out
    assert ("  reversed trigger success: 100% -> 4% (mean target probability 0.946 -> 0.062)\n"
            "    on 45 rows: the 9 few-shot images of other classes and 4 shifted copies of "
            "each, stamped with the reversed trigger at 2x its strength\n") in out
    assert ("  clean accuracy: 90% -> 99% on 90 rows: the 10 few-shot images and 8 shifted "
            "copies of each (not a test set)\n") in out
    print_summary(data_free_result())
    out = capsys.readouterr().out
    assert "clean accuracy: 100% -> 100% on 90 rows: the 10 synthesised inputs" in out
    assert "few-shot" not in out.split("[", 1)[0]  # above the findings


def test_a_scan_forecast_over_its_limit_takes_the_fast_plan_and_says_so(run_cli, tmp_path,
                                                                       monkeypatch):
    """estimate.check_time: the thorough plan forecast over detection.max_minutes, the fast
    plan ([detection.fast]) under it: the scan takes the fast plan (the sweep picks the
    candidates) instead of stopping, and says so (SS212, LOW; JSON shortlist.screen =
    "sweep"). A gradient row is priced at 1 ms (the timing itself is machine noise): on
    cnn_badnets' 10 images the thorough reverse is 3 x 10 x 9 rows x 120 steps = 38.9 s
    and its selectivity tests 3 x (3 x 90 + 2 x 90) rows = 1.4 s, the fast one (2
    candidates + 3 reference classes, 5 images each) 3 x 5 x 5 x 120 + the sweep's 3 x 2 x
    10 x 40 = 11.4 s, without the selectivity tests (the default decision does not use
    them); the limit is 20 s. With the fast plan off the same scan stops as inconclusive
    (SS210) and names both forecasts."""
    import jsonschema

    import scanner.estimate

    monkeypatch.setattr(scanner.estimate, "row_seconds", lambda *a: 1e-3)
    policy = tmp_path / "fast.toml"
    body = ("[detection]\nmax_minutes = 0.34\nsynthesised_view = false\nmargin_steps = 0\n"
            "[detection.fast]\nshortlist = 2\nreference_classes = 3\nreverse_rows = 15\n"
            "{}[repair]\nenabled = false\n")
    policy.write_text(body.format(""))
    report, html = tmp_path / "r.json", tmp_path / "r.html"
    result = run_cli("scan", zoo_model("cnn_badnets"), "--data", FEWSHOT, "--policy", policy,
                     "--report", report, "--html", html)
    assert result.code in (0, 1) and "Traceback" not in result.err
    assert "which are never flagged themselves" in html.read_text()
    doc = json.loads(report.read_text())
    schema = json.loads((Path(__file__).parent.parent / "rules" / "schemas" /
                         "report.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(doc)
    res = doc["results"][0]
    findings = {f["rule_id"]: f for f in res["findings"]}
    assert findings["SS212"]["severity"] == "low"
    assert "the fast plan was taken" in findings["SS212"]["message"]
    assert "is not gathered" in findings["SS212"]["message"]
    assert all(not c["selectivity"] for c in res["detection"]["classes"])
    sl = res["detection"]["shortlist"]
    assert sl["screen"] == "sweep" and len(sl["candidates"]) == 2 and len(sl["reference"]) == 3
    assert set(sl["yardstick"]) == {"patch", "universal", "warp"}
    assert all(0 <= n <= 3 for n in sl["yardstick"].values())
    assert 0 in res["detection"]["flagged_targets"]  # the sweep ranks the target first
    policy.write_text(body.format("enabled = false\n"))
    result = run_cli("scan", zoo_model("cnn_badnets"), "--data", FEWSHOT, "--policy", policy)
    assert result.code == 3 and "SS210" in result.err and "SS212" not in result.err
    assert "the fast plan" not in result.err


def test_a_many_class_scan_reverses_its_shortlist_and_says_so(run_cli, tmp_path):
    """Above detection.shortlist_over classes the screen picks the candidates, a random
    reference sample stands beside them, only those are reversed in full, and the report
    says which (JSON `detection.shortlist`, valid against the schema; finding SS211).
    Forced here on a 10-class sample model: 3 candidates, 4 reference classes."""
    import jsonschema

    policy = tmp_path / "shortlist.toml"
    policy.write_text("[detection]\nshortlist_over = 4\nshortlist = 3\nreference_classes = 4\n"
                      "synthesised_view = false\nmargin_steps = 0\n[repair]\nenabled = false\n")
    report, html = tmp_path / "r.json", tmp_path / "r.html"
    result = run_cli("scan", zoo_model("cnn_badnets"), "--data", FEWSHOT, "--policy", policy,
                     "--report", report, "--html", html)
    assert result.code in (0, 1) and "Traceback" not in result.err
    doc = json.loads(report.read_text())
    schema = json.loads((Path(__file__).parent.parent / "rules" / "schemas" /
                         "report.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(doc)
    det = doc["results"][0]["detection"]
    sl = det["shortlist"]
    assert sl["classes"] == 10 and len(sl["candidates"]) == 3 and len(sl["reference"]) == 4
    assert not set(sl["candidates"]) & set(sl["reference"])
    assert sl["screen_steps"] == 40 and sl["screen_images"] == 2 and sl["screen"] == "classes"
    reversed_ = sorted(c["target"] for c in det["classes"])
    assert reversed_ == sorted(sl["candidates"] + sl["reference"])
    assert set(det["flagged_targets"]) <= set(reversed_)
    findings = {f["rule_id"]: f for f in doc["results"][0]["findings"]}
    assert "SS211" in findings and "7 of the model's 10 classes" in findings["SS211"]["message"]
    assert "of the model&#x27;s 10 classes, a 40-step screen" in html.read_text()  # escaped
