"""ONNX Runtime sessions: providers, threads, quiet logs, batched evaluation."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)
_warned_cuda = False


@dataclass(frozen=True)
class Device:
    requested: str  # cpu | cuda | auto
    providers: tuple[str, ...]

    @property
    def name(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"


def resolve_device(requested: str = "auto") -> Device:
    """CUDA when asked (or auto) and available; otherwise CPU, with one warning if asked."""
    global _warned_cuda
    if requested not in ("cpu", "cuda", "auto"):
        raise ValueError(f"unknown device {requested!r}")
    available = ort.get_available_providers()
    if requested != "cpu" and "CUDAExecutionProvider" in available and _cuda_usable():
        return Device(requested, ("CUDAExecutionProvider", "CPUExecutionProvider"))
    if requested == "cuda" and not _warned_cuda:
        _warned_cuda = True
        warnings.warn("CUDA execution provider not available; running on CPU", stacklevel=2)
    return Device(requested, ("CPUExecutionProvider",))


def _cuda_usable() -> bool:
    # onnxruntime-gpu lists CUDA even without a driver; a device node tells us one exists.
    return os.path.exists("/dev/nvidia0") or os.environ.get("SHAPSCAN_ASSUME_CUDA") == "1"


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings are noise for our users
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return opts


def make_session(model: onnx.ModelProto | bytes | str, device: Device | None = None,
                 threads: int | None = None) -> ort.InferenceSession:
    device = device or resolve_device("cpu")
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(payload, sess_options=session_options(threads),
                                providers=list(device.providers))


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def run_batched(session: ort.InferenceSession, feeds: dict[str, np.ndarray],
                batch_size: int = 256, output: str | None = None) -> np.ndarray:
    """Run `session` over the leading axis of every feed, `batch_size` rows at a time."""
    n = len(next(iter(feeds.values())))
    names = [output] if output else [session.get_outputs()[0].name]
    parts = [session.run(names, {k: v[s] for k, v in feeds.items()})[0]
             for s in batches(n, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)
