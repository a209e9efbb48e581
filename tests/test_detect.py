from __future__ import annotations

import numpy as np
import pytest

from scanner.detect import anomaly_indices, detect, margin_index, score
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


def _margins(values: list[float]) -> Evidence:
    return Evidence(concentration={}, max_margin=np.array(values))


def test_the_max_margin_lifts_a_class_the_norms_alone_leave_below_the_cut():
    """CNN_CLEAN's norms flag nothing; with class 3's max margin far above the others'
    (index 10) and weight 0.1, its decision score passes 1 by the margin term, and the
    finding says so. The same margins at weight 0 change nothing."""
    margins = [10.0, 11.0, 9.0, 40.0, 10.5, 9.5, 10.0, 11.5, 10.0, 9.0]
    plain = detect(_result(*CNN_CLEAN), 2.5, 2.0, evidence=_margins(margins))
    assert plain.detection.flagged_targets == []
    lifted = detect(_result(*CNN_CLEAN), 2.5, 2.0, evidence=_margins(margins),
                    margin_weight=0.1)
    assert lifted.detection.flagged_targets == [3] and lifted.reasons[3] == "evidence"
    c = lifted.detection.classes[3]
    assert c.margin_index == pytest.approx(margin_index(np.array(margins))[3])
    assert c.margin_index > 10
    from scanner.api import _why_flagged
    from scanner.policy import DetectionPolicy
    text = _why_flagged(c, "evidence", DetectionPolicy(margin_weight=0.1), 1.2)
    assert "max-margin index" in text and "decision score is 1.20 > 1" in text


def test_a_higher_cut_withdraws_a_weak_flag():
    flagged = detect(_result(*RESNET_BADNETS), 2.5, 2.0)
    assert flagged.detection.flagged_targets == [1]
    ratio = score(flagged.detection, 2.0, 1.0)
    assert ratio > 1
    assert detect(_result(*RESNET_BADNETS), 2.5, 2.0,
                  cut=ratio + 0.01).detection.flagged_targets == []


def test_second_view_helpers_pick_withdraw_and_score_one_class():
    from scanner.detect import most_suspicious

    patch = [40, 42, 39, 41, 40, 43, 38, 40, 41, 40]
    universal = [3.0, 0.4, 2.9, 3.2, 3.0, 3.1, 0.5, 3.0, 2.9, 3.1]  # classes 1 and 6 stand out
    verdict = detect(_result(patch, universal), threshold=2.0, warn_threshold=1.5)
    assert sorted(verdict.detection.flagged_targets) == [1, 6]
    assert most_suspicious(verdict.detection, 1.5, 1.0) == 1  # the smaller universal norm
    both = score(verdict.detection, 1.5, 1.0)
    only_6 = score(verdict.detection, 1.5, 1.0, classes=[6])
    assert 1.0 < only_6 < both
    assert score(verdict.detection, 1.5, 1.0, classes=[0]) < 1.0
    kept = verdict.keep_only(6)
    assert kept.detection.flagged_targets == [6]
    assert [c.target for c in kept.detection.classes if c.flagged] == [6]
    assert set(kept.triggers) == set(kept.reasons) == {6}


# cnn_clean, few-shot, seed 1: the ankle boot's warp (2.17 px) has index 3.98 and stands
# 1.52 σ apart because the honest warps cluster, yet it is only 1.6 times below the median
CNN_CLEAN_SEED1 = ([48.2, 36.7, 37.8, 43.0, 35.0, 43.7, 21.3, 56.3, 17.5, 50.9],
                   [3.84, 2.65, 2.29, 2.72, 2.09, 3.75, 1.62, 4.53, 2.15, 3.40],
                   [3.34, 4.95, 3.95, 3.52, 3.68, 2.62, 3.56, 6.28, 3.56, 2.17])


def test_a_clustered_honest_warp_needs_the_median_ratio_too():
    verdict = detect(_result(*CNN_CLEAN_SEED1), threshold=2.5, warn_threshold=2.0,
                     isolation_threshold=1.0)
    boot = verdict.detection.classes[9]
    assert boot.warp_anomaly_index > 2.5 and boot.warp_isolation >= 1.0
    assert boot.warp_ratio == pytest.approx(3.56 / 2.17, rel=1e-6)
    assert verdict.detection.flagged_targets == []
    assert score(verdict.detection, 2.0, 1.0) < 1.0
    # without the ratio (warp_ratio 1) the old rule flags it
    loose = detect(_result(*CNN_CLEAN_SEED1), threshold=2.5, warn_threshold=2.0,
                   isolation_threshold=1.0, warp_ratio=1.0)
    assert loose.detection.flagged_targets == [9]
    assert score(loose.detection, 2.0, 1.0, warp_ratio=1.0) > 1.0


# silunet_trojan, few-shot, seed 1: nothing is flagged; the shirt (6) has the largest
# combined index, but the trojan target (5) comes closest to a flag (patch index 2.00,
# isolation 0.93): the second view's flag must agree with 5, not with 6
SILUNET_TROJAN_SEED1 = ([38.2, 54.7, 29.7, 52.8, 30.2, 10.6, 18.7, 39.7, 18.3, 48.0],
                        [4.90, 4.84, 3.75, 4.64, 3.05, 3.17, 2.14, 3.90, 3.43, 4.03],
                        [3.17, 5.44, 5.25, 5.90, 5.68, 3.39, 3.52, 6.34, 5.55, 2.84])


def test_most_suspicious_is_the_class_closest_to_a_flag():
    from scanner.detect import most_suspicious

    verdict = detect(_result(*SILUNET_TROJAN_SEED1), threshold=2.5, warn_threshold=2.0,
                     isolation_threshold=1.0)
    det = verdict.detection
    assert det.flagged_targets == []
    assert max(det.classes, key=lambda c: c.anomaly_index).target == 6
    assert most_suspicious(det, 2.0, 1.0) == 5
    assert score(det, 2.0, 1.0, [5]) == pytest.approx(score(det, 2.0, 1.0))


def test_a_class_whose_trigger_rides_on_its_own_features_is_withdrawn():
    """Selectivity (evidence.py): zeroing the channels of class 1's reversed triggers
    costs its own images far more than the triggers (log ratio -5): an honest easy class.
    At weight 0.2 that takes 1.0 off its decision score, below the cut; at weight 0 it
    stays flagged."""
    sel = {("patch", 1): -5.0, ("universal", 1): -5.0}
    evidence = Evidence(concentration={}, max_margin=None, selectivity=sel)
    kept = detect(_result(*RESNET_BADNETS), 2.5, 2.0, evidence=evidence)
    assert kept.detection.flagged_targets == [1]
    withdrawn = detect(_result(*RESNET_BADNETS), 2.5, 2.0, evidence=evidence,
                       selectivity_weight=0.2)
    assert withdrawn.detection.flagged_targets == []
    assert withdrawn.detection.classes[1].selectivity == {"patch": -5.0, "universal": -5.0}
