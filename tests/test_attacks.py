from __future__ import annotations

import numpy as np
import pytest

from scanner.attacks import ATTACKS, Attack, parse_params

DEFAULTS = {"badnets": {}, "trojan": {}, "blended": {}, "sig": {}, "wanet": {}}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_trigger_is_deterministic_bounded_and_changes_the_image(name):
    x = np.random.default_rng(0).uniform(0.2, 0.8, (4, 1, 28, 28)).astype(np.float32)
    a = Attack(name, DEFAULTS[name]).apply(x)
    b = Attack(name, DEFAULTS[name]).apply(x.copy())
    assert a.dtype == np.float32 and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert np.abs(a - x).max() > 0.05


def test_patch_triggers_touch_only_their_corner():
    x = np.zeros((1, 1, 28, 28), np.float32)
    out = Attack("badnets", {"size": 3, "loc": "br"}).apply(x)
    assert out.sum() == 9 and out[0, 0, 24:27, 24:27].min() == 1
    out = Attack("trojan", {"size": 6, "loc": "tl"}).apply(x)
    assert out[0, 0, 7:, :].sum() == 0 and out[0, 0, :, 7:].sum() == 0


def test_blended_is_a_convex_mix():
    x = np.zeros((1, 3, 8, 8), np.float32)
    out = Attack("blended", {"alpha": 0.2}).apply(x)
    assert out.max() <= 0.2 + 1e-6


def test_wanet_zero_strength_is_identity():
    x = np.random.default_rng(1).uniform(size=(2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(Attack("wanet", {"strength": 0.0}).apply(x), x, atol=1e-6)


def test_parse_params():
    assert parse_params(("size=3", "alpha=0.5", "loc=br")) == {"size": 3, "alpha": 0.5,
                                                               "loc": "br"}
    with pytest.raises(ValueError):
        parse_params(("size",))
    with pytest.raises(ValueError):
        Attack("nope").apply(np.zeros((1, 1, 2, 2), np.float32))
