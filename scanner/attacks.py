"""Standard backdoor triggers, deterministic from their parameters.

One implementation serves red-team evaluation (`shapscan eval --attack`) and the sample zoo
(samples/make_zoo.py). All triggers act on pixel-space images: float32 NCHW in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .data import FLOAT32_MAX
from .warp import upsample_matrix, warp


class AttackError(ValueError):
    """A trigger that cannot be built: an unknown attack, a parameter it does not take, or
    one of the wrong type or out of range (a patch larger than the images)."""


@dataclass(frozen=True)
class Param:
    """What one trigger parameter takes: a value of `kind` that `ok` accepts, as `rule` says."""

    kind: type  # int, float (an int will do) or str
    rule: str
    ok: Callable[[float | int | str], bool]

    def check(self, attack: str, key: str, value: object) -> None:
        if isinstance(value, bool):  # an int to Python, never a trigger parameter
            valid = False
        elif self.kind is float:  # finite: NaN fails the comparison
            valid = isinstance(value, int | float) and abs(value) <= FLOAT32_MAX and self.ok(value)
        else:
            valid = isinstance(value, self.kind) and self.ok(value)
        if not valid:
            raise AttackError(f"{attack} parameter {key} must be {self.rule}, got {value!r}")


@dataclass(frozen=True)
class Attack:
    name: str
    params: dict[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in ATTACKS:
            raise AttackError(f"unknown attack {self.name!r} "
                              f"(known: {', '.join(sorted(ATTACKS))})")
        takes = PARAMS[self.name]
        for key, value in self.params.items():
            if key not in takes:
                raise AttackError(f"{self.name} takes no parameter {key!r} "
                                  f"(it takes {', '.join(takes)})")
            takes[key].check(self.name, key, value)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        out = ATTACKS[self.name](np.asarray(pixels, dtype=np.float32), **self.params)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


def _corner(h: int, w: int, size: int, loc: str) -> tuple[slice, slice]:
    margin = 1
    if size > min(h, w) - margin:
        raise AttackError(f"a patch of size {size} does not fit {h}x{w} images "
                          f"(at most {min(h, w) - margin})")
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


def patch_pattern(c: int, size: int, pattern: str, seed: int, value: float) -> np.ndarray:
    """The [C, size, size] content of a placeable patch."""
    if pattern == "solid":
        return np.full((c, size, size), value, np.float32)
    if pattern == "checker":
        board = (np.add.outer(np.arange(size), np.arange(size)) % 2).astype(np.float32)
        return np.broadcast_to(board, (c, size, size)).copy()
    rng = np.random.default_rng(int(seed))
    return rng.integers(0, 2, size=(c, size, size)).astype(np.float32)


def patch(x: np.ndarray, size: int = 3, row: int = 1, col: int = 1, pattern: str = "solid",
          seed: int = 0, value: float = 1.0) -> np.ndarray:
    """A square patch at any place, on the object too (BadNets variants): a solid square, a
    checkerboard, or a random binary pattern per channel."""
    _, c, h, w = x.shape
    size, row, col = int(size), int(row), int(col)
    if row + size > h or col + size > w:
        raise AttackError(f"a {size}x{size} patch at row {row}, column {col} does not fit "
                          f"{h}x{w} images")
    out = x.copy()
    out[:, :, row:row + size, col:col + size] = patch_pattern(c, size, pattern, seed, value)
    return out


def blend_pattern(h: int, w: int, c: int, seed: int, kind: str = "noise") -> np.ndarray:
    """The blend: uniform noise per pixel, or a smooth image-like field (a random 4x4 grid
    of colours upsampled bilinearly: large soft blobs, like blending a picture)."""
    rng = np.random.default_rng(int(seed))
    if kind == "noise":
        return rng.uniform(0, 1, size=(c, h, w)).astype(np.float32)
    grid = rng.uniform(0, 1, size=(c, 4, 4)).astype(np.float32)
    field = np.einsum("hk,ckl,wl->chw", upsample_matrix(4, h), grid, upsample_matrix(4, w))
    lo, hi = field.min(), field.max()
    return ((field - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def blended(x: np.ndarray, alpha: float = 0.2, seed: int = 7, kind: str = "noise") -> np.ndarray:
    """Full-image blend with a fixed pattern (Chen et al., Blended)."""
    pattern = blend_pattern(x.shape[2], x.shape[3], x.shape[1], int(seed), kind)
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
    if k > min(h, w):  # a control point per pixel is already the finest warp
        raise AttackError(f"wanet's control grid k={k} is finer than {h}x{w} images "
                          f"(at most {min(h, w)})")
    return warp(x, wanet_flow(h, w, int(k), float(strength), int(seed)))


ATTACKS = {
    "badnets": badnets,
    "patch": patch,
    "trojan": trojan,
    "blended": blended,
    "sig": sig,
    "wanet": wanet,
}

SIZE = Param(int, "an integer >= 1", lambda v: v >= 1)
LOC = Param(str, "one of tl, tr, bl, br", lambda v: v in ("tl", "tr", "bl", "br"))
UNIT = Param(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
SEED = Param(int, "an integer >= 0", lambda v: v >= 0)
PARAMS: dict[str, dict[str, Param]] = {
    "badnets": {"size": SIZE, "loc": LOC, "value": UNIT},
    "trojan": {"size": SIZE, "loc": LOC},
    "patch": {"size": SIZE, "row": Param(int, "an integer >= 0", lambda v: v >= 0),
              "col": Param(int, "an integer >= 0", lambda v: v >= 0),
              "pattern": Param(str, "one of solid, checker, random",
                               lambda v: v in ("solid", "checker", "random")),
              "seed": SEED, "value": UNIT},
    "blended": {"alpha": UNIT, "seed": SEED,
                "kind": Param(str, "one of noise, smooth", lambda v: v in ("noise", "smooth"))},
    "sig": {"delta": UNIT, "freq": Param(float, "a number > 0", lambda v: v > 0)},
    "wanet": {"k": Param(int, "an integer >= 2", lambda v: v >= 2),
              # pixels of displacement, about: 1,000 is far past any image's edge
              "strength": Param(float, "a number in [0, 1000]", lambda v: 0 <= v <= 1000),
              "seed": SEED},
}


def parse_params(pairs: tuple[str, ...]) -> dict[str, float | int | str]:
    """`key=value` strings from the command line; numbers become int or float."""
    params: dict[str, float | int | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AttackError(f"attack parameter {pair!r} is not key=value")
        params[key.strip()] = _number(value.strip())
    return params


def _number(text: str) -> float | int | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
