from __future__ import annotations

import numpy as np
import pytest

from scanner.data import ImageSet
from scanner.reverse import (
    _FAMILY_TYPES,
    ReverseConfig,
    ReversedTrigger,
    reverse_triggers,
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
