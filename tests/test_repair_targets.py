"""A scan that flags several classes repairs the most anomalous one and tests the others'
reversed triggers on the repaired model (SS304), on a real zoo model and real triggers."""

from __future__ import annotations

import numpy as np
from conftest import FEWSHOT, zoo_model

from scanner import api
from scanner.data import load_images
from scanner.findings import Repair, ScanResult
from scanner.graph.activations import discover_activations
from scanner.graph.load import load_model
from scanner.graph.prefix import CoalitionEvaluator
from scanner.policy import load_catalog, load_policy
from scanner.reverse import ReversedTrigger
from scanner.runtime import resolve_device


def test_a_flagged_class_whose_trigger_survives_the_repair_gets_ss304():
    model = load_model(zoo_model("cnn_badnets"))  # true backdoor: 3x3 white patch -> 0
    prep = api.model_preprocess(model)
    images = load_images(FEWSHOT, prep)
    evaluator = CoalitionEvaluator(model.proto, discover_activations(model.proto),
                                   prep.to_model(images.pixels), resolve_device("cpu"))
    h, w = images.pixels.shape[2:]
    patch = np.zeros((h, w), np.float32)
    patch[h - 4:h - 1, w - 4:w - 1] = 1.0
    white = np.ones(images.pixels.shape[1:], np.float32)
    triggers = {0: ReversedTrigger("patch", 0, white, patch, 9.0, 1.0),
                5: ReversedTrigger("patch", 5, white, np.zeros((h, w), np.float32), 0.0, 0.0)}
    result = ScanResult(str(zoo_model("cnn_badnets")))
    result.repair = Repair(target=3, channels_total=evaluator.n_channels, pruned=[],
                           top_channels=[], reversed_asr_before=1.0, reversed_asr_after=0.0,
                           fewshot_acc_before=1.0, fewshot_acc_after=1.0, permutations=0,
                           forward_passes=0, estimator="eps-greedy")
    # a "repair" of one channel that has nothing to do with the BadNets patch
    api._check_other_targets(result, evaluator, evaluator, prep, images, [0], 3, triggers,
                             api.ScanOptions(), load_catalog(), load_policy("default").repair)
    [finding] = result.findings  # class 5's trigger (an empty mask) flips nothing
    assert finding.rule_id == "SS304" and finding.location == "class 0"
    assert finding.details["reversed_asr_after"] > 0.9  # 1.00 measured
    assert "few-shot images" in finding.message and "planned for class 3" in finding.message
    assert result.repair.forward_passes == 2 * 2 * 5 * 9  # 2 coalitions x 45 rows x 2 classes


def _repair_on_cnn_badnets(log, recover_steps: int | None = None, **repair_policy):
    """scanner.repair on cnn_badnets with its true patch as the verdict's trigger towards 0,
    on one layer of 32 channels (Shapley over 32 players, a 1-channel plan: fast), the
    re-scan off (its own tests' subject). The ScanContext after the repair."""
    from dataclasses import replace

    from scanner.context import ScanContext
    from scanner.detect import Detection
    from scanner.detect import Verdict as DetectVerdict
    from scanner.progress import Progress
    from scanner.repair import repair

    model = load_model(zoo_model("cnn_badnets"))
    prep = api.model_preprocess(model)
    images = load_images(FEWSHOT, prep)
    h, w = images.pixels.shape[2:]
    patch = np.zeros((h, w), np.float32)
    patch[h - 4:h - 1, w - 4:w - 1] = 1.0
    trigger = ReversedTrigger("patch", 0, np.ones(images.pixels.shape[1:], np.float32), patch,
                              9.0, 1.0, rows=9)
    policy = load_policy("default")
    recover = policy.repair.recover
    if recover_steps is not None:
        recover = replace(recover, steps=recover_steps)
    policy = replace(policy, repair=replace(policy.repair, rescan=False, recover=recover,
                                            **repair_policy))
    detection = Detection([], [0], 2.5, False)
    ctx = ScanContext(
        opts=api.ScanOptions(data=FEWSHOT, permutations=4), policy=policy,
        catalog=load_catalog(), progress=Progress(stream=log, live=False),
        result=ScanResult(str(zoo_model("cnn_badnets")), detection=detection), model=model,
        layers=discover_activations(model.proto)[:1], prep=prep, device=resolve_device("cpu"),
        n_classes=10, predict=lambda x: x, images=images,
        verdict=DetectVerdict(detection, {0: trigger}, {0: "patch"}, []))
    repair(ctx)
    ctx.progress.close()
    return ctx


def test_a_repair_records_the_rows_its_figures_are_on_and_shows_progress():
    """The Repair says which rows its before/after are on, SS301 quotes the stamped rows,
    and the Shapley and planning stages report progress to the end."""
    import io

    log = io.StringIO()
    ctx = _repair_on_cnn_badnets(log)
    rep = ctx.result.repair
    assert (rep.inputs, rep.stamped_images, rep.stamped_copies) == ("few-shot", 9, 4)
    assert (rep.clean_images, rep.clean_copies, rep.trigger_gain) == (10, 8, 2.0)
    assert rep.scan_images == 10 and "drawn" not in rep.clean_rows()
    assert rep.clean_target_probability_after is not None
    assert 0 <= rep.clean_target_probability_after < rep.target_probability_before
    [ss301] = [f for f in ctx.result.findings if f.rule_id == "SS301"]
    assert "reversed trigger success on the 45 stamped rows" in ss301.message
    lines = log.getvalue().splitlines()
    assert "shapscan: Shapley values towards class 0: done in" in " ".join(lines)
    assert any(line.startswith("shapscan: choosing channels to zero: done in")
               for line in lines)


def test_a_scan_with_more_images_than_max_images_repairs_on_a_draw_that_keeps_the_target():
    """[repair] max_images bounds the repair's rows (its memory), whatever the class count:
    4 of the 10 few-shot images, class 0's own among them; the report says so."""
    import io

    from scanner.report.json_report import to_dict

    ctx = _repair_on_cnn_badnets(io.StringIO(), recover_steps=10, max_images=4)
    rep = ctx.result.repair
    assert (rep.clean_images, rep.stamped_images, rep.scan_images) == (4, 3, 10)
    assert "36 rows: the 4 few-shot images (drawn from the scan's 10" in rep.clean_rows()
    assert rep.stamped_rows().startswith("15 rows: the 3 few-shot images of other classes "
                                         "(drawn from the scan's 10")
    [ss301] = [f for f in ctx.result.findings if f.rule_id == "SS301"]
    assert "reversed trigger success on the 15 stamped rows" in ss301.message
    assert to_dict(ctx.result)["repair"]["images"] == {"used": 4, "of": 10}
    assert "recovered: 10 fine-tuning steps" in (rep.recovery_note or "")


def test_repair_images_draws_the_flagged_class_and_a_seeded_sample_in_order():
    from scanner.data import ImageSet
    from scanner.repair import repair_images

    labels = np.repeat(np.arange(50), 2)  # 2 images per class
    images = ImageSet(np.arange(100, dtype=np.float32).reshape(100, 1, 1, 1), labels)
    drawn = repair_images(images, 7, 10, seed=0)
    assert len(drawn) == 10 and (drawn.labels == 7).sum() == 2
    kept = drawn.pixels.ravel().astype(int)
    assert (np.diff(kept) > 0).all()  # the scan's order
    assert (images.labels[kept] == drawn.labels).all()
    assert np.array_equal(repair_images(images, 7, 10, seed=0).pixels, drawn.pixels)
    assert not np.array_equal(repair_images(images, 7, 10, seed=1).pixels, drawn.pixels)
    assert repair_images(images, 7, 0, seed=0) is images  # 0: all of them
    assert repair_images(images, 7, 100, seed=0) is images
