"""Detection evidence beside the norms (scanner/evidence.py) and the mask-gradient program it
and the Shapley stage's first-order ranking run on."""

from __future__ import annotations

import numpy as np
from conftest import FEWSHOT, zoo_model

from scanner.api import model_preprocess
from scanner.autodiff import GradientProgram
from scanner.autodiff.masks import MaskGradientProgram
from scanner.data import load_images
from scanner.evidence import MarginConfig, max_margins, selectivities
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


def test_selectivity_for_every_trigger():
    model, prep, layers, images = _loaded("cnn_badnets")
    program = MaskGradientProgram(model.runnable, layers)
    rng = np.random.default_rng(0)
    shape = images.pixels.shape[1:]
    triggers = {("universal", t): ReversedTrigger("universal", t,
                                                  rng.normal(0, 0.1, shape).astype(np.float32),
                                                  None, 1.0, 1.0) for t in range(10)}
    select, passes = selectivities(program, prep, images, triggers, 10)
    assert set(select) == set(triggers)
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


def test_the_real_backdoor_is_selective():
    """cnn_badnets' own trigger (a 3x3 white patch, bottom right, target 0) as a reversed
    trigger: zeroing its top channels takes the trigger's effect away and leaves the
    target's own images theirs, a clearly positive log ratio (the default rule vetoes
    below -1)."""
    from scanner.attacks import _corner

    model, prep, layers, images = _loaded("cnn_badnets")
    mask = np.zeros((28, 28), np.float32)
    mask[_corner(28, 28, 3, "br")] = 1.0
    real = ReversedTrigger("patch", 0, np.ones((1, 28, 28), np.float32), mask, 9.0, 1.0)
    select, _ = selectivities(MaskGradientProgram(model.runnable, layers), prep, images,
                              {("patch", 0): real}, 10)
    assert select[("patch", 0)] > 1.0
