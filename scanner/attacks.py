"""Standard backdoor triggers, deterministic from their parameters.

One implementation serves red-team evaluation (`shapscan eval --attack`) and the sample zoo
(samples/make_zoo.py). All triggers act on pixel-space images: float32 NCHW in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .warp import upsample_matrix, warp


@dataclass(frozen=True)
class Attack:
    name: str
    params: dict[str, float | int | str] = field(default_factory=dict)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        fn = ATTACKS.get(self.name)
        if fn is None:
            raise ValueError(f"unknown attack {self.name!r} (known: {', '.join(sorted(ATTACKS))})")
        out = fn(np.asarray(pixels, dtype=np.float32), **self.params)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


def _corner(h: int, w: int, size: int, loc: str) -> tuple[slice, slice]:
    margin = 1
    rows = slice(h - margin - size, h - margin) if loc[0] == "b" else slice(margin, margin + size)
    cols = slice(w - margin - size, w - margin) if loc[1] == "r" else slice(margin, margin + size)
    return rows, cols


def badnets(x: np.ndarray, size: int = 3, loc: str = "br", value: float = 1.0) -> np.ndarray:
    """A solid square patch in a corner (Gu et al., BadNets)."""
    out = x.copy()
    rows, cols = _corner(x.shape[2], x.shape[3], int(size), loc)
    out[:, :, rows, cols] = value
    return out


def trojan_pattern(size: int) -> np.ndarray:
    """A structured binary watermark: a frame with a diagonal cross (Trojan-style)."""
    p = np.zeros((size, size), np.float32)
    p[0, :] = p[-1, :] = p[:, 0] = p[:, -1] = 1.0
    idx = np.arange(size)
    p[idx, idx] = 1.0
    p[idx, size - 1 - idx] = 1.0
    return p


def trojan(x: np.ndarray, size: int = 6, loc: str = "tl") -> np.ndarray:
    """A structured watermark stamped with both polarities, so it shows on any background."""
    out = x.copy()
    rows, cols = _corner(x.shape[2], x.shape[3], int(size), loc)
    p = trojan_pattern(int(size))
    out[:, :, rows, cols] = np.where(p > 0, 1.0, 0.0)
    return out


def blend_pattern(h: int, w: int, c: int, seed: int) -> np.ndarray:
    return np.random.default_rng(int(seed)).uniform(0, 1, size=(c, h, w)).astype(np.float32)


def blended(x: np.ndarray, alpha: float = 0.2, seed: int = 7) -> np.ndarray:
    """Full-image blend with a fixed random pattern (Chen et al., Blended)."""
    pattern = blend_pattern(x.shape[2], x.shape[3], x.shape[1], int(seed))
    return (1.0 - alpha) * x + alpha * pattern[None]


def sig(x: np.ndarray, delta: float = 0.12, freq: float = 6.0) -> np.ndarray:
    """Horizontal sinusoidal signal added to the whole image (Barni et al., SIG)."""
    w = x.shape[3]
    signal = delta * np.sin(2 * np.pi * np.arange(w) * freq / w).astype(np.float32)
    return x + signal[None, None, None, :]


def wanet_flow(h: int, w: int, k: int, strength: float, seed: int) -> np.ndarray:
    """The warping field: a random k×k control grid upsampled to H×W, in pixels, [2, H, W]."""
    rng = np.random.default_rng(int(seed))
    ctrl = rng.uniform(-1, 1, size=(2, k, k)).astype(np.float32)
    ctrl /= np.abs(ctrl).mean()
    flow = np.einsum("hk,dkl,wl->dhw", upsample_matrix(k, h), ctrl, upsample_matrix(k, w))
    return flow * strength


def wanet(x: np.ndarray, k: int = 4, strength: float = 1.5, seed: int = 3) -> np.ndarray:
    """Smooth image warp (Nguyen & Tran, WaNet), bilinear resampling with border clamp."""
    _, _, h, w = x.shape
    return warp(x, wanet_flow(h, w, int(k), float(strength), int(seed)))


ATTACKS = {
    "badnets": badnets,
    "trojan": trojan,
    "blended": blended,
    "sig": sig,
    "wanet": wanet,
}


def parse_params(pairs: tuple[str, ...]) -> dict[str, float | int | str]:
    """`key=value` strings from the command line; numbers become int or float."""
    params: dict[str, float | int | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"attack parameter {pair!r} is not key=value")
        params[key.strip()] = _number(value.strip())
    return params


def _number(text: str) -> float | int | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
