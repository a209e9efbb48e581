from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import FEWSHOT, zoo_model

from scanner.data import ImageSet
from scanner.reverse import (
    _FAMILY_TYPES,
    ReverseConfig,
    ReversedTrigger,
    ScreenConfig,
    _rows_for,
    reverse_triggers,
    screen,
    sweep,
)
from scanner.warp import warp

SHAPE = (2, 8, 9)


def _family(name: str, scale: float):
    """A family for 3 targets, its parameters float64 and away from their initial values."""
    rng = np.random.default_rng(0)
    fam = _FAMILY_TYPES[name](np.arange(3), SHAPE, ReverseConfig(), rng)
    fam.params[:] = [rng.normal(0, scale, p.shape) for p in fam.params]
    fam.cost = np.array([0.0, 0.3, 2.0])
    return fam


def _loss(fam, pixels: np.ndarray, tix: np.ndarray, g: np.ndarray) -> float:
    """The surrogate ⟨g, stamped⟩ plus the family's penalty Σ cost_t · norm_t."""
    return float((g * fam.stamp(pixels, tix)).sum() + (fam.cost * fam.norms(*fam.trigger())).sum())


@pytest.mark.parametrize(("name", "scale"), [("patch", 0.5), ("universal", 0.05), ("warp", 1.0)])
def test_backward_matches_finite_differences(name, scale):
    fam = _family(name, scale)
    rng = np.random.default_rng(1)
    tix = np.array([0, 0, 1, 2, 2, 2])
    pixels = rng.uniform(0.1, 0.9, (len(tix), *SHAPE))
    g = rng.normal(size=pixels.shape)
    analytic = fam.backward(pixels, tix, g)
    eps = 1e-6
    for p, a in zip(fam.params, analytic, strict=True):
        for idx in list(np.ndindex(*p.shape))[:: max(1, p.size // 60)]:
            saved = p[idx]
            p[idx] = saved + eps
            up = _loss(fam, pixels, tix, g)
            p[idx] = saved - eps
            down = _loss(fam, pixels, tix, g)
            p[idx] = saved
            assert a[idx] == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-6), idx


def test_a_warp_trigger_stamps_its_flow_scaled_by_gain():
    flow = np.random.default_rng(2).normal(0, 1.0, (2, 8, 9))
    trig = ReversedTrigger("warp", 4, flow, None, norm=1.0, asr=1.0)
    x = np.random.default_rng(3).uniform(size=(2, *SHAPE)).astype(np.float32)
    out = trig.apply(x, gain=2.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, warp(x, 2 * flow), atol=1e-6)
    np.testing.assert_allclose(trig.apply(x, gain=0.0), x, atol=1e-6)


def test_an_unknown_family_is_refused():
    images = ImageSet(np.zeros((2, *SHAPE), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="unknown trigger families"):
        reverse_triggers(None, None, images, 2, ReverseConfig(families=("patch", "blur")))


def test_each_target_gets_every_other_image_up_to_the_limit():
    labels = np.repeat(np.arange(10), 1)
    np.testing.assert_array_equal(_rows_for(labels, 3, 9, np.random.default_rng(0)),
                                  [0, 1, 2, 4, 5, 6, 7, 8, 9])


@pytest.mark.parametrize(("classes", "per_class", "limit"), [(100, 1, 10), (10, 5, 30)])
def test_beyond_the_limit_the_images_spread_over_classes(classes, per_class, limit):
    labels = np.repeat(np.arange(classes), per_class)
    rows = _rows_for(labels, 5, limit, np.random.default_rng(0))
    counts = np.bincount(labels[rows], minlength=classes)
    assert len(rows) == limit == len(set(rows.tolist())) and counts[5] == 0
    assert counts.max() - np.delete(counts, 5).min() <= 1  # no class twice before all once


class _Program:
    """Counts rows; the logits say every row is its target (every trigger works at once)."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def run(self, x, weights, bn_weight=0.0):
        from scanner.autodiff import GradResult

        self.rows.append(len(x))
        return GradResult(10 * weights, np.zeros(len(x)), 0.0, np.zeros_like(x))


def test_a_step_costs_rows_linear_in_the_class_count():
    from scanner.data import Preprocess

    classes = 40
    images = ImageSet(np.random.default_rng(0).uniform(size=(classes, 1, 6, 6)).astype(
        np.float32), np.arange(classes))
    program = _Program()
    cfg = ReverseConfig(steps=2, max_rows=300, min_images=5)
    result = reverse_triggers(program, Preprocess(height=6, width=6), images, classes, cfg)
    # 3 families x 40 targets x max(5, 300 // 120) images; all 39 others would be 4,680
    assert program.rows == [600, 600] and result.forward_passes == 1200
    assert len(result.triggers) == 3 * classes


def _badnets():
    """cnn_badnets' preprocessing, its few-shot images and its gradient program."""
    from scanner.api import model_preprocess
    from scanner.autodiff import GradientProgram
    from scanner.data import load_images
    from scanner.graph.load import load_model

    model = load_model(zoo_model("cnn_badnets"))
    prep = model_preprocess(model)
    return prep, load_images(FEWSHOT, prep), GradientProgram(model.runnable)


def test_a_snapshot_is_what_a_run_of_that_many_steps_returns():
    prep, images, program = _badnets()
    long = reverse_triggers(program, prep, images, 10, ReverseConfig(steps=4), seed=3,
                            snapshots={2, 4, 9})
    short = reverse_triggers(program, prep, images, 10, ReverseConfig(steps=2), seed=3)
    assert sorted(long.snapshots) == [2, 4]  # step 9 never came
    for kept, run in ((long.snapshots[2], short.triggers), (long.snapshots[4], long.triggers)):
        assert kept.keys() == run.keys()
        for key, trig in run.items():
            assert kept[key].norm == trig.norm and np.array_equal(kept[key].pattern, trig.pattern)
    assert short.snapshots == {}


def test_a_subset_of_targets_costs_rows_for_those_only():
    from scanner.data import Preprocess

    classes = 10
    images = ImageSet(np.random.default_rng(0).uniform(size=(classes, 1, 6, 6)).astype(
        np.float32), np.arange(classes))
    program = _Program()
    cfg = ReverseConfig(steps=3, families=("patch",))
    result = reverse_triggers(program, Preprocess(height=6, width=6), images, classes, cfg,
                              targets=[7])
    assert program.rows == [9, 9, 9]  # the 9 images of other classes, one family
    assert list(result.triggers) == [("patch", 7)]
    assert result.triggers[("patch", 7)].asr == 1.0  # the rows' CE label is class 7
    with pytest.raises(ValueError, match="targets must be classes"):
        reverse_triggers(program, Preprocess(height=6, width=6), images, classes, cfg,
                         targets=[10])


def test_the_screen_puts_a_real_backdoor_target_first_and_samples_the_reference():
    """cnn_badnets' target is class 0: the default screen (40 steps on two images per class)
    keeps it among 3 candidates of 10 (third with seed 0: a screen on two images is a
    coarse ranking, benchmarks/README "Many classes"); the reference sample is drawn from
    the other classes; the screen runs its chunks of classes one after another (4 + 4 + 2
    here), each with its rows."""
    prep, images, program = _badnets()
    cfg = ScreenConfig(steps=40, images=2, chunk=4, candidates=3, reference=3)
    found = screen(program, prep, images, 10, ReverseConfig(), cfg, seed=0)
    assert 0 in found.candidates and len(found.candidates) == 3
    assert len(found.reference) == 3 and not set(found.reference) & set(found.candidates)
    assert found.forward_passes == 3 * 10 * 2 * 40  # families x classes x images x steps
    assert set(found.log_probs) == {"patch", "universal", "warp"}
    again = screen(program, prep, images, 10, ReverseConfig(), cfg, seed=0)
    assert again.candidates == found.candidates and again.reference == found.reference


def test_the_sweep_sends_a_real_backdoor_to_its_target_at_a_cost_free_of_the_class_count():
    """reverse.sweep: label-free triggers (no target class) that must move the images out
    of their own class go where the backdoor sends them: cnn_badnets' target (class 0)
    ranks first (seeds 0-2 all put it first). Its cost is families x restarts x images x
    steps whatever the class count; the same seed gives the same screen."""
    prep, images, program = _badnets()
    cfg = ScreenConfig(steps=40, candidates=3, reference=3, restarts=2, sweep_images=32)
    found = sweep(program, prep, images, 10, ReverseConfig(), cfg, seed=0)
    assert found.order[0] == 0 and found.candidates == found.order[:3]
    assert len(found.reference) == 3 and not set(found.reference) & set(found.candidates)
    assert found.forward_passes == 3 * 2 * len(images) * 40  # 10 images: fewer than 32
    assert set(found.log_probs) == {"patch", "universal", "warp"}
    again = sweep(program, prep, images, 10, ReverseConfig(), cfg, seed=0)
    assert again.order == found.order and again.reference == found.reference
    few = sweep(program, prep, images, 10, ReverseConfig(), replace(cfg, sweep_images=4,
                                                                     steps=2), seed=0)
    assert few.forward_passes == 3 * 2 * 4 * 2


def test_a_screening_run_starts_small_with_its_penalty_on():
    rng = np.random.default_rng(0)
    cfg = ReverseConfig(start_small=True)
    patch = _FAMILY_TYPES["patch"](np.arange(3), SHAPE, cfg, rng)
    _, mask = patch.trigger()
    assert mask.max() < 0.01 and (patch.cost == cfg.init_cost).all() and patch.cost_set.all()
    usual = _FAMILY_TYPES["patch"](np.arange(3), SHAPE, ReverseConfig(), rng)
    assert usual.trigger()[1].min() > 0.05 and not usual.cost_set.any()


def test_one_class_reversed_alone_on_a_real_model():
    """What the scan does to refine a second-view flag: one family, one class."""
    prep, images, program = _badnets()
    cfg = ReverseConfig(steps=3, families=("universal",))
    alone = reverse_triggers(program, prep, images, 10, cfg, seed=1, targets=[0])
    assert alone.forward_passes == 3 * 9
    trig = alone.triggers[("universal", 0)]
    assert trig.target == 0 and trig.pattern.shape == images.pixels.shape[1:]


@pytest.mark.parametrize(("second_view_steps", "refined"), [(2, True), (3, False)])
def test_a_second_view_flag_gets_its_trigger_refined_alone(second_view_steps, refined):
    """scanner.api._refine_trigger: the flagged family, the flagged class, the first view's
    budget; the trigger is swapped in only if it works (asr_goal 0 here: always)."""
    from dataclasses import replace

    from scanner.api import ScanOptions, _refine_trigger
    from scanner.detect import Detection
    from scanner.detect import Verdict as DetectVerdict
    from scanner.policy import DetectionPolicy
    from scanner.progress import Progress

    prep, images, program = _badnets()
    flagged = ReversedTrigger("universal", 0, np.zeros(images.pixels.shape[1:], np.float32),
                              None, 9.0, 1.0)
    verdict = DetectVerdict(Detection([], [0], 2.5, True), {0: flagged}, {0: "combined"}, [])
    det = replace(DetectionPolicy(), reverse_steps=3, second_view_steps=second_view_steps)
    opts = ScanOptions(reverse=ReverseConfig(asr_goal=0.0))
    passes = _refine_trigger(verdict, 0, program, prep, images, 10, opts, det,
                             Progress(enabled=False))
    assert passes == (3 * 9 if refined else 0)  # one family x the 9 images of other classes
    assert (verdict.triggers[0] is not flagged) == refined
    assert verdict.refined == ({0: 3} if refined else {})
    if refined:
        assert verdict.triggers[0].family == "universal" and verdict.triggers[0].target == 0


def test_each_trigger_says_how_many_images_its_success_rate_is_on():
    """SS201 quotes the rate with its count: the images of other classes it was reversed on
    (all 9 here; at most the per-class share on a model with many classes)."""
    prep, images, program = _badnets()
    result = reverse_triggers(program, prep, images, 10, ReverseConfig(steps=2), seed=0)
    assert {trig.rows for trig in result.triggers.values()} == {9}
    few = reverse_triggers(program, prep, images, 10,
                           ReverseConfig(steps=1, families=("patch",), max_rows=30,
                                         min_images=4), seed=0)
    assert {trig.rows for trig in few.triggers.values()} == {4}  # 30 // (1 x 10) < 4


def test_the_reverse_forecast_counts_the_rows_a_step_runs_and_times_them():
    from scanner.estimate import reverse_rows, row_seconds

    prep, images, program = _badnets()
    cfg = ReverseConfig(steps=4)
    assert reverse_rows(images.labels, 10, cfg) == 3 * 10 * 9
    # a shortlist of 32 of 100 classes, one image each: 3 x 32 x max(5, 3000 // 96)
    assert reverse_rows(np.arange(100), 100, cfg, targets=32) == 3 * 32 * 31
    run = reverse_triggers(program, prep, images, 10, cfg, seed=0)
    assert run.forward_passes == 4 * reverse_rows(images.labels, 10, cfg)
    forecast = row_seconds(program, prep, images, 10) * reverse_rows(images.labels, 10, cfg) * 4
    # a timing on shared cores: the forecast is right within a factor of a few, not exact
    assert run.seconds / 5 < forecast < run.seconds * 5


def test_data_free_synthesis_on_a_many_class_model_makes_inputs_for_a_sample_of_classes():
    """scanner.detection.synthesis_classes: every class up to detection.shortlist_over,
    above it 64 random classes (at least shortlist + reference_classes), the same for the
    same seed; synthesize makes one input per class asked."""
    from dataclasses import replace
    from types import SimpleNamespace

    from scanner.detection import synthesis_classes
    from scanner.policy import DetectionPolicy
    from scanner.reverse import SynthesisConfig, synthesize

    def ctx(n_classes, seed=0, **det):
        policy = SimpleNamespace(detection=replace(DetectionPolicy(), **det))
        return SimpleNamespace(n_classes=n_classes, policy=policy,
                               opts=SimpleNamespace(seed=seed))

    assert synthesis_classes(ctx(200)).tolist() == list(range(200))
    many = synthesis_classes(ctx(1000))
    assert len(many) == 64 and len(set(many.tolist())) == 64 and many.max() < 1000
    assert synthesis_classes(ctx(1000)).tolist() == many.tolist()
    assert synthesis_classes(ctx(1000, seed=1)).tolist() != many.tolist()
    assert len(synthesis_classes(ctx(1000, shortlist_over=10, reference_classes=60))) == 76
    assert synthesis_classes(ctx(1000, shortlist_over=0)).tolist() == list(range(1000))
    prep, _, program = _badnets()
    images, _ = synthesize(program, prep, 10, SynthesisConfig(steps=1), classes=[2, 7])
    assert images.labels.tolist() == [2, 7] and len(images.pixels) == 2


def test_a_shortlisted_reverse_keeps_the_classes_it_must_judge():
    """The re-scan (the repaired targets) and the second view (the first view's most
    suspicious class) pass `include`: those classes are reversed in full whatever the
    screen ranks them, and never double as reference classes."""
    from dataclasses import replace
    from types import SimpleNamespace

    from scanner.detection import reverse_classes
    from scanner.policy import DetectionPolicy
    from scanner.progress import Progress

    prep, images, program = _badnets()
    det = replace(DetectionPolicy(), shortlist_over=4, shortlist=2, reference_classes=3,
                  screen_steps=2)
    ctx = SimpleNamespace(policy=SimpleNamespace(detection=det), n_classes=10, prep=prep,
                          opts=SimpleNamespace(seed=0), progress=Progress(enabled=False))
    cfg = ReverseConfig(steps=1)
    plain, listed = reverse_classes(ctx, program, images, cfg)
    outsider = next(t for t in range(10) if t not in listed.candidates + listed.reference)
    run, with_it = reverse_classes(ctx, program, images, cfg, include=[outsider])
    assert with_it.candidates == listed.candidates + [outsider]
    assert sorted(run.targets) == sorted(with_it.candidates + with_it.reference)
    assert run.reference == with_it.reference and outsider not in run.reference
    ref_member = listed.reference[0]
    _, as_candidate = reverse_classes(ctx, program, images, cfg, include=[ref_member])
    assert ref_member in as_candidate.candidates and ref_member not in as_candidate.reference


def test_rows_sum_per_target_in_grouped_and_in_any_order():
    from scanner.reverse import _sum_by_target

    values = np.random.default_rng(0).normal(size=(7, 2, 3))
    grouped = np.array([0, 0, 2, 2, 2, 3, 3])  # target 1 has no rows
    expected = np.stack([values[grouped == t].sum(0) for t in range(5)])
    np.testing.assert_allclose(_sum_by_target(values, grouped, 5), expected)
    shuffled = np.array([3, 0, 2, 0, 2, 3, 2])
    expected = np.stack([values[shuffled == t].sum(0) for t in range(5)])
    np.testing.assert_allclose(_sum_by_target(values, shuffled, 5), expected)
    assert _sum_by_target(values[:0], grouped[:0], 5).shape == (5, 2, 3)


def test_the_forecast_counts_the_evidence_stage_rows():
    """estimate.evidence_rows: per reversed class, MM-BD's restarts x (steps + 1) rows and
    per family the selectivity test's 3 x (images of other classes, at most 20) + 2 x own
    images with their 8 shifted copies; none with the evidence off."""
    from dataclasses import replace
    from types import SimpleNamespace

    from scanner.estimate import evidence_rows
    from scanner.policy import DetectionPolicy

    def ctx(**det):
        policy = SimpleNamespace(detection=replace(DetectionPolicy(), **det))
        return SimpleNamespace(n_classes=10, policy=policy,
                               opts=SimpleNamespace(reverse=ReverseConfig()))

    labels = np.arange(10)  # one image per class
    assert evidence_rows(ctx(margin_steps=100), labels) == (
        2 * 101 * 10 + 3 * (3 * 10 * 9 + 2 * 10 * 9))
    assert evidence_rows(ctx(margin_steps=0), labels) == 3 * (3 * 10 * 9 + 2 * 10 * 9)
    assert evidence_rows(ctx(evidence=False), labels) == 0
