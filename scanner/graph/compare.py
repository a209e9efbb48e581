"""Differential check: run two models in onnxruntime on the same feeds and compare outputs.

Used by the tests, by export (onnxsim's model_checking.compare, in our terms), and to check the
float copies that stand in for float16 and int8 models in analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import Inconclusive, ShapscanError, first_line, out_of_memory
from ..runtime import make_session
from .walk import first_input


class ModelMismatch(ShapscanError):
    """Two models that should compute the same outputs do not (a bug in a graph edit)."""

    exit_code = 2


def probe_input(proto: onnx.ModelProto) -> np.ndarray | None:
    """Two seeded random inputs for a differential check, or None if dims are unknown."""
    value = first_input(proto)
    dims = value.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    if not shape or any(d <= 0 for d in shape[1:]):
        return None
    if shape[0] <= 0:
        shape[0] = 2
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of `model`; feeds it does not take are ignored."""
    session = make_session(model)
    names = {i.name for i in session.get_inputs()}
    missing = names - set(feeds)
    if missing:
        raise ValueError(f"no feed for input(s) {sorted(missing)}")
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(outputs, {k: v for k, v in feeds.items() if k in names})
    return {name: _as_array(v) for name, v in zip(outputs, values, strict=True)}


def _as_array(value: object) -> np.ndarray:
    """A sequence of maps (skl2onnx's ZipMap: one {class: probability} per row) as the
    [rows, classes] array of its values in key order; other outputs unchanged."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return np.array([[row[k] for k in sorted(row)] for row in value])
    return np.asarray(value)


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference of two same-shaped arrays, in float64: NaN in the same
    place is agreement, NaN against a number is an infinite difference."""
    if not a.size:
        return 0.0
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    diff[np.isnan(a) & np.isnan(b)] = 0.0
    return float(np.nan_to_num(diff, nan=np.inf).max())


@dataclass(frozen=True)
class CopyDifference:
    """The output where an analysis copy differs most from its model, relative to scale."""

    output: str
    difference: float
    scale: float  # the output's largest finite magnitude, at least 1

    @property
    def relative(self) -> float:
        return self.difference / self.scale


def copy_difference(original: onnx.ModelProto, copy: onnx.ModelProto, probe: np.ndarray,
                    what: str, copy_probe: np.ndarray | None = None) -> CopyDifference:
    """Run `original` on `probe` and the copy that stands in for it in analysis (the
    float32 copy of a float16 model, the float copy of an int8 one) on `copy_probe` (default
    `probe`). Inconclusive when onnxruntime cannot run both (`what` names them)."""
    name = first_input(original).name
    try:
        reference = run_model(original, {name: probe})
        copied = run_model(copy, {name: probe if copy_probe is None else copy_probe})
    except Exception as exc:  # noqa: BLE001  onnxruntime raises many types
        oom = out_of_memory(exc)
        if oom is not None:
            raise oom from None
        raise Inconclusive(f"inconclusive: cannot run {what} side by side: "
                           f"{first_line(exc)}") from None
    worst: CopyDifference | None = None
    for out, ref in reference.items():
        scale = max(1.0, float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0)))
        seen = CopyDifference(out, max_difference(ref, copied[out]), scale)
        if worst is None or seen.relative > worst.relative:
            worst = seen
    assert worst is not None  # a model has at least one output
    return worst


def compare_models(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray],
                   atol: float | None = None) -> float:
    """Max absolute difference over the outputs the two models share (by name).

    Raises ModelMismatch when the output names differ, a shape differs, or the difference
    exceeds `atol` (when given).
    """
    out_a, out_b = run_model(a, feeds), run_model(b, feeds)
    if set(out_a) != set(out_b):
        raise ModelMismatch(f"output names differ: {sorted(out_a)} vs {sorted(out_b)}")
    worst = 0.0
    for name, va in out_a.items():
        vb = out_b[name]
        if va.shape != vb.shape:
            raise ModelMismatch(f"output {name!r} has shape {va.shape} vs {vb.shape}")
        worst = max(worst, max_difference(va, vb))
    if atol is not None and worst > atol:
        raise ModelMismatch(f"models differ by {worst:.3g} (> {atol:g})")
    return worst
