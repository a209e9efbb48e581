"""Smooth image warps: bilinear resampling along a displacement field, and its gradient.

One implementation serves the WaNet attack (`attacks.wanet`) and the warp family of the
trigger reverse (`reverse`), so the reversed trigger samples images exactly as the attack
does: bilinear interpolation at (row + flow[0], column + flow[1]), coordinates clamped to
the border. Images are NCHW; flows are in pixels, [2, H, W], one per image [N, 2, H, W],
or F flows [F, 2, H, W] with an index naming each image's flow (the reverse: one flow per
candidate class, several images each). The work is done in the images' and flows' float
type (float32 in a scan) and one flow at a time: its sampling is set up once and its
images are gathered with one `np.take` along the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def upsample_matrix(k: int, n: int) -> np.ndarray:
    """The [n, k] linear map that upsamples k control points bilinearly to n positions
    spanning them end to end (WaNet's control grid: `linspace(0, k - 1, n)`)."""
    pos = np.linspace(0, k - 1, n, dtype=np.float64)
    lo = np.clip(np.floor(pos).astype(int), 0, k - 2)
    frac = pos - lo
    u = np.zeros((n, k), np.float32)
    u[np.arange(n), lo] = 1 - frac
    u[np.arange(n), lo + 1] = frac
    return u


@dataclass
class _Sampling:
    """Where every output pixel of each flow reads: the top-left corner (flat index) and
    the weights, [F, H·W] for F flows."""

    top_left: np.ndarray  # flat index of (y0, x0)
    wy: np.ndarray
    wx: np.ndarray
    inside_y: np.ndarray  # the unclamped coordinate lies strictly inside: it has a gradient
    inside_x: np.ndarray


def _sampling(flow: np.ndarray, h: int, w: int) -> _Sampling:
    """In the flow's float type: floor and clamp stay in floats, so the weights are exact
    differences (sy - y0 is exact in float32 too) and a float32 flow keeps float32 work."""
    gy, gx = np.meshgrid(np.arange(h, dtype=flow.dtype), np.arange(w, dtype=flow.dtype),
                         indexing="ij")
    ry = gy + flow[:, 0]
    rx = gx + flow[:, 1]
    sy = np.clip(ry, 0, h - 1)
    sx = np.clip(rx, 0, w - 1)
    y0 = np.clip(np.floor(sy), 0, h - 2)
    x0 = np.clip(np.floor(sx), 0, w - 2)
    top_left = (y0.astype(np.intp) * w + x0.astype(np.intp)).reshape(len(flow), h * w)
    flat = (len(flow), h * w)
    return _Sampling(top_left, (sy - y0).reshape(flat), (sx - x0).reshape(flat),
                     ((ry > 0) & (ry < h - 1)).reshape(flat),
                     ((rx > 0) & (rx < w - 1)).reshape(flat))


def _groups(x: np.ndarray, flow: np.ndarray, index: np.ndarray | None):
    """(flow number, the images that use it) for `flow` [2, H, W] (shared), [N, 2, H, W]
    (one per image) or [F, 2, H, W] with `index` [N] naming each image's flow."""
    if flow.ndim == 3:
        return flow[None], [(0, np.arange(len(x)))]
    if index is None:
        if len(flow) != len(x):
            raise ValueError(f"{len(flow)} flows for {len(x)} images: pass an index")
        return flow, [(i, np.array([i])) for i in range(len(x))]
    index = np.asarray(index)
    if not len(index):
        return flow, []
    order = np.argsort(index, kind="stable")
    cuts = np.flatnonzero(np.diff(index[order])) + 1
    return flow, [(int(index[rows[0]]), rows) for rows in np.split(order, cuts)]


def _corners(images: np.ndarray, top_left: np.ndarray, w: int) -> list[np.ndarray]:
    """The four neighbours (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1) of every
    output pixel, [K, C, H·W] for K images sampled alike (one gather along the pixels)."""
    k, c, h, _ = images.shape
    n = top_left.size
    taken = np.take(images.reshape(k * c, h * w),
                    np.concatenate([top_left + off for off in (0, 1, w, w + 1)]), axis=1)
    return [taken[:, i * n:(i + 1) * n].reshape(k, c, n) for i in range(4)]


def _work_type(x: np.ndarray, flow: np.ndarray) -> np.dtype:
    return np.result_type(x.dtype if x.dtype.kind == "f" else np.float32, flow.dtype)


def warp(x: np.ndarray, flow: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """Resample images `x` [N, C, H, W] along `flow` (pixels): [2, H, W] for all images,
    [N, 2, H, W] one per image, or [F, 2, H, W] with `index` naming each image's flow."""
    _, c, h, w = x.shape
    dt = _work_type(x, flow)
    flows, groups = _groups(x, np.asarray(flow, dt), index)
    s = _sampling(flows, h, w)
    out = np.empty(x.shape, x.dtype)
    for f, rows in groups:
        v00, v01, v10, v11 = _corners(x[rows].astype(dt, copy=False), s.top_left[f], w)
        wy, wx = s.wy[f], s.wx[f]
        top = v00 + wx * (v01 - v00)
        bottom = v10 + wx * (v11 - v10)
        out[rows] = (top + wy * (bottom - top)).reshape(len(rows), c, h, w)
    return out


def warp_flow_grad(x: np.ndarray, flow: np.ndarray, grad_out: np.ndarray,
                   index: np.ndarray | None = None) -> np.ndarray:
    """d loss / d flow, in the flow's shape (a flow that several images share gets the sum
    of their gradients), from d loss / d warp(x, flow, index) [N, C, H, W].

    Bilinear sampling is linear in each coordinate between grid lines, so the derivative
    along y is the difference of the bottom and top interpolants (along x likewise), summed
    over channels; a coordinate clamped to the border has none.
    """
    _, c, h, w = x.shape
    dt = _work_type(x, flow)
    flows, groups = _groups(x, np.asarray(flow, dt), index)
    s = _sampling(flows, h, w)
    grad = np.zeros((len(flows), 2, h * w), dt)
    for f, rows in groups:
        v00, v01, v10, v11 = _corners(x[rows].astype(dt, copy=False), s.top_left[f], w)
        g = grad_out[rows].astype(dt, copy=False).reshape(len(rows), c, h * w)
        wy, wx = s.wy[f], s.wx[f]
        d_sy = (v10 - v00) + wx * ((v11 - v01) - (v10 - v00))
        d_sx = (v01 - v00) + wy * ((v11 - v10) - (v01 - v00))
        grad[f, 0] = np.einsum("kcp,kcp->p", g, d_sy) * s.inside_y[f]
        grad[f, 1] = np.einsum("kcp,kcp->p", g, d_sx) * s.inside_x[f]
    return grad.reshape(flow.shape).astype(np.float32)
