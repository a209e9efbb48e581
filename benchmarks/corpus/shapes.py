"""A procedurally drawn 32x32 RGB dataset with 20 classes, deterministic for a seed.

The class is the shape; everything else is nuisance drawn at random: the shape's colour,
size, position and a small rotation, and the background (a flat colour, a gradient or
a texture of soft noise). With `hues` > 1 the shape's hue is part of the class too:
class = shape x hues + hue band (20 x 5 = 100 classes for the many-class models), the
fill drawn saturated from that band. Drawn at 64x64 with Pillow and downsampled, so edges are
antialiased. No downloads: the second dataset of the development corpus, beside
Fashion-MNIST, so that "10 grayscale classes" is not baked into any default.

    python benchmarks/corpus/shapes.py --out /tmp/shapes.npz   # draw and save
"""

from __future__ import annotations

import argparse
import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32
CANVAS = 64

Point = tuple[float, float]


def _polygon(n: int, phase: float = -math.pi / 2) -> list[Point]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _star(n: int = 5, inner: float = 0.45) -> list[Point]:
    pts = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Each shape is a list of filled polygons (unit coordinates, radius 1) and holes drawn in
# the background colour, so one polygon routine draws them all and rotation is uniform.
SHAPES: dict[str, tuple[list[list[Point]], list[list[Point]]]] = {
    "circle": ([_polygon(40)], []),
    "square": ([_rect(-0.8, -0.8, 0.8, 0.8)], []),
    "triangle_up": ([_polygon(3)], []),
    "triangle_down": ([_polygon(3, math.pi / 2)], []),
    "diamond": ([_polygon(4)], []),
    "pentagon": ([_polygon(5)], []),
    "hexagon": ([_polygon(6, 0)], []),
    "star": ([_star(5)], []),
    "plus": ([_rect(-0.25, -0.9, 0.25, 0.9), _rect(-0.9, -0.25, 0.9, 0.25)], []),
    "ring": ([_polygon(40)], [[(0.55 * x, 0.55 * y) for x, y in _polygon(40)]]),
    "frame": ([_rect(-0.85, -0.85, 0.85, 0.85)], [_rect(-0.5, -0.5, 0.5, 0.5)]),
    "hbar": ([_rect(-0.95, -0.3, 0.95, 0.3)], []),
    "vbar": ([_rect(-0.3, -0.95, 0.3, 0.95)], []),
    "ell": ([_rect(-0.7, -0.9, -0.2, 0.9), _rect(-0.7, 0.4, 0.8, 0.9)], []),
    "tee": ([_rect(-0.9, -0.9, 0.9, -0.4), _rect(-0.25, -0.9, 0.25, 0.9)], []),
    "half_disc": ([[(math.cos(a), math.sin(a) + 0.3)
                    for a in np.linspace(math.pi, 2 * math.pi, 24)]], []),
    "two_dots": ([[(0.4 * x - 0.5, 0.4 * y) for x, y in _polygon(24)],
                  [(0.4 * x + 0.5, 0.4 * y) for x, y in _polygon(24)]], []),
    "arrow": ([[(-0.9, -0.2), (0.2, -0.2), (0.2, -0.6), (0.95, 0.0), (0.2, 0.6), (0.2, 0.2),
                (-0.9, 0.2)]], []),
    "star_six": ([_star(6, 0.55)], []),
    "crescent": ([_polygon(40)], [[(0.85 * x + 0.45, 0.85 * y - 0.1) for x, y in _polygon(40)]]),
}
CLASSES = tuple(SHAPES)


def _colour(rng: np.random.Generator, light: tuple[float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(*light))
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, dark: bool, kind: int | None = None,
                canvas: int = CANVAS) -> Image.Image:
    """A flat colour, a gradient or soft noise (kind 0-2, drawn at random unless given);
    kinds 3 and 4, stripes and a checkerboard, only when the class chooses them."""
    light = (0.05, 0.4) if dark else (0.6, 1.0)
    if kind is None:
        kind = int(rng.integers(3))
    if kind == 0:
        return Image.new("RGB", (canvas, canvas), _colour(rng, light))
    a = np.array(_colour(rng, light), np.float32)
    b = np.array(_colour(rng, light), np.float32)
    yy, xx = np.mgrid[0:canvas, 0:canvas] / (canvas - 1) - 0.5
    if kind == 1:  # a linear gradient in a random direction
        angle = rng.uniform(0, 2 * math.pi)
        t = np.clip(0.5 + xx * math.cos(angle) + yy * math.sin(angle), 0, 1)[..., None]
    elif kind == 2:  # soft noise: coarse random field, blurred by the upsampling
        coarse = rng.uniform(0, 1, size=(6, 6)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize(
            (canvas, canvas), Image.BICUBIC), np.float32)[..., None] / 255.0
    else:  # stripes (3) or a checkerboard (4), 5-9 periods across, at a random angle
        angle = rng.uniform(0, math.pi)
        period = 1.0 / rng.uniform(5, 9)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        t = (np.floor(u / period) % 2 if kind == 3
             else (np.floor(u / period) + np.floor(v / period)) % 2)[..., None]
    pixels = a * (1 - t) + b * t
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw(label: int, rng: np.random.Generator, hues: int = 1, backgrounds: int = 1,
         size: int = SIZE) -> np.ndarray:
    """One image of class `label`: uint8 [size, size, 3]. With `backgrounds` > 1 the
    background's kind is part of the class too (the last factor: label % backgrounds)."""
    kind = None
    if backgrounds > 1:
        label, kind = divmod(label, backgrounds)
    canvas = 2 * size if size <= 64 else size  # large images need no antialiasing pass
    dark = bool(rng.integers(2))
    img = _background(rng, dark, kind, canvas)
    fill = _colour(rng, (0.65, 1.0) if dark else (0.05, 0.45))
    if hues > 1:  # the hue band is the class's: saturated, and bright enough to show it
        band = label % hues
        r, g, b = colorsys.hsv_to_rgb(rng.uniform(band + 0.15, band + 0.85) / hues,
                                      rng.uniform(0.7, 1.0),
                                      rng.uniform(0.75, 1.0) if dark else rng.uniform(0.35, 0.6))
        fill = int(r * 255), int(g * 255), int(b * 255)
        label //= hues
    radius = rng.uniform(0.28, 0.42) * canvas
    cx = canvas / 2 + rng.uniform(-0.12, 0.12) * canvas
    cy = canvas / 2 + rng.uniform(-0.12, 0.12) * canvas
    angle = rng.uniform(-0.25, 0.25)
    cos, sin = math.cos(angle), math.sin(angle)

    def place(poly: list[Point]) -> list[Point]:
        return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos))
                for x, y in poly]

    pen = ImageDraw.Draw(img)
    solids, holes = SHAPES[CLASSES[label]]
    for poly in solids:
        pen.polygon(place(poly), fill=fill)
    if holes:
        # a hole shows the background again: cut it out of a copy of the background
        mask = Image.new("L", (canvas, canvas), 0)
        hole_pen = ImageDraw.Draw(mask)
        for poly in holes:
            hole_pen.polygon(place(poly), fill=255)
        img.paste(_background(np.random.default_rng(rng.integers(2**31)), dark, kind, canvas),
                  (0, 0), mask)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5) * canvas / CANVAS))
    small = img if canvas == size else img.resize((size, size), Image.LANCZOS)
    noise = rng.normal(0, rng.uniform(0, 8), size=(size, size, 3))
    return np.clip(np.asarray(small, np.float32) + noise, 0, 255).astype(np.uint8)


def make(n_per_class: int, seed: int, hues: int = 1, backgrounds: int = 1,
         size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """`n_per_class` images of every class, interleaved: uint8 NHWC and int64 labels."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CLASSES) * hues * backgrounds), n_per_class)
    images = np.stack([draw(int(y), rng, hues, backgrounds, size) for y in labels])
    return images, labels.astype(np.int64)


def dataset(train_per_class: int = 600, test_per_class: int = 100
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Float NCHW in [0, 1]: train and test drawn from different seeds."""
    xtr, ytr = make(train_per_class, seed=1)
    xte, yte = make(test_per_class, seed=2)

    def to_float(x: np.ndarray) -> np.ndarray:
        return x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    return to_float(xtr), ytr, to_float(xte), yte


def _render_sheet(path: Path) -> None:
    x, _ = make(4, seed=3)
    rows = [np.concatenate(list(x[r * len(CLASSES):(r + 1) * len(CLASSES)]), axis=1)
            for r in range(4)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (len(CLASSES) * 64, 4 * 64), Image.NEAREST).save(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sheet", type=Path, help="write a contact sheet (4 images per class)")
    args = ap.parse_args()
    if args.sheet:
        _render_sheet(args.sheet)
