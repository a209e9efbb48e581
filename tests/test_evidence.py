"""Detection evidence beside the norms (scanner/evidence.py) and the mask-gradient program it
and the Shapley stage's first-order ranking run on."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FEWSHOT, zoo_model

from scanner.api import model_preprocess
from scanner.autodiff import GradientProgram
from scanner.autodiff.masks import MaskGradientProgram
from scanner.data import load_images
from scanner.evidence import MarginConfig, channel_evidence, max_margins, top_share
from scanner.graph.activations import discover_activations
from scanner.graph.load import load_model
from scanner.graph.mask import MaskedModel
from scanner.reverse import ReversedTrigger

FD_RTOL = 2e-2  # float32 central differences of a piecewise-linear function


def _loaded(name: str):
    model = load_model(zoo_model(name))
    prep = model_preprocess(model)
    layers = discover_activations(model.runnable)
    return model, prep, layers, load_images(FEWSHOT, prep)


def test_mask_gradients_match_finite_differences_on_a_zoo_model():
    model, prep, layers, images = _loaded("cnn_badnets")
    program = MaskGradientProgram(model.runnable, layers)
    masked = MaskedModel(model.runnable, layers)
    x = prep.to_model(images.pixels[:4])
    weights = np.zeros((4, 10), np.float32)
    weights[np.arange(4), [1, 2, 3, 4]] = 1.0
    weights[:, 0] -= 1.0
    logits, grads = program.run(x, weights)
    np.testing.assert_allclose(logits, masked.run_ones(x), rtol=1e-4, atol=1e-4)
    assert grads.shape == (4, program.n_channels)
    rng = np.random.default_rng(0)
    largest = np.argsort(-np.abs(grads).sum(0))[:4]
    for ch in [*largest.tolist(), *rng.choice(program.n_channels, 4, replace=False).tolist()]:
        h = 1e-2
        up = np.ones((4, program.n_channels), np.float32)
        down = up.copy()
        up[:, ch] += h
        down[:, ch] -= h
        fd = ((masked.run_flat(x, up) - masked.run_flat(x, down)) * weights).sum(1) / (2 * h)
        np.testing.assert_allclose(grads[:, ch], fd, rtol=FD_RTOL,
                                   atol=FD_RTOL * np.abs(grads).max())


@pytest.mark.parametrize(("support", "expected"), [
    (np.r_[10.0, np.zeros(99)], 1.0),  # one channel carries everything
    (np.ones(100), 0.01),  # spread evenly: the top 1 % holds 1 %
    (-np.ones(100), 0.0),  # nothing supports the trigger
    (np.r_[3.0, 1.0, -5.0, np.zeros(97)], 0.75),  # negative support is not counted
])
def test_top_share(support, expected):
    assert top_share(support) == pytest.approx(expected)


def test_channel_evidence_for_every_trigger():
    model, prep, layers, images = _loaded("cnn_badnets")
    program = MaskGradientProgram(model.runnable, layers)
    rng = np.random.default_rng(0)
    shape = images.pixels.shape[1:]
    triggers = {("universal", t): ReversedTrigger("universal", t,
                                                  rng.normal(0, 0.1, shape).astype(np.float32),
                                                  None, 1.0, 1.0) for t in range(10)}
    shares, select, passes = channel_evidence(program, prep, images, triggers, 10)
    assert set(shares) == set(select) == set(triggers)
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    assert all(np.isfinite(v) for v in select.values())
    # stamped, clean and own images (9 shifted copies of one), then stamped and own again
    assert passes == 10 * (2 * 9 + 9 + 9 + 9)


def test_max_margin_is_largest_for_the_backdoor_target():
    """MM-BD on cnn_badnets (target 0, a 3x3 patch): the target's logit can be pushed
    furthest above all the others (measured: 49 against at most 26 for honest classes)."""
    model, prep, _, _ = _loaded("cnn_badnets")
    margins, passes = max_margins(GradientProgram(model.runnable), prep, 10,
                                  MarginConfig(steps=60))
    assert margins.shape == (10,) and np.isfinite(margins).all()
    assert int(np.argmax(margins)) == 0
    assert passes == 61 * 20
