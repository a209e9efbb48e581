from __future__ import annotations

import numpy as np
import pytest

from scanner.attacks import wanet_flow
from scanner.warp import upsample_matrix, warp, warp_flow_grad


def _images(n: int = 3, c: int = 2, h: int = 9, w: int = 11) -> np.ndarray:
    return np.random.default_rng(0).uniform(size=(n, c, h, w))


def test_zero_flow_is_identity_and_an_integer_flow_shifts_with_border_clamp():
    x = _images()
    np.testing.assert_array_equal(warp(x, np.zeros((2, 9, 11))), x)
    flow = np.zeros((2, 9, 11))
    flow[1] = 2.0  # read two columns to the right
    out = warp(x, flow)
    np.testing.assert_allclose(out[..., :-2], x[..., 2:])
    np.testing.assert_allclose(out[..., -2:], x[..., -1:].repeat(2, -1))  # clamped


def test_one_flow_per_image_matches_the_shared_flow():
    x = _images()
    flow = np.random.default_rng(1).normal(0, 1.5, (2, 9, 11))
    np.testing.assert_allclose(warp(x, np.broadcast_to(flow, (3, 2, 9, 11))), warp(x, flow))


def test_flows_named_by_an_index_match_one_flow_per_image_and_sum_their_gradients():
    # the reverse's form: F flows (one per candidate class), each image naming its own
    x = _images(6).astype(np.float32)
    flows = np.random.default_rng(1).normal(0, 1.5, (3, 2, 9, 11)).astype(np.float32)
    index = np.array([2, 0, 2, 1, 0, 2])
    np.testing.assert_allclose(warp(x, flows, index), warp(x, flows[index]), atol=1e-6)
    g = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    per_image = warp_flow_grad(x, flows[index], g)
    summed = np.stack([per_image[index == f].sum(0) for f in range(3)])
    np.testing.assert_allclose(warp_flow_grad(x, flows, g, index), summed, atol=1e-5)
    assert warp(x, flows, index).dtype == np.float32


def test_a_shared_flow_gets_the_gradient_summed_over_its_images():
    x = _images()
    flow = np.random.default_rng(1).normal(0, 1.5, (2, 9, 11))
    g = np.random.default_rng(2).normal(size=x.shape)
    per_image = warp_flow_grad(x, np.broadcast_to(flow, (3, 2, 9, 11)), g)
    np.testing.assert_allclose(warp_flow_grad(x, flow, g), per_image.sum(0), rtol=1e-5,
                               atol=1e-6)


def test_upsample_matrix_is_the_wanet_control_grid_upsampling():
    rng = np.random.default_rng(3)  # wanet_flow's draw for seed 3
    ctrl = rng.uniform(-1, 1, size=(2, 4, 4)).astype(np.float32)
    ctrl /= np.abs(ctrl).mean()
    u = upsample_matrix(4, 28)
    np.testing.assert_allclose(u.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(np.einsum("hk,dkl,wl->dhw", u, 1.5 * ctrl, u),
                               wanet_flow(28, 28, 4, 1.5, 3), atol=1e-5)


@pytest.mark.parametrize("scale", [0.7, 3.0])  # 3 px: some coordinates clamp at the border
def test_flow_gradient_matches_finite_differences(scale):
    x = _images()
    rng = np.random.default_rng(2)
    flow = rng.normal(0, scale, (3, 2, 9, 11))
    g = rng.normal(size=x.shape)
    analytic = warp_flow_grad(x, flow, g)
    eps = 1e-4
    numeric = np.zeros_like(flow)
    for idx in np.ndindex(*flow.shape):
        d = np.zeros_like(flow)
        d[idx] = eps
        numeric[idx] = ((g * warp(x, flow + d)).sum() - (g * warp(x, flow - d)).sum()) / (2 * eps)
    # bilinear sampling has kinks on grid lines: compare where no kink is within eps
    frac = np.stack([np.arange(9)[:, None] + flow[:, 0], np.arange(11)[None] + flow[:, 1]], 1)
    smooth = np.abs(frac - np.round(frac)) > 2 * eps
    assert smooth.mean() > 0.9
    np.testing.assert_allclose(analytic[smooth], numeric[smooth], rtol=1e-4, atol=1e-5)
