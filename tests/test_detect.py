from __future__ import annotations

import numpy as np
import pytest

from scanner.detect import anomaly_indices, detect
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


def _result(patch: list[float], universal: list[float]) -> ReverseResult:
    triggers = {}
    for t, (p, u) in enumerate(zip(patch, universal, strict=True)):
        triggers[("patch", t)] = ReversedTrigger("patch", t, np.zeros((1, 4, 4)),
                                                 np.zeros((4, 4)), p, 1.0)
        triggers[("universal", t)] = ReversedTrigger("universal", t, np.zeros((1, 4, 4)),
                                                     None, u, 1.0)
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
