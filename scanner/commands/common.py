"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from ..data import preprocess_field
from ..errors import UsageError


def _preprocess_field(ctx: click.Context, param: click.Parameter, value: object) -> object:
    """Check a preprocessing flag as the sidecar and metadata fields are checked."""
    if value is None:
        return None
    if param.name in ("mean", "std"):
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers"
                                     ) from None
    try:
        return preprocess_field(param.name, value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def preprocess_options(fn: Callable) -> Callable:
    """--layout/--channels/--height/--width/--scale/--mean/--std: override the model's
    preprocessing spec."""
    options = [
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None,
                     help="Model input layout (default: sidecar, model metadata, or shape)."),
        click.option("--channels", type=int, default=None, callback=_preprocess_field,
                     help="Model input channels."),
        click.option("--height", type=int, default=None, callback=_preprocess_field,
                     help="Image height (a model with flat [N, C*H*W] inputs needs it)."),
        click.option("--width", type=int, default=None, callback=_preprocess_field,
                     help="Image width (a model with flat [N, C*H*W] inputs needs it)."),
        click.option("--scale", type=float, default=None, callback=_preprocess_field,
                     help="Multiply [0,1] pixels by this before mean/std (e.g. 255)."),
        click.option("--mean", default=None, callback=_preprocess_field,
                     help="Per-channel mean, comma-separated."),
        click.option("--std", default=None, callback=_preprocess_field,
                     help="Per-channel std, comma-separated."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def preprocess_overrides(layout: str | None, channels: int | None, scale: float | None,
                         mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                         height: int | None = None, width: int | None = None) -> dict:
    return {"layout": layout, "channels": channels, "scale": scale, "mean": mean, "std": std,
            "height": height, "width": width}


def device_option(fn: Callable) -> Callable:
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="ONNX Runtime execution provider.")(fn)


def resize_option(fn: Callable) -> Callable:
    return click.option(
        "--resize", is_flag=True,
        help="Resize --data images of another size to the model's input (bilinear) instead "
             "of refusing them; the scan report says so (rule SS208).")(fn)


def require_path(path: Path, flag: str | None = None) -> None:
    """A path the user named that does not exist is a usage error found before any work
    (exit 4, one line), not a refused model or bad data found later for each model."""
    if not path.exists():  # a dangling symlink too
        raise UsageError(f"{f'--{flag}: ' if flag else ''}{path}: no such file or folder")
