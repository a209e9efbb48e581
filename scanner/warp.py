"""Smooth image warps: bilinear resampling along a displacement field, and its gradient.

One implementation serves the WaNet attack (`attacks.wanet`) and the warp family of the
trigger reverse (`reverse`), so the reversed trigger samples images exactly as the attack
does: bilinear interpolation at (row + flow[0], column + flow[1]), coordinates clamped to
the border. Images are float32 NCHW; flows are in pixels, [2, H, W] or one per image
[N, 2, H, W].
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
    """Where every output pixel reads: the top-left corner (flat index) and the weights."""

    top_left: np.ndarray  # [N or 1, 1, H·W] flat index of (y0, x0)
    wy: np.ndarray  # [N or 1, H, W]
    wx: np.ndarray
    inside_y: np.ndarray  # the unclamped coordinate lies strictly inside: it has a gradient
    inside_x: np.ndarray


def _sampling(flow: np.ndarray, h: int, w: int) -> _Sampling:
    flow = flow if flow.ndim == 4 else flow[None]
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")
    ry = gy + flow[:, 0]
    rx = gx + flow[:, 1]
    sy = np.clip(ry, 0, h - 1)
    sx = np.clip(rx, 0, w - 1)
    y0 = np.clip(np.floor(sy).astype(np.intp), 0, h - 2)
    x0 = np.clip(np.floor(sx).astype(np.intp), 0, w - 2)
    top_left = (y0 * w + x0).reshape(len(flow), 1, h * w)
    return _Sampling(top_left, sy - y0, sx - x0, (ry > 0) & (ry < h - 1),
                     (rx > 0) & (rx < w - 1))


def _corners(x: np.ndarray, s: _Sampling) -> tuple[np.ndarray, ...]:
    """The four neighbours (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    shape = (n, c, h * w)
    return tuple(np.take_along_axis(flat, np.broadcast_to(s.top_left + off, shape), 2)
                 .reshape(n, c, h, w) for off in (0, 1, w, w + 1))


def warp(x: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Resample images `x` [N, C, H, W] along `flow` (pixels; [2, H, W] or [N, 2, H, W])."""
    _, _, h, w = x.shape
    s = _sampling(flow, h, w)
    v00, v01, v10, v11 = _corners(x, s)
    wy, wx = s.wy[:, None], s.wx[:, None]
    top = (1 - wx) * v00 + wx * v01
    bottom = (1 - wx) * v10 + wx * v11
    return ((1 - wy) * top + wy * bottom).astype(x.dtype)


def warp_flow_grad(x: np.ndarray, flow: np.ndarray, grad_out: np.ndarray) -> np.ndarray:
    """d loss / d flow [N, 2, H, W] from d loss / d warp(x, flow) [N, C, H, W].

    Bilinear sampling is linear in each coordinate between grid lines, so the derivative
    along y is the difference of the bottom and top interpolants (along x likewise), summed
    over channels; a coordinate clamped to the border has none.
    """
    _, _, h, w = x.shape
    s = _sampling(flow, h, w)
    v00, v01, v10, v11 = _corners(x, s)
    wy, wx = s.wy[:, None], s.wx[:, None]
    d_sy = (1 - wx) * (v10 - v00) + wx * (v11 - v01)
    d_sx = (1 - wy) * (v01 - v00) + wy * (v11 - v10)
    return np.stack([(grad_out * d_sy).sum(1) * s.inside_y,
                     (grad_out * d_sx).sum(1) * s.inside_x], axis=1).astype(np.float32)
