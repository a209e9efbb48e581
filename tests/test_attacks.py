from __future__ import annotations

import inspect

import numpy as np
import pytest

from scanner.attacks import ATTACKS, PARAMS, Attack, AttackError, parse_params

DEFAULTS = {"badnets": {}, "patch": {}, "trojan": {}, "blended": {}, "sig": {}, "wanet": {}}


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


@pytest.mark.parametrize("pattern", ["solid", "checker", "random"])
def test_placed_patch_touches_only_its_square(pattern):
    x = np.full((2, 3, 32, 32), 0.5, np.float32)
    out = Attack("patch", {"size": 4, "row": 10, "col": 20, "pattern": pattern, "seed": 1}
                 ).apply(x)
    changed = np.argwhere(np.abs(out - x).max(axis=(0, 1)) > 0)
    assert changed.min(axis=0).tolist() >= [10, 20] and changed.max(axis=0).tolist() <= [13, 23]
    assert set(np.unique(out[:, :, 10:14, 20:24])) <= {0.0, 1.0}
    if pattern == "checker":
        assert out[0, 0, 10, 20] != out[0, 0, 10, 21]


def test_placed_patch_must_fit():
    with pytest.raises(AttackError, match="does not fit 28x28"):
        Attack("patch", {"size": 4, "row": 26}).apply(np.zeros((1, 1, 28, 28), np.float32))


def test_smooth_blend_is_low_frequency():
    x = np.zeros((1, 3, 32, 32), np.float32)
    smooth = Attack("blended", {"alpha": 1.0, "kind": "smooth"}).apply(x)
    noise = Attack("blended", {"alpha": 1.0, "kind": "noise"}).apply(x)
    assert np.abs(np.diff(smooth, axis=3)).mean() < 0.1 * np.abs(np.diff(noise, axis=3)).mean()


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
    with pytest.raises(AttackError, match="attack parameter 'size' is not key=value"):
        parse_params(("size",))


def test_every_trigger_parameter_is_checked():
    # the table and the trigger functions' keyword arguments are the same names
    for name, fn in ATTACKS.items():
        assert list(PARAMS[name]) == list(inspect.signature(fn).parameters)[1:]


@pytest.mark.parametrize(("name", "params", "message"), [
    ("badnets", {"size": "abc"}, "badnets parameter size must be an integer >= 1, got 'abc'"),
    ("badnets", {"size": 0}, "badnets parameter size must be an integer >= 1, got 0"),
    ("badnets", {"size": -3}, "badnets parameter size must be an integer >= 1, got -3"),
    ("badnets", {"size": 3.5}, "badnets parameter size must be an integer >= 1, got 3.5"),
    ("badnets", {"size": True}, "badnets parameter size must be an integer >= 1, got True"),
    ("badnets", {"loc": "b"}, "badnets parameter loc must be one of tl, tr, bl, br, got 'b'"),
    ("badnets", {"loc": "zz"}, "badnets parameter loc must be one of tl, tr, bl, br, got 'zz'"),
    ("badnets", {"value": 2}, "badnets parameter value must be a number in [0, 1], got 2"),
    ("trojan", {"size": 0}, "trojan parameter size must be an integer >= 1, got 0"),
    ("blended", {"alpha": float("nan")}, "blended parameter alpha must be a number in [0, 1]"),
    ("blended", {"seed": -1}, "blended parameter seed must be an integer >= 0, got -1"),
    ("sig", {"freq": 0}, "sig parameter freq must be a number > 0, got 0"),
    ("sig", {"freq": 10**400}, "sig parameter freq must be a number > 0"),
    ("wanet", {"k": 0}, "wanet parameter k must be an integer >= 2, got 0"),
    ("wanet", {"strength": float("inf")}, "wanet parameter strength must be a number in [0, 1000]"),
    ("badnets", {"colour": "red"},
     "badnets takes no parameter 'colour' (it takes size, loc, value)"),
    ("nope", {}, "unknown attack 'nope' (known: badnets, blended, patch, sig, trojan, wanet)"),
    (["badnets"], {}, "unknown attack ['badnets']"),
])
def test_bad_trigger_parameters_are_refused_when_the_attack_is_built(name, params, message):
    with pytest.raises(AttackError) as err:
        Attack(name, params)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(("name", "key", "fits", "message"), [
    ("badnets", "size", 27, "a patch of size 28 does not fit 28x28 images (at most 27)"),
    ("trojan", "size", 27, "a patch of size 28 does not fit 28x28 images (at most 27)"),
    ("wanet", "k", 28, "wanet's control grid k=29 is finer than 28x28 images (at most 28)"),
])
def test_triggers_larger_than_the_images_are_refused(name, key, fits, message):
    x = np.zeros((1, 1, 28, 28), np.float32)
    Attack(name, {key: fits}).apply(x)
    with pytest.raises(AttackError) as err:
        Attack(name, {key: fits + 1}).apply(x)
    assert str(err.value) == message
