"""The Python API the CLI wraps: evaluate (red-team metrics) and scan (the gate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attacks import Attack
from .data import ImageSet, Preprocess, load_images, resolve_preprocess
from .errors import DataError
from .graph.load import LoadedModel, load_model
from .runtime import make_session, resolve_device, run_batched


@dataclass(frozen=True)
class EvalResult:
    clean_acc: float
    asr: float | None
    n_images: int
    n_attack_images: int


def model_preprocess(model: LoadedModel, overrides: dict | None = None) -> Preprocess:
    _, shape = model.image_input()
    return resolve_preprocess(model.path, model.metadata, shape, overrides)


def predict(model: LoadedModel, prep: Preprocess, pixels: np.ndarray,
            device: str = "cpu") -> np.ndarray:
    """Logits of the unmodified model for pixel-space images."""
    session = make_session(model.proto, resolve_device(device))
    name, _ = model.image_input()
    return run_batched(session, {name: prep.to_model(pixels)})


def evaluate(model_path: str | Path, data_path: str | Path, attack: Attack | None = None,
             target: int | None = None, overrides: dict | None = None,
             device: str = "cpu") -> EvalResult:
    """Clean accuracy, and the attack success rate of `attack` towards `target`.

    ASR counts images whose true label is not the target and that the triggered input
    sends to the target.
    """
    model = load_model(model_path)
    prep = model_preprocess(model, overrides)
    data: ImageSet = load_images(data_path, prep)
    logits = predict(model, prep, data.pixels, device)
    if logits.ndim != 2:
        raise DataError(f"model output has shape {list(logits.shape)}; expected [N, classes]")
    clean_acc = float((logits.argmax(1) == data.labels).mean())
    if attack is None:
        return EvalResult(clean_acc, None, len(data), 0)
    if target is None:
        raise DataError("an attack needs --target")
    keep = data.labels != target
    triggered = attack.apply(data.pixels[keep])
    hits = predict(model, prep, triggered, device).argmax(1) == target
    return EvalResult(clean_acc, float(hits.mean()) if len(hits) else 0.0, len(data),
                      int(keep.sum()))
