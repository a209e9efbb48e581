"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable

import click


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def preprocess_options(fn: Callable) -> Callable:
    """--layout/--channels/--scale/--mean/--std: override the model's preprocessing spec."""
    options = [
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None,
                     help="Model input layout (default: sidecar, model metadata, or shape)."),
        click.option("--channels", type=int, default=None, help="Model input channels."),
        click.option("--scale", type=float, default=None,
                     help="Multiply [0,1] pixels by this before mean/std (e.g. 255)."),
        click.option("--mean", default=None, help="Per-channel mean, comma-separated."),
        click.option("--std", default=None, help="Per-channel std, comma-separated."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def preprocess_overrides(layout: str | None, channels: int | None, scale: float | None,
                         mean: str | None, std: str | None) -> dict:
    return {"layout": layout, "channels": channels, "scale": scale, "mean": _floats(mean),
            "std": _floats(std)}


def device_option(fn: Callable) -> Callable:
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="ONNX Runtime execution provider.")(fn)
