"""Few-shot and test images, and the preprocessing that maps them onto a model's input.

In memory every image set is *pixel space*: float32 NCHW in [0, 1], with the model's channel
count. Triggers (attacks.py) and trigger reverse (reverse.py) work there; `Preprocess`
is the affine map (scale, mean/std, layout) from pixels to the model's input tensor, so
gradients flow back through it exactly.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, ShapscanError, UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CHANNEL_COUNTS = (1, 2, 3, 4)  # gray, gray+alpha, RGB, RGBA
METADATA_KEY = "shapscan.preprocess"
SHAPE_SOURCE = "the model's input shape"
# what each preprocessing field takes, as said in the error when a spec gives something else
FIELD_RULES = {
    "layout": "NCHW or NHWC",
    "channels": "a positive integer",
    "height": "a positive integer",
    "width": "a positive integer",
    "scale": "a number in (0, 1e6]",
    "mean": "a number or a list of numbers",
    "std": "a number in [1e-6, 1e6] or a list of them",
}
FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    # the model takes each image flattened, [N, C*H*W] in `layout`'s order (NCHW: C, H, W
    # row-major; NHWC: H, W, C), as a scikit-learn MLP exported by skl2onnx does; read from
    # the model's rank-2 input, never from a sidecar
    flat: bool = False

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
        # in place on one copy: at 224x224 a reverse step converts 840 images, and each
        # temporary of the plain expression cost a 500 MB pass (same values either way)
        x = pixels.astype(np.float32)
        x *= np.float32(self.scale)
        x -= mean
        x /= std
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        if self.flat:
            x = x.reshape(len(x), -1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def grad_to_pixels(self, grad_input: np.ndarray) -> np.ndarray:
        """Chain rule through `to_model`: d loss / d pixels from d loss / d model input."""
        _, std = self._affine()
        if self.flat:
            grad_input = grad_input.reshape(len(grad_input), *self.image_shape)
        g = grad_input.transpose(0, 3, 1, 2) if self.layout == "NHWC" else grad_input
        return (g * (np.float32(self.scale) / std)).astype(np.float32, copy=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One image in `layout`, before any flattening."""
        if self.layout == "NHWC":
            return (self.height, self.width, self.channels)
        return (self.channels, self.height, self.width)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One row of the model's input."""
        if self.flat:
            return (self.channels * self.height * self.width,)
        return self.image_shape

    def to_json(self) -> str:
        fields = asdict(self)
        del fields["flat"]  # the model's input rank says it
        return json.dumps(fields)


def _is_number(value: object) -> bool:
    """A finite number that float32 holds (NaN fails the comparison)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and abs(value) <= FLOAT32_MAX)


def preprocess_field(key: str, value: object) -> object:
    """`value` as preprocessing field `key` (mean and std as tuples); a one-line ValueError
    saying what the field takes when it cannot be one."""
    if key == "layout":
        ok = value in ("NCHW", "NHWC")
    elif key in ("channels", "height", "width"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    elif key == "scale":
        ok = _is_number(value) and 0 < value <= 1e6  # past it float32 images overflow
    else:  # mean, std: one value for every channel, or one per channel
        values = value if isinstance(value, list | tuple) else [value]
        ok = bool(values) and all(_is_number(v) and (key == "mean" or 1e-6 <= v <= 1e6)
                                  for v in values)
        value = tuple(float(v) for v in values) if ok else value
    if not ok:
        raise ValueError(f"{key} must be {FIELD_RULES[key]}, got {json.dumps(value)}")
    return value


def _spec_fields(raw: object, source: str) -> dict:
    """The fields a sidecar or the model metadata sets, each checked; errors name `source`."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a JSON object of preprocessing fields, "
                        f"got {json.dumps(raw)[:60]}")
    unknown = set(raw) - set(FIELD_RULES)
    if unknown:
        raise DataError(f"{source}: unknown preprocessing keys: {', '.join(sorted(unknown))}")
    try:
        return {key: preprocess_field(key, value) for key, value in raw.items()}
    except ValueError as exc:
        raise DataError(f"{source}: {exc}") from None


@dataclass
class ImageSet:
    pixels: np.ndarray  # float32 NCHW in [0, 1]
    labels: np.ndarray  # int64 [N]
    # images resized to the model's input on request (--resize): original "HxW" -> count
    resized: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def classes(self) -> np.ndarray:
        return np.unique(self.labels)

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet(self.pixels[idx], self.labels[idx])


def infer_preprocess(input_shape: list[int | str], layout: str | None = None) -> Preprocess:
    """A default from the model's image input shape: layout from where the 1, 3 or 4
    channels sit, else `layout` (from a flag or sidecar) when the shape cannot tell."""
    dims = [d if isinstance(d, int) else -1 for d in input_shape]
    if len(dims) == 2:  # flat images: their shape comes from flags or the sidecar
        return Preprocess(layout or "NCHW", 1, 0, 0, flat=True)
    if len(dims) != 4:
        raise DataError(f"model input has rank {len(dims)}; expected an image batch of rank 4 "
                        "or flat images of rank 2")
    unclear = dims[1] not in (1, 3, 4) and dims[3] not in (1, 3, 4)
    if dims[1] in (1, 3, 4) or unclear and layout == "NCHW":
        return Preprocess("NCHW", dims[1], dims[2], dims[3])
    if dims[3] in (1, 3, 4) or unclear and layout == "NHWC":
        return Preprocess("NHWC", dims[3], dims[1], dims[2])
    raise DataError(f"cannot tell the channel axis of input shape {input_shape}; "
                    "give --layout or a preprocessing sidecar")


def resolve_preprocess(model_path: Path, metadata: dict[str, str],
                       input_shape: list[int | str], overrides: dict | None = None) -> Preprocess:
    """Precedence: command-line overrides (checked by the CLI) > `<model>.preprocess.json` >
    model metadata > shape.

    A bad sidecar or metadata field is a DataError naming its source; so is a spec that
    contradicts the model's input shape, or whose mean/std do not fit its channels, unless
    an override takes part: then it is a UsageError."""
    source, fields = _stored_fields(model_path, metadata)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    inferred = asdict(infer_preprocess(input_shape, flags.get("layout", fields.get("layout"))))
    spec = dict(inferred)
    origin = dict.fromkeys(spec, SHAPE_SOURCE)
    spec.update(fields)
    origin.update(dict.fromkeys(fields, source))
    spec.update(flags)
    origin.update({k: f"--{k}" for k in flags})
    channels = spec["channels"]
    for key in ("mean", "std"):
        if len(spec[key]) not in (1, channels):
            wanted = "1 value" if channels == 1 else f"1 value or {channels}"
            raise _contradiction(f"{key} has {len(spec[key])} values ({origin[key]}) but the "
                                 f"input has {channels} channel{'s' * (channels > 1)} "
                                 f"({origin['channels']}); give {wanted}", origin[key],
                                 origin["channels"])
    prep = Preprocess(**spec)
    if prep.flat and min(prep.height, prep.width) <= 0:
        raise DataError(f"model input is flat {_dims(input_shape)}: give the image shape with "
                        "--height, --width and --channels (and --layout for the flattening "
                        "order, NCHW by default: C, H, W row-major) or as height, width, "
                        f"channels in {model_path.stem}.preprocess.json beside the model")
    given = prep.input_shape
    if any(isinstance(d, int) and d > 0 and d != g
           for d, g in zip(input_shape[1:], given, strict=True)):
        sources = sorted({origin[k] for k in ("layout", "channels", "height", "width")
                          if spec[k] != inferred[k]})
        raise _contradiction(f"preprocessing from {' and '.join(sources)} gives input "
                             f"[N, {', '.join(map(str, given))}], but the model takes "
                             f"[{', '.join(map(str, input_shape))}]", *sources)
    return prep


def _dims(shape: list[int | str]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" if i == 0 else "?"
                           for i, d in enumerate(shape)) + "]"


def _stored_fields(model_path: Path, metadata: dict[str, str]) -> tuple[str, dict]:
    """The checked fields of the sidecar beside the model, else of the model metadata, and
    where they come from."""
    sidecar = model_path.with_suffix(".preprocess.json")
    if sidecar.is_file():
        try:
            raw = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{sidecar}: unreadable preprocessing sidecar ({exc})") from None
        return str(sidecar), _spec_fields(raw, str(sidecar))
    if METADATA_KEY in metadata:
        source = f"model metadata {METADATA_KEY}"
        try:
            raw = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise DataError(f"{source} is not valid JSON") from None
        return source, _spec_fields(raw, source)
    return SHAPE_SOURCE, {}


def _contradiction(message: str, *sources: str) -> ShapscanError:
    """A flag at odds with the model is a usage error; a sidecar or metadata is bad data."""
    return (UsageError if any(s.startswith("--") for s in sources) else DataError)(message)


def load_images(path: str | Path, prep: Preprocess, resize: bool = False) -> ImageSet:
    """Load a `.npz` (arrays x, y) or a folder of images into pixel space for `prep`.

    Images of another size than the model's input are refused unless `resize` (then
    resized bilinearly, and counted in `ImageSet.resized`): a resize changes what a small
    trigger looks like, and 64x64 images silently resized for a clean 28x28 model gave a
    false backdoor verdict."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    resized: Counter[str] = Counter()
    if path.is_dir():
        pixels, labels = _load_folder(path, prep, resized if resize else None)
    elif not path.is_file():  # a FIFO or device would block the read
        raise DataError(f"{path}: not a regular file or folder")
    elif path.suffix.lower() == ".npz":
        pixels, labels = _load_npz(path, prep.channels)
    else:
        raise DataError(f"{path}: expected a .npz file or a folder of images")
    pixels = _match_channels(pixels, prep.channels, path)
    if len(labels) != len(pixels):
        raise DataError(f"{path}: {len(pixels)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{path}: no images")
    if pixels.shape[2:] != (prep.height, prep.width):
        if not resize:
            raise _size_error(path, Counter({_size(*pixels.shape[2:]): len(pixels)}),
                              len(pixels), prep)
        resized[_size(*pixels.shape[2:])] += len(pixels)
        pixels = _resized(pixels, prep.height, prep.width)
    return ImageSet(np.ascontiguousarray(pixels, np.float32), labels.astype(np.int64),
                    dict(resized))


def _size(height: int, width: int) -> str:
    return f"{height}x{width}"


def _size_error(path: Path, sizes: Counter[str], total: int, prep: Preprocess,
                first: Path | None = None) -> DataError:
    """Wrong-size images, refused as one line that says how to go on."""
    wanted = _size(prep.height, prep.width)
    shown = " and ".join(size for size, _ in sizes.most_common(3))
    if len(sizes) > 3:
        shown += f" and {len(sizes) - 3} more sizes"
    count = sum(sizes.values())
    which = "images are" if count == total else f"{count} of {total} images are"
    where = f" (first: {first})" if first is not None and count < total else ""
    return DataError(f"{path}: {which} {shown}{where}, the model expects {wanted}; resize "
                     f"them to {wanted}, or give --resize to have them resized (bilinear)")


def _resized(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N, C, H, W] in [0, 1] resized bilinearly, one float channel at a time (as PIL
    resizes a folder's images)."""
    from PIL import Image

    out = np.empty((*pixels.shape[:2], height, width), np.float32)
    for i, image in enumerate(pixels):
        for c, channel in enumerate(image):
            out[i, c] = np.asarray(Image.fromarray(np.ascontiguousarray(channel, np.float32))
                                   .resize((width, height), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0)


def _load_npz(path: Path, channels: int) -> tuple[np.ndarray, np.ndarray]:
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
    labels = y.astype(np.int64)
    if (labels < 0).any():  # negative, or a uint64 past int64
        raise DataError(f"{path}: label {y[labels < 0][0]} is not a class index (0, 1, 2, ...)")
    return _to_nchw_unit(x, path, channels), labels


def _to_nchw_unit(x: np.ndarray, path: Path, channels: int) -> np.ndarray:
    """Accept [N,H,W], [N,H,W,C] or [N,C,H,W] (C: gray, gray+alpha, RGB, RGBA, or the
    model's `channels`); uint8 0..255 or float 0..1."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        counts = (*CHANNEL_COUNTS, channels)
        if x.shape[-1] in counts and x.shape[1] not in counts:
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: 'x' must have rank 3 or 4, got shape {list(x.shape)}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: 'x' must be uint8 or float, got {x.dtype}")
    x = x.astype(np.float32)
    if not ((x >= 0) & (x <= 1)).all():  # NaN fails both; zero images pass, load_images says
        raise DataError(f"{path}: float images must lie in [0, 1]")
    return x


def _match_channels(pixels: np.ndarray, channels: int, path: Path) -> np.ndarray:
    have = pixels.shape[1]
    if have in (2, 4) and have != channels:  # gray+alpha, RGBA: drop alpha, as PIL's convert does
        pixels, have = pixels[:, :-1], have - 1
    if have == channels:
        return pixels
    if have == 1:
        return np.repeat(pixels, channels, axis=1)
    if have == 3 and channels == 1:
        weights = np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, 1, 1)
        return (pixels * weights).sum(axis=1, keepdims=True)
    raise DataError(f"{path}: images have {have} channels, the model expects {channels}")


_LABEL_PREFIX = re.compile(r"^(\d+)[_\-]", re.ASCII)


def _label(digits: str, where: Path) -> int:
    label = int(digits)
    if label > np.iinfo(np.int64).max:
        raise DataError(f"{where}: label {digits} is too large for a class index")
    return label


def _load_folder(path: Path, prep: Preprocess, resized: Counter[str] | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`class_dir/xxx.png` (classes sorted by name, or numeric names) or `label_xxx.png`.

    Images of another size are resized (and counted in `resized`) when `resized` is given,
    else refused, all of them in one line."""
    from PIL import Image, UnidentifiedImageError

    files: list[tuple[Path, int]] = []
    # hidden entries (.ipynb_checkpoints, .DS_Store) are tool litter, not classes or images
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    subdirs = sorted(p for p in entries if p.is_dir())
    if subdirs:
        # only ASCII digits are labels, as in file names: int() takes "٩" but not "²"
        numeric = all(d.name.isascii() and d.name.isdigit() for d in subdirs)
        for i, d in enumerate(sorted(subdirs, key=lambda d: int(d.name) if numeric else d.name)):
            label = _label(d.name, d) if numeric else i
            files += [(f, label) for f in sorted(d.iterdir())
                      if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    else:
        for f in sorted(entries):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            m = _LABEL_PREFIX.match(f.name)
            if not m:
                raise DataError(f"{f}: cannot tell the label; name it LABEL_xxx{f.suffix} "
                                "or put it in a folder per class")
            files.append((f, _label(m.group(1), f)))
    if not files:
        raise DataError(f"{path}: no images found (.png/.jpg in class folders or LABEL_xxx.png)")
    images = []
    wrong: Counter[str] = Counter()
    first: Path | None = None
    for f, _ in files:
        try:
            with Image.open(f) as im:
                size = _size(im.height, im.width)
                if im.size != (prep.width, prep.height):
                    if resized is None:  # header only: the pixels are never decoded
                        wrong[size] += 1
                        first = first or f
                        continue
                    resized[size] += 1
                images.append(_unit_pixels(im, prep, f))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
            raise DataError(f"{f}: unreadable image ({exc})") from None
    if wrong:
        raise _size_error(path, wrong, len(files), prep, first)
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return x, np.array([label for _, label in files], np.int64)


def _unit_pixels(im, prep: Preprocess, path: Path) -> np.ndarray:
    """One image as float32 [H, W] or [H, W, 3] in [0, 1] at the model's input size (a
    wrong size reaches here only when the caller asked for a resize)."""
    from PIL import Image

    wide = im.mode.startswith("I;16")
    if wide:  # 16-bit greyscale: Pillow's convert("L") would saturate every value above 255
        im = Image.fromarray(np.asarray(im, dtype=np.float32) / 65535.0, mode="F")
    elif im.mode in ("I", "F"):
        raise DataError(f"{path}: {im.mode!r} (32-bit) images have no fixed range; "
                        "save them as 8- or 16-bit")
    else:
        im = im.convert("L" if prep.channels == 1 else "RGB")
    if im.size != (prep.width, prep.height):
        im = im.resize((prep.width, prep.height), Image.BILINEAR)
    if not wide:
        return np.asarray(im, dtype=np.float32) / 255.0
    x = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    return x if prep.channels == 1 else np.repeat(x[..., None], 3, axis=-1)


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
