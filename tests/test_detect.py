from __future__ import annotations

import numpy as np
import pytest

from scanner.detect import (
    MIN_CONVERGED,
    EvidenceRule,
    anomaly_indices,
    detect,
    margin_index,
    most_suspicious,
    score,
)
from scanner.evidence import Evidence
from scanner.reverse import ReversedTrigger, ReverseResult


def test_anomaly_index_matches_the_definition():
    norms = np.array([50.0, 52.0, 48.0, 51.0, 49.0, 50.0, 53.0, 47.0, 50.0, 8.0])
    idx = anomaly_indices(norms, log=False)
    median = np.median(norms)
    mad = 1.4826 * np.median(np.abs(norms - median))
    assert idx[9] == pytest.approx((median - 8.0) / mad)
    assert idx[9] > 10 and np.all(idx[:9] < 2)


def test_degenerate_spread_gives_zero():
    assert np.all(anomaly_indices(np.full(10, 3.0)) == 0)


def _result(patch: list[float], universal: list[float],
            warp: list[float] | None = None) -> ReverseResult:
    triggers = {}
    for t, (p, u) in enumerate(zip(patch, universal, strict=True)):
        triggers[("patch", t)] = ReversedTrigger("patch", t, np.zeros((1, 4, 4)),
                                                 np.zeros((4, 4)), p, 1.0)
        triggers[("universal", t)] = ReversedTrigger("universal", t, np.zeros((1, 4, 4)),
                                                     None, u, 1.0)
        if warp is not None:
            triggers[("warp", t)] = ReversedTrigger("warp", t, np.zeros((2, 4, 4)), None,
                                                    warp[t], 1.0)
    return ReverseResult(triggers, steps=1, forward_passes=0, seconds=0.0, classes=len(patch))


def test_a_strong_outlier_flags_and_its_family_supplies_the_trigger():
    patch = [40, 42, 39, 41, 40, 43, 38, 40, 41, 40]
    universal = [3.0, 3.1, 2.9, 3.2, 3.0, 3.1, 0.6, 3.0, 2.9, 3.1]  # class 6: full-image trigger
    verdict = detect(_result(patch, universal), threshold=2.0, warn_threshold=1.5)
    assert verdict.detection.flagged_targets == [6]
    assert verdict.triggers[6].family == "universal"
    assert verdict.detection.classes[6].flagged


def test_a_shortlisted_reverse_is_judged_against_its_reference_classes():
    """A many-class scan reverses candidates (easy to reach, by the screen) and a random
    reference sample: the indices use the reference's median and spread, and the classes
    keep their own ids. Against all reversed classes the candidates would set the median
    themselves and the target would not stand out."""
    ids = [3, 17, 40, 41, 5, 8, 22, 60, 71, 90, 99]  # 4 candidates, then 7 reference
    patch = [6.0, 25.0, 27.0, 28.0, 30.0, 55.0, 40.0, 70.0, 45.0, 35.0, 60.0]
    universal = [0.5, 2.2, 2.3, 2.4, 2.5, 3.6, 3.0, 4.2, 3.1, 2.7, 3.8]
    triggers = {}
    for t, p, u in zip(ids, patch, universal, strict=True):
        triggers[("patch", t)] = ReversedTrigger("patch", t, np.zeros((1, 4, 4)),
                                                 np.zeros((4, 4)), p, 1.0)
        triggers[("universal", t)] = ReversedTrigger("universal", t, np.zeros((1, 4, 4)),
                                                     None, u, 1.0)
    result = ReverseResult(triggers, steps=1, forward_passes=0, seconds=0.0, classes=100,
                           targets=ids, reference=ids[4:])
    verdict = detect(result, threshold=2.5, warn_threshold=2.0)
    assert verdict.detection.flagged_targets == [3]
    assert [c.target for c in verdict.detection.classes] == ids
    ref = np.log(patch[4:])
    mad = 1.4826 * np.median(np.abs(ref - np.median(ref)))
    assert verdict.detection.classes[0].patch_anomaly_index == pytest.approx(
        (np.median(ref) - np.log(6.0)) / mad)
    # the honest easy candidates are below the reference's median but not flagged; judged
    # against all eleven classes, whose median the candidates pull down, the target's
    # index would be smaller
    assert not any(c.flagged for c in verdict.detection.classes[1:])
    alone = detect(ReverseResult(triggers, 1, 0, 0.0, classes=100, targets=ids), 2.5, 2.0)
    assert alone.detection.classes[0].patch_anomaly_index < \
        verdict.detection.classes[0].patch_anomaly_index
    # a reference too small for a spread (a screen that kept nearly every class) is not
    # used: the indices are those against every reversed class
    few = detect(ReverseResult(triggers, 1, 0, 0.0, classes=100, targets=ids,
                               reference=ids[-2:]), 2.5, 2.0)
    assert [c.anomaly_index for c in few.detection.classes] == \
        [c.anomaly_index for c in alone.detection.classes]


def _shortlisted(norms: dict[int, tuple[float, float, float]], reference: list[int]
                 ) -> ReverseResult:
    """A shortlisted reverse: class -> (patch mask, universal norm, success rate of both)."""
    triggers = {}
    for t, (p, u, asr) in norms.items():
        triggers[("patch", t)] = ReversedTrigger("patch", t, np.zeros((1, 4, 4)),
                                                 np.zeros((4, 4)), p, asr)
        triggers[("universal", t)] = ReversedTrigger("universal", t, np.zeros((1, 4, 4)),
                                                     None, u, asr)
    return ReverseResult(triggers, 1, 0, 0.0, classes=1000, targets=list(norms),
                         reference=reference)


# The clean 1,000-class 224x224 MobileNetV2 (shapes1000_mnv2_00, few-shot, fast plan): the
# masks of the reference classes whose triggers flipped their rows, and of those that never
# did in 120 steps (success rate below the 0.95 goal), rounded from the saved report.
REACHED_1000 = [784, 1156, 1243, 1301, 1439, 2064, 2401, 3017, 3493, 3679, 3735, 6509, 7093,
                7127, 7696]
UNREACHED_1000 = [7510, 8258, 8365, 8401, 8534, 8650, 8676, 8766, 8867, 9183, 9237, 9331,
                  9359, 9405, 9419, 9449, 9450, 9543, 9831, 9845, 9991, 10091, 10252, 10277,
                  10333, 10410, 10472, 10512, 10567, 10587, 10590, 10965, 11985, 12116, 12553]


def test_the_yardstick_of_a_shortlisted_scan_is_the_triggers_that_reached_the_goal():
    """A trigger that never flipped its rows has no size yet: on the clean 1,000-class model
    35 of 50 reference triggers stopped, unconverged, in a tight cluster of large masks whose
    small spread made every converged class anomalous (the smallest, 784 pixels, far over
    the threshold). Measured against the references that converged, the same classes are
    ordinary, and a trigger 50 times smaller than them still stands out."""
    ids = list(range(1, 51))
    candidates, reference = ids[:5], ids[5:]  # the five easiest converged: candidates
    reached = dict(zip(ids, REACHED_1000, strict=False))
    unreached = dict(zip(ids[len(REACHED_1000):], UNREACHED_1000, strict=True))
    norms = {t: (m, m / 250.0, 1.0) for t, m in reached.items()}
    norms |= {t: (m, m / 250.0, 0.4) for t, m in unreached.items()}
    clean = detect(_shortlisted(norms, reference), threshold=2.5, warn_threshold=2.0)
    assert clean.detection.flagged_targets == []
    assert max(c.anomaly_index for c in clean.detection.classes) < 2.5
    assert clean.detection.classes[0].family_asr == {"patch": 1.0, "universal": 1.0}
    # the rule it replaces: every reference norm in the yardstick flags the candidates
    old = detect(_shortlisted({t: (p, u, 1.0) for t, (p, u, _) in norms.items()},
                              reference), threshold=2.5, warn_threshold=2.0)
    assert set(old.detection.flagged_targets) == set(candidates)
    backdoored = detect(_shortlisted(norms | {0: (43.0, 0.5, 1.0)}, reference), 2.5, 2.0)
    assert backdoored.detection.flagged_targets == [0]
    # fewer than MIN_CONVERGED reference triggers reached the goal: no spread can be
    # measured from them, so the whole reference is the yardstick, as before
    few = {t: (p, u, 1.0 if t < 5 + MIN_CONVERGED else 0.4) for t, (p, u, _) in norms.items()}
    assert detect(_shortlisted(few, reference), 2.5, 2.0).detection.flagged_targets == \
        old.detection.flagged_targets


def test_a_shortlisted_scan_never_flags_its_reference_classes():
    """The reference is the yardstick, drawn at random: an outlier among it is reported as
    suspicious, not flagged, and does not count in the decision score or as the class
    closest to a flag (the clean 1,000-class model: a reference class's full-image trigger
    2.4 times below the median, combined index 2.99). The same class as a candidate is
    flagged."""
    ids = list(range(1, 51))
    norms = {t: (m, m / 250.0, 1.0) for t, m in zip(ids, np.geomspace(1000, 8000, 50),
                                                    strict=True)}
    norms[30] = (norms[30][0], norms[30][1] / 100.0, 1.0)  # a small full-image trigger
    reference = ids[5:]
    verdict = detect(_shortlisted(norms, reference), threshold=2.5, warn_threshold=2.0)
    det = verdict.detection
    by_class = {c.target: c for c in det.classes}
    assert by_class[30].anomaly_index > 2.5 and not by_class[30].flagged
    assert det.flagged_targets == [] and 30 in verdict.suspicious
    assert det.yardstick_classes == reference
    assert score(det, 2.0, 1.0) < 1.0 < score(det, 2.0, 1.0, classes=[30])
    assert most_suspicious(det, 2.0, 1.0) in ids[:5]
    as_candidate = detect(_shortlisted(norms, [t for t in reference if t != 30]), 2.5, 2.0)
    assert as_candidate.detection.flagged_targets == [30]


def test_clean_model_is_not_flagged():
    patch = [36, 44, 38, 42, 40, 39, 41, 37, 43, 40]  # honest spread: no outlier
    universal = [2.8, 3.2, 3.0, 2.85, 3.1, 3.0, 2.75, 3.3, 3.05, 2.9]
    verdict = detect(_result(patch, universal), threshold=2.0, warn_threshold=1.5)
    assert verdict.detection.flagged_targets == []


# Trigger norms measured on the sample zoo (benchmarks/detection.py --dump): the two cases
# that shaped the rule.
RESNET_BADNETS = ([28.94, 2.94, 22.19, 44.93, 22.93, 75.22, 16.49, 70.13, 17.72, 56.7],
                  [2.24, 1.17, 1.62, 3.83, 1.55, 6.41, 1.17, 7.5, 1.67, 5.53])
CNN_CLEAN = ([45.45, 35.28, 35.62, 41.84, 34.44, 45.1, 20.84, 58.44, 18.39, 48.59],
             [3.94, 2.67, 2.24, 2.81, 2.09, 3.53, 1.58, 4.04, 2.13, 2.88])


def test_an_isolated_patch_trigger_is_flagged_even_when_the_mean_index_is_low():
    verdict = detect(_result(*RESNET_BADNETS), threshold=2.5, warn_threshold=2.0)
    c = verdict.detection.classes[1]
    assert c.anomaly_index < 2.5 and c.patch_isolation > 2.0
    assert verdict.detection.flagged_targets == [1]
    assert verdict.triggers[1].family == "patch"
    assert verdict.reasons == {1: "patch"}


def test_a_naturally_easy_pair_of_classes_is_not_flagged():
    # bag (8) and shirt (6) are both easy to reach on a clean model: neither stands alone
    verdict = detect(_result(*CNN_CLEAN), threshold=2.5, warn_threshold=2.0)
    assert verdict.detection.flagged_targets == []
    assert verdict.detection.classes[8].patch_anomaly_index > 3.0
    assert verdict.detection.classes[8].patch_isolation < 1.0


# Few-shot norms (patch, universal, warp) on the WaNet zoo model, target 6: its warp is
# 0.23 pixels RMS against 3–7 for the other classes, its combined index only 2.1.
CNN_WANET = ([38.72, 46.83, 28.51, 46.57, 27.93, 36.15, 18.42, 46.34, 18.24, 45.0],
             [2.92, 2.84, 1.94, 3.48, 1.86, 2.61, 1.40, 3.18, 2.08, 2.75],
             [3.44, 5.98, 4.61, 3.77, 3.17, 6.29, 0.23, 7.42, 3.87, 5.16])
CNN_CLEAN_WARP = [2.90, 5.05, 3.69, 2.86, 3.60, 3.32, 3.96, 3.87, 2.87, 2.22]


def test_an_isolated_warp_trigger_flags_and_supplies_the_trigger():
    verdict = detect(_result(*CNN_WANET), threshold=2.5, warn_threshold=2.0)
    c = verdict.detection.classes[6]
    assert c.anomaly_index < 2.5 < c.warp_anomaly_index and c.warp_isolation > 5
    assert verdict.detection.flagged_targets == [6]
    assert verdict.triggers[6].family == "warp"
    assert verdict.reasons == {6: "warp"}


def test_the_warp_family_stays_out_of_the_combined_index():
    with_warp = detect(_result(*CNN_CLEAN, CNN_CLEAN_WARP), threshold=2.5, warn_threshold=2.0)
    without = detect(_result(*CNN_CLEAN), threshold=2.5, warn_threshold=2.0)
    assert [c.anomaly_index for c in with_warp.detection.classes] == pytest.approx(
        [c.anomaly_index for c in without.detection.classes])
    assert with_warp.detection.flagged_targets == []
    assert with_warp.detection.classes[9].warp_norm == pytest.approx(2.22)


def test_a_warp_outlier_below_the_threshold_is_not_flagged():
    # isolated but only at the warn level: the warp test asks for the full threshold
    warp = [3.0, 5.0, 3.6, 4.4, 2.8, 4.0, 5.4, 3.3, 4.7, 1.8]
    verdict = detect(_result(*CNN_CLEAN, warp), threshold=2.5, warn_threshold=1.5)
    c = verdict.detection.classes[9]
    assert 1.5 < c.warp_anomaly_index < 2.5 and c.warp_isolation >= 1.0
    assert 9 not in verdict.detection.flagged_targets


@pytest.mark.parametrize("norms, flagged", [
    (CNN_WANET, True),  # warp test
    (RESNET_BADNETS, True),  # patch test
    ((*CNN_CLEAN, CNN_CLEAN_WARP), False)])
def test_the_roc_score_crosses_1_exactly_when_a_test_flags(norms, flagged):
    verdict = detect(_result(*norms), threshold=2.5, warn_threshold=2.0, isolation_threshold=1.0)
    s = score(verdict.detection, warn_threshold=2.0, isolation_threshold=1.0)
    assert bool(verdict.detection.flagged_targets) == flagged == (s > 1.0)
    # the combined index alone would miss both backdoors (it stays below the threshold)
    assert max(c.anomaly_index for c in verdict.detection.classes) < 2.5


def test_the_finding_quotes_the_test_that_flagged_the_class():
    from scanner.api import _why_flagged
    from scanner.policy import DetectionPolicy

    policy = DetectionPolicy()
    wanet = detect(_result(*CNN_WANET), policy.anomaly_threshold, policy.warn_threshold)
    text = _why_flagged(wanet.detection.classes[6], wanet.reasons[6], policy, 1.5)
    assert text.startswith("warp anomaly index ") and "> 2.5" in text and "≥ 1" in text
    badnets = detect(_result(*RESNET_BADNETS), policy.anomaly_threshold, policy.warn_threshold)
    text = _why_flagged(badnets.detection.classes[1], badnets.reasons[1], policy, 1.5)
    assert text.startswith("patch anomaly index ") and "> 2" in text


def _evidence(margins: list[float], selectivity: float | dict[int, float] = 1.0) -> Evidence:
    sel = selectivity if isinstance(selectivity, dict) else {t: selectivity for t in range(10)}
    return Evidence(max_margin=np.array(margins),
                    selectivity={(f, t): v for t, v in sel.items()
                                 for f in ("patch", "universal")})


MARGINS = [10.0, 11.0, 9.0, 40.0, 10.5, 9.5, 10.0, 11.5, 10.0, 9.0]  # class 3 stands out


def test_a_selective_class_with_a_far_larger_max_margin_is_flagged_by_it():
    """CNN_CLEAN's norms flag nothing. Class 3's max margin is far above the others'
    (index > 10): with the margin test on (scale 5) and its triggers selective it is
    flagged by the margin alone, and the finding says so; off, or with its triggers
    riding on its own features (selectivity -1 below the gate 0), it is not."""
    plain = detect(_result(*CNN_CLEAN), 2.5, 2.0, evidence=_evidence(MARGINS))
    assert plain.detection.flagged_targets == []
    rule = EvidenceRule(margin_scale=5.0)
    lifted = detect(_result(*CNN_CLEAN), 2.5, 2.0, evidence=_evidence(MARGINS),
                    evidence_rule=rule)
    assert lifted.detection.flagged_targets == [3] and lifted.reasons[3] == "evidence"
    c = lifted.detection.classes[3]
    assert c.margin_index == pytest.approx(margin_index(np.array(MARGINS))[3])
    assert c.margin_index > 10
    gated = detect(_result(*CNN_CLEAN), 2.5, 2.0, evidence=_evidence(MARGINS, {3: -1.0}),
                   evidence_rule=rule)
    assert gated.detection.flagged_targets == []
    from scanner.api import _why_flagged
    from scanner.policy import DetectionPolicy
    text = _why_flagged(c, "evidence", DetectionPolicy(margin_scale=5.0),
                        c.margin_index / 5.0)
    assert text.startswith("MM-BD max-margin index") and "> 5" in text
    assert "norm tests alone did not flag it" in text


def test_a_class_whose_trigger_rides_on_its_own_features_is_withdrawn():
    """Selectivity (evidence.py): zeroing the channels of class 1's reversed triggers
    costs its own images far more than the triggers (log ratio -2): an honest easy class.
    Below the floor -0.5 the norm tests do not flag it; without the rule they do."""
    evidence = _evidence([1.0] * 10, {1: -2.0})
    kept = detect(_result(*RESNET_BADNETS), 2.5, 2.0, evidence=evidence)
    assert kept.detection.flagged_targets == [1]
    withdrawn = detect(_result(*RESNET_BADNETS), 2.5, 2.0, evidence=evidence,
                       evidence_rule=EvidenceRule(selectivity_floor=-0.5))
    assert withdrawn.detection.flagged_targets == []
    assert withdrawn.detection.classes[1].selectivity == {"patch": -2.0, "universal": -2.0}
    assert score(withdrawn.detection, 2.0, 1.0,
                 evidence_rule=EvidenceRule(selectivity_floor=-0.5)) <= 1.0
