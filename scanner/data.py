"""Few-shot and test images, and the preprocessing that maps them onto a model's input.

In memory every image set is *pixel space*: float32 NCHW in [0, 1], with the model's channel
count. Triggers (attacks.py) and trigger reverse (reverse.py) work there; `Preprocess`
is the affine map (scale, mean/std, layout) from pixels to the model's input tensor, so
gradients flow back through it exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
METADATA_KEY = "shapscan.preprocess"


@dataclass(frozen=True)
class Preprocess:
    """model_input = ((pixels * scale) - mean) / std, laid out as `layout`."""

    layout: str = "NCHW"  # or "NHWC"
    channels: int = 1
    height: int = 28
    width: int = 28
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"layout must be NCHW or NHWC, not {self.layout!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) not in (1, self.channels):
                raise DataError(f"{name} needs 1 or {self.channels} values, got {len(value)}")
        if any(s == 0 for s in self.std):
            raise DataError("std must not contain 0")

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        mean = np.broadcast_to(np.asarray(self.mean, np.float32), (self.channels,))
        std = np.broadcast_to(np.asarray(self.std, np.float32), (self.channels,))
        return mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)

    def to_model(self, pixels: np.ndarray) -> np.ndarray:
        mean, std = self._affine()
        x = (pixels.astype(np.float32) * np.float32(self.scale) - mean) / std
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def grad_to_pixels(self, grad_input: np.ndarray) -> np.ndarray:
        """Chain rule through `to_model`: d loss / d pixels from d loss / d model input."""
        _, std = self._affine()
        g = grad_input.transpose(0, 3, 1, 2) if self.layout == "NHWC" else grad_input
        return (g * (np.float32(self.scale) / std)).astype(np.float32)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if self.layout == "NHWC":
            return (self.height, self.width, self.channels)
        return (self.channels, self.height, self.width)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocess:
        known = {"layout", "channels", "height", "width", "scale", "mean", "std"}
        unknown = set(raw) - known
        if unknown:
            raise DataError(f"unknown preprocessing keys: {', '.join(sorted(unknown))}")
        values = dict(raw)
        for key in ("mean", "std"):
            if key in values:
                v = values[key]
                values[key] = tuple(float(a) for a in (v if isinstance(v, list | tuple) else [v]))
        try:
            return cls(**values)
        except TypeError as exc:
            raise DataError(f"bad preprocessing spec: {exc}") from None


@dataclass
class ImageSet:
    pixels: np.ndarray  # float32 NCHW in [0, 1]
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def classes(self) -> np.ndarray:
        return np.unique(self.labels)

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet(self.pixels[idx], self.labels[idx])


def infer_preprocess(input_shape: list[int | str]) -> Preprocess:
    """A default from the model's image input shape: layout from where the 1 or 3 sits."""
    dims = [d if isinstance(d, int) else -1 for d in input_shape]
    if len(dims) != 4:
        raise DataError(f"model input has rank {len(dims)}; expected an image batch of rank 4")
    if dims[1] in (1, 3, 4):
        return Preprocess("NCHW", dims[1], dims[2], dims[3])
    if dims[3] in (1, 3, 4):
        return Preprocess("NHWC", dims[3], dims[1], dims[2])
    raise DataError(f"cannot tell the channel axis of input shape {input_shape}; "
                    "give --layout or a preprocessing sidecar")


def resolve_preprocess(model_path: Path, metadata: dict[str, str],
                       input_shape: list[int | str], overrides: dict | None = None) -> Preprocess:
    """Precedence: command-line overrides > `<model>.preprocess.json` > model metadata > shape."""
    base = asdict(infer_preprocess(input_shape))
    sidecar = model_path.with_suffix(".preprocess.json")
    if sidecar.is_file():
        try:
            base.update(json.loads(sidecar.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{sidecar.name}: unreadable preprocessing sidecar ({exc})") from None
    elif METADATA_KEY in metadata:
        try:
            base.update(json.loads(metadata[METADATA_KEY]))
        except json.JSONDecodeError:
            raise DataError(f"model metadata {METADATA_KEY} is not valid JSON") from None
    base.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Preprocess.from_dict(base)


def load_images(path: str | Path, prep: Preprocess) -> ImageSet:
    """Load a `.npz` (arrays x, y) or a folder of images into pixel space for `prep`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        pixels, labels = _load_folder(path, prep)
    elif path.suffix == ".npz":
        pixels, labels = _load_npz(path)
    else:
        raise DataError(f"{path}: expected a .npz file or a folder of images")
    pixels = _match_channels(pixels, prep.channels, path)
    if pixels.shape[2:] != (prep.height, prep.width):
        raise DataError(f"{path}: images are {pixels.shape[2]}x{pixels.shape[3]}, "
                        f"the model expects {prep.height}x{prep.width}")
    if len(labels) != len(pixels):
        raise DataError(f"{path}: {len(pixels)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{path}: no images")
    return ImageSet(np.ascontiguousarray(pixels, np.float32), labels.astype(np.int64))


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise DataError(f"{path}: .npz must hold arrays 'x' and 'y'")
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except Exception as exc:  # zipfile, pickle refusal, truncated file
        raise DataError(f"{path}: unreadable .npz ({type(exc).__name__}: {exc})") from None
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be a 1-D integer array, got {y.dtype}{list(y.shape)}")
    return _to_nchw_unit(x, path), y


def _to_nchw_unit(x: np.ndarray, path: Path) -> np.ndarray:
    """Accept [N,H,W], [N,H,W,C] or [N,C,H,W]; uint8 0..255 or float 0..1."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: 'x' must have rank 3 or 4, got shape {list(x.shape)}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: 'x' must be uint8 or float, got {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DataError(f"{path}: float images must lie in [0, 1]")
    return x


def _match_channels(pixels: np.ndarray, channels: int, path: Path) -> np.ndarray:
    have = pixels.shape[1]
    if have == channels:
        return pixels
    if have == 1:
        return np.repeat(pixels, channels, axis=1)
    if have == 3 and channels == 1:
        weights = np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, 1, 1)
        return (pixels * weights).sum(axis=1, keepdims=True)
    raise DataError(f"{path}: images have {have} channels, the model expects {channels}")


_LABEL_PREFIX = re.compile(r"^(\d+)[_\-]")


def _load_folder(path: Path, prep: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """`class_dir/xxx.png` (classes sorted by name, or numeric names) or `label_xxx.png`."""
    from PIL import Image, UnidentifiedImageError

    files: list[tuple[Path, int]] = []
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if subdirs:
        numeric = all(d.name.isdigit() for d in subdirs)
        for i, d in enumerate(sorted(subdirs, key=lambda d: int(d.name) if numeric else d.name)):
            label = int(d.name) if numeric else i
            files += [(f, label) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        for f in sorted(path.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            m = _LABEL_PREFIX.match(f.name)
            if not m:
                raise DataError(f"{f}: cannot tell the label; name it LABEL_xxx{f.suffix} "
                                "or put it in a folder per class")
            files.append((f, int(m.group(1))))
    if not files:
        raise DataError(f"{path}: no images found (.png/.jpg in class folders or LABEL_xxx.png)")
    mode = "L" if prep.channels == 1 else "RGB"
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (prep.width, prep.height):
                    im = im.resize((prep.width, prep.height), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{f}: unreadable image ({exc})") from None
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return x.astype(np.float32) / 255.0, np.array([label for _, label in files], np.int64)


# one-pixel moves along one axis first, then diagonals, then two-pixel moves
SHIFTS = ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1),
          (0, 2), (2, 0), (0, -2), (-2, 0))


def shifted(images: ImageSet, copies: int) -> ImageSet:
    """The images followed by `copies` translated versions (np.roll: edges wrap). Cheap
    augmentation: with one image per class, utilities averaged over shifted copies are less
    noisy (FINDINGS 5)."""
    pixels, labels = [images.pixels], [images.labels]
    for dy, dx in SHIFTS[: max(0, copies)]:
        pixels.append(np.roll(images.pixels, (dy, dx), axis=(2, 3)))
        labels.append(images.labels)
    return ImageSet(np.concatenate(pixels), np.concatenate(labels))


def save_npz(path: str | Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    """Store pixel-space images compactly: uint8 NHWC, the layout image tools expect."""
    x = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.savez_compressed(path, x=x, y=labels.astype(np.int64))
