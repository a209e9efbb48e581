"""The repair stage: the plan's frontier, complete and incomplete repairs (what --out gets
and how it is marked), and the re-scan of the repaired model."""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, zoo_model
from report_fixtures import backdoor_result
from test_prune import Game

from scanner import api
from scanner.context import ScanOptions
from scanner.findings import ChannelValue, FrontierPoint, PlanCheck, Repair, Rescan, ScanResult
from scanner.policy import load_catalog, load_policy
from scanner.progress import Progress
from scanner.prune import PruneConfig, plan
from scanner.recover import Recovered
from scanner.repair import REPAIR_KEY, finish_repair
from scanner.report.html import render_html
from scanner.report.json_report import report_dict
from scanner.shapley import ShapleyConfig, Utility, estimate


def _plan(game: Game, fraction: float):
    values = estimate(game, Utility(2), ShapleyConfig(permutations=16), seed=0)
    return plan(game, game.with_images(clean=True), game.labels, Utility(2), values,
                PruneConfig(max_channel_fraction=fraction, give_back=False))


def test_the_plan_zeroes_on_while_clean_cost_allows_and_records_its_walk():
    """Four carriers, each enough for the backdoor: a 2 % cap (2 of 100 channels) stops
    short; a 10 % cap lets the plan go on to all four, and the frontier is what each prefix
    of its picks measures."""
    game = Game(100, carriers=[1, 2, 3, 4], useful=[50], clean=False)
    short, long = _plan(game, 0.02), _plan(game, 0.10)
    assert not short.target_reached and len(short.frontier) == len(short.channels) + 1
    assert long.target_reached and sorted(long.channels) == [1, 2, 3, 4]
    walk = long.frontier
    assert [p.channels for p in walk] == list(range(len(long.channels) + 1))
    assert walk[0].reversed_asr == 1.0 and walk[-1].reversed_asr == 0.0
    # measured independently: the backdoor holds until the last carrier goes
    for point in walk[1:]:
        coalition = np.ones((1, 100), np.float32)
        coalition[0, long.channels[:point.channels]] = 0.0
        asr = (game.logits(coalition).argmax(-1) == 2).mean()
        assert point.reversed_asr == pytest.approx(asr)
    assert all(p.clean_cost == pytest.approx(0.0, abs=1e-9) for p in walk)  # 50 stays on


def _context(tmp_path: Path, **options: object) -> api.ScanContext:
    """The loaded cnn_badnets, as the scan's stages see it after loading."""
    opts = ScanOptions(data=FEWSHOT, out=tmp_path / "safe.onnx", quiet=True, **options)
    result = ScanResult(str(zoo_model("cnn_badnets")))
    return api._load(result, zoo_model("cnn_badnets"), opts, load_policy("default"),
                     load_catalog(), Progress(enabled=False))


def _repair(ctx: api.ScanContext, reached: bool, rescan: Rescan | None = None) -> Repair:
    layer = ctx.layers[0].name
    return Repair(target=0, channels_total=416, pruned=[ChannelValue(layer, 3, 0.5, 0.1, True)],
                  top_channels=[], reversed_asr_before=1.0,
                  reversed_asr_after=0.0 if reached else 0.4, fewshot_acc_before=1.0,
                  fewshot_acc_after=1.0, permutations=8, forward_passes=0,
                  estimator="eps-greedy", target_reached=reached, rescan=rescan)


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_a_complete_repair_is_written_marked_complete(tmp_path):
    ctx = _context(tmp_path)
    repair = _repair(ctx, reached=True, rescan=Rescan(["few-shot"], [], {}))
    finish_repair(ctx, repair)
    assert repair.status == "complete" and not repair.incomplete_reasons
    assert repair.output_path == str(tmp_path / "safe.onnx") and not repair.withheld
    assert _metadata(tmp_path / "safe.onnx")[REPAIR_KEY] == "complete"
    assert "SS305" not in {f.rule_id for f in ctx.result.findings}


@pytest.mark.parametrize(("after", "complete"), [(12.0, False), (30.0, True)])
def test_a_target_whose_trigger_stays_cheap_after_repair_is_incomplete(tmp_path, after,
                                                                        complete):
    ctx = _context(tmp_path)
    ctx.policy = replace(ctx.policy, repair=replace(ctx.policy.repair,
                                                    min_trigger_growth=2.0))
    rescan = Rescan(["few-shot"], [], {}, 0, "patch", 10.0, after, 40.0)
    repair = _repair(ctx, reached=True, rescan=rescan)
    finish_repair(ctx, repair)
    assert (repair.status == "complete") is complete
    assert (tmp_path / "safe.onnx").exists() is complete
    if not complete:
        [reason] = repair.incomplete_reasons
        assert "class 0's reversed patch trigger is 1.20x its size before" in reason


@pytest.mark.parametrize(("recovered", "complete"), [(False, True), (True, False)])
def test_the_growth_a_recovered_repair_needs_is_its_own(tmp_path, recovered, complete):
    """4.2x growth at the strict policy's growth bars: complete for zeroing alone
    (repair.min_trigger_growth, off), incomplete after recovery ([repair.recover]
    min_trigger_growth = 4.8)."""
    ctx = _context(tmp_path)
    strict = load_policy("strict").repair
    assert strict.min_trigger_growth == 0.0 and strict.recover.min_trigger_growth == 4.8
    ctx.policy = replace(ctx.policy, repair=replace(
        ctx.policy.repair, recover=replace(ctx.policy.repair.recover, min_trigger_growth=4.8)))
    rescan = Rescan(["few-shot"], [], {}, 0, "patch", 10.0, 42.0, 40.0)
    repair = _repair(ctx, reached=True, rescan=rescan)
    finish_repair(ctx, repair, Recovered({}, "test") if recovered else None)
    assert (repair.status == "complete") is complete
    assert (tmp_path / "safe.onnx").exists() is complete
    if not complete:
        [reason] = repair.incomplete_reasons
        assert "4.20x its size before (at least 4.8x asked)" in reason
        assert "may never have been backdoored" in reason


@pytest.mark.parametrize(("every_family", "recovered", "complete"), [
    (False, False, True), (True, False, False),
    # after recovery [repair.recover] every_family rules, off by default: recovery unlearnt
    # those very triggers
    (True, True, True), ("recover", True, False)])
def test_every_family_makes_a_repair_another_trigger_survives_incomplete(
        tmp_path, every_family, recovered, complete):
    ctx = _context(tmp_path)
    rp = ctx.policy.repair
    assert rp.every_family and not rp.recover.every_family  # the shipped defaults
    if every_family == "recover":
        rp = replace(rp, recover=replace(rp.recover, every_family=True))
    else:
        rp = replace(rp, every_family=every_family)
    ctx.policy = replace(ctx.policy, repair=rp)
    repair = _repair(ctx, reached=True, rescan=Rescan(["few-shot"], [], {}))
    repair.family_asr = {"patch": (1.0, 0.0), "universal": (0.9, 0.4)}
    finish_repair(ctx, repair, Recovered({}, "test") if recovered else None)
    assert (repair.status == "complete") is complete
    if not complete:
        assert repair.incomplete_reasons == [
            "class 0's reversed universal trigger still works on 40% of the stamped few-shot "
            "images"]


def test_a_repair_that_missed_only_the_probability_part_says_so_in_its_reason(tmp_path):
    """SS305's one line, like SS302: 0 % flipped is not "still works on 0 %" (the reason
    the corpus's records carried); the probability that kept the target out of reach is."""
    ctx = _context(tmp_path)
    repair = _repair(ctx, reached=False, rescan=Rescan(["few-shot"], [], {}))
    repair.reversed_asr_after = 0.0
    repair.target_probability_after, repair.clean_target_probability_after = 0.031, 0.002
    finish_repair(ctx, repair)
    assert repair.incomplete_reasons == [
        "the reversed trigger sends none of the stamped few-shot images to class 0 but still "
        "lifts its mean probability on them to 0.031 (clean images of other classes: "
        "0.002) (SS302)"]
    [ss305] = [f for f in ctx.result.findings if f.rule_id == "SS305"]
    assert "still works on 0%" not in ss305.message and "0.031" in ss305.message


@pytest.mark.parametrize(("reached", "rescan", "reason"), [
    (False, None, "still works on 40% of the stamped few-shot images"),
    (True, Rescan(["few-shot"], [0, 6], {0: 3.1, 6: 2.7}), "still flags class 0, 6")])
def test_an_incomplete_repair_is_withheld_unless_kept_and_then_marked(tmp_path, reached,
                                                                      rescan, reason):
    ctx = _context(tmp_path)
    repair = _repair(ctx, reached, rescan)
    finish_repair(ctx, repair)
    assert repair.status == "incomplete" and reason in repair.incomplete_reasons[0]
    assert repair.withheld and repair.output_path is None
    assert not (tmp_path / "safe.onnx").exists()
    [ss305] = [f for f in ctx.result.findings if f.rule_id == "SS305"]
    assert "NOT written" in ss305.message and "--keep-incomplete" in ss305.message
    assert ss305.details["written"] is False

    kept = _context(tmp_path, keep_incomplete=True)
    repair = _repair(kept, reached, rescan)
    finish_repair(kept, repair)
    assert repair.status == "incomplete" and not repair.withheld
    assert _metadata(tmp_path / "safe.onnx")[REPAIR_KEY] == "incomplete"
    [ss305] = [f for f in kept.result.findings if f.rule_id == "SS305"]
    assert "anyway" in ss305.message and ss305.details["written"] is True


@pytest.mark.slow
def test_a_tiny_channel_cap_gives_an_incomplete_repair_that_is_not_written(run_cli,
                                                                          tmp_path):
    """A real scan whose policy lets zeroing alone (recovery off) zero one channel of 416:
    cnn_badnets' patch needs more, so the target is missed, the re-scan still flags class 0,
    and --out gets nothing (exit 1) until --keep-incomplete, which writes it marked
    incomplete."""
    policy = tmp_path / "tiny.toml"
    policy.write_text("[repair]\nmax_channel_fraction = 0.001\n[repair.recover]\n"
                      "enabled = false\n[shapley]\npermutations = 8\n")
    out, report, sarif, html = (tmp_path / n for n in ("safe.onnx", "r.json", "r.sarif",
                                                      "r.html"))
    result = run_cli("scan", zoo_model("cnn_badnets"), "--data", FEWSHOT, "--policy", policy,
                     "--out", out, "--report", report, "--sarif", sarif, "--html", html)
    assert result.code == 1, result.err
    assert not out.exists()
    [line] = [x for x in result.out.splitlines() if "SS305" in x]
    assert "NOT written" in line and "--keep-incomplete" in line
    assert "re-scan of the repaired model (few-shot): still flags class 0" in result.out
    repair = json.loads(report.read_text())["results"][0]["repair"]
    assert repair["status"] == "incomplete" and repair["withheld"] is True
    assert repair["pruned_count"] == 1 and repair["target_reached"] is False
    assert repair["rescan"]["flagged_targets"] == [0]
    assert [p["channels"] for p in repair["frontier"]] == [0, 1]
    rules = [r["ruleId"] for r in json.loads(sarif.read_text())["runs"][0]["results"]]
    assert "SS305" in rules
    assert "Repair incomplete" in html.read_text()

    kept = run_cli("scan", zoo_model("cnn_badnets"), "--data", FEWSHOT, "--policy", policy,
                   "--out", out, "--keep-incomplete", "-q")
    assert kept.code == 1, kept.err
    assert _metadata(out)[REPAIR_KEY] == "incomplete"


def test_reports_say_the_status_the_rescan_and_show_the_frontier():
    result = backdoor_result()
    rep = result.repair
    rep.frontier = [FrontierPoint(0, 1.0, 0.95, 0.0, 1.0), FrontierPoint(1, 0.6, 0.5, 0.01, 1.0),
                    FrontierPoint(2, 0.0, 0.01, float("nan"), 0.9)]
    rep.rescan = Rescan(["few-shot", "synthesised"], [3], {3: 2.9}, 1234, "patch", 10.0, 15.0,
                        40.0)
    rep.status, rep.incomplete_reasons = "incomplete", ["the re-scan still flags class 3"]
    rep.withheld, rep.output_path = True, None
    doc = report_dict([result])
    schema = json.loads(resources.files("scanner.rules").joinpath(
        "schemas", "report.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(doc)
    out = doc["results"][0]["repair"]
    assert out["status"] == "incomplete" and out["withheld"] is True
    assert out["rescan"] == {"views": ["few-shot", "synthesised"], "flagged_targets": [3],
                             "anomaly_indices": {"3": 2.9}, "forward_passes": 1234,
                             "target_family": "patch", "target_size_before": 10.0,
                             "target_size_after": 15.0, "target_growth": 1.5,
                             "others_median_after": 40.0}
    assert [p["channels"] for p in out["frontier"]] == [0, 1, 2]
    assert out["frontier"][2]["clean_cost"] is None  # not finite: null, as everywhere
    page = render_html(result)
    assert "Repair frontier" in page and page.count("<polyline") == 2
    assert "Repair incomplete" in page and "the re-scan still flags class 3" in page
    assert "Re-scan of the repaired model (few-shot, synthesised): still flags class 3" in page
    assert "reversed patch trigger: 10.000 before, 15.000 after the repair (1.50x" in page
    assert "the repaired model was not written" in page


def test_reports_give_the_zeroed_model_beside_the_recovered_one():
    """With [repair.recover] the after figures are the recovered model's; the zeroed
    model's stand beside them in the JSON (repair.zeroed) and in a middle HTML column."""
    result = backdoor_result()
    result.repair.zeroed = PlanCheck(0.25, 0.2, 0.7, 0.01, False)
    doc = report_dict([result])
    schema = json.loads(resources.files("scanner.rules").joinpath(
        "schemas", "report.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(doc)
    assert doc["results"][0]["repair"]["zeroed"] == {
        "reversed_asr": 0.25, "target_probability": 0.2, "fewshot_acc": 0.7,
        "target_reached": False}
    page = render_html(result)
    assert "Zeroed, before recovery" in page and "(after recovery; before it: no)" in page
    assert "<td class=num>25.0%</td>" in page
    result.repair.zeroed = None
    assert report_dict([result])["results"][0]["repair"]["zeroed"] is None
    assert "Zeroed, before recovery" not in render_html(result)
