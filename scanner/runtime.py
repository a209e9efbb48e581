"""ONNX Runtime sessions: providers, threads, quiet logs, batched evaluation."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as MissingKernel

from .errors import Inconclusive

log = logging.getLogger(__name__)
_warned_cuda = False

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
THREADS_ENV = "SHAPSCAN_THREADS"

# ORT's default logger prints provider and optimizer warnings to stderr; errors only.
ort.set_default_logger_severity(3)


@dataclass(frozen=True)
class Device:
    requested: str  # cpu | cuda | auto
    providers: tuple[str, ...]

    @property
    def name(self) -> str:
        return "cuda" if self.providers[0] == CUDA else "cpu"


@dataclass(frozen=True)
class ProviderChoice:
    providers: tuple[str, ...]
    warning: str | None  # set when CUDA was asked for and cannot be used


def choose_providers(requested: str, available: Sequence[str], cuda_usable: bool
                     ) -> ProviderChoice:
    """Pure provider selection: CUDA when asked (or auto) and usable, else CPU.

    Only an explicit `cuda` request that cannot be met warns; `auto` falls back silently.
    """
    if requested not in ("cpu", "cuda", "auto"):
        raise ValueError(f"unknown device {requested!r}")
    if requested != "cpu" and CUDA in available and cuda_usable:
        return ProviderChoice((CUDA, CPU), None)
    if requested == "cuda":
        reason = ("onnxruntime has no CUDA execution provider (install onnxruntime-gpu in "
                  "place of onnxruntime: README, GPU)"
                  if CUDA not in available else "no NVIDIA device found")
        return ProviderChoice((CPU,), f"CUDA requested but unavailable: {reason}; "
                              "running on CPU")
    return ProviderChoice((CPU,), None)


def resolve_device(requested: str = "auto") -> Device:
    """CUDA when asked (or auto) and available; otherwise CPU, with one warning if asked."""
    choice = choose_providers(requested, ort.get_available_providers(), _cuda_usable())
    if choice.warning:
        _warn_cuda_once(choice.warning)
    return Device(requested, choice.providers)


def _cuda_usable() -> bool:
    # onnxruntime-gpu lists CUDA even without a driver; a device node tells us one exists.
    return os.path.exists("/dev/nvidia0") or os.environ.get("SHAPSCAN_ASSUME_CUDA") == "1"


def default_threads() -> int | None:
    value = os.environ.get(THREADS_ENV)
    return int(value) if value and value.isdigit() and int(value) > 0 else None


def session_options(threads: int | None = None, arena: bool = True) -> ort.SessionOptions:
    """`arena=False`: no CPU memory arena, so a session that lives long and runs rarely
    does not hold its largest run's memory (1.5 GB after 256 rows of a 224x224 MobileNetV2)
    between runs; its runs allocate afresh (slower)."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    # fatal only: ORT's warnings are noise for our users, and its errors reach them as the
    # exception's one line (logged too, they were a second, multi-line copy)
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or default_threads()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return opts


def make_session(model: onnx.ModelProto | bytes | str, device: Device | None = None,
                 threads: int | None = None, arena: bool = True) -> ort.InferenceSession:
    """A session on `device`; if the CUDA provider cannot start, one on CPU (one warning)."""
    device = device or resolve_device("cpu")
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    opts = session_options(threads, arena)
    providers = [p for p in device.providers if p in ort.get_available_providers()] or [CPU]
    session = None
    if providers[0] == CUDA:
        try:
            with warnings.catch_warnings():  # ORT's own provider warning would be a second one
                warnings.simplefilter("ignore")
                session = ort.InferenceSession(payload, sess_options=opts, providers=providers)
        except Exception as exc:  # e.g. a CUDA/cuDNN version mismatch in the provider library
            log.debug("CUDA session failed: %s", exc)
        if session is not None and session.get_providers()[0] != CUDA:
            session = None
    if session is None:
        if device.providers[0] == CUDA:
            _warn_cuda_once("CUDA execution provider failed to initialise; running on CPU")
        try:
            session = ort.InferenceSession(payload, sess_options=opts, providers=[CPU])
        except MissingKernel as exc:  # a valid graph this build cannot run: not a bug
            raise Inconclusive(f"inconclusive: onnxruntime cannot run this model on CPU: "
                               f"{ort_message(exc)}") from None
    return session


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"^\S+\.(?:h|cc|cpp):\d+ .*?\)\s+")  # C++ file:line signature()


def ort_message(exc: BaseException) -> str:
    """An onnxruntime error as one readable line: without its status prefix, C++ source
    location and function signature."""
    text = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", str(exc).strip()), count=1)
    return (text.splitlines() or [type(exc).__name__])[0][:300]


def _warn_cuda_once(message: str) -> None:
    global _warned_cuda
    if not _warned_cuda:
        _warned_cuda = True
        warnings.warn(message, stacklevel=3)


class Runner:
    """One session; on CUDA, inputs and outputs go through IOBinding.

    IOBinding lets ORT copy host inputs once and write outputs straight into host memory,
    instead of the per-run staging `session.run` does on a GPU provider.
    """

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.on_cuda = session.get_providers()[0] == CUDA

    @property
    def device(self) -> str:
        return "cuda" if self.on_cuda else "cpu"

    def resident(self, array: np.ndarray) -> np.ndarray | ort.OrtValue:
        """`array` where this runner's session reads it fastest: copied to the GPU once on
        CUDA (pass it to `run` as resident feeds), the array itself on CPU."""
        if not self.on_cuda:
            return np.ascontiguousarray(array)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray],
            resident: dict[str, np.ndarray | ort.OrtValue] | None = None
            ) -> list[np.ndarray]:
        if not self.on_cuda:
            return self.session.run(list(outputs), {**feeds, **(resident or {})})
        binding = self.session.io_binding()
        for name, value in (resident or {}).items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def make_runner(model: onnx.ModelProto | bytes | str, device: Device | None = None,
                threads: int | None = None) -> Runner:
    return Runner(make_session(model, device, threads))


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def run_batched(session: ort.InferenceSession, feeds: dict[str, np.ndarray],
                batch_size: int = 256, output: str | None = None) -> np.ndarray:
    """Run `session` over the leading axis of every feed, `batch_size` rows at a time."""
    n = len(next(iter(feeds.values())))
    names = [output] if output else [session.get_outputs()[0].name]
    runner = Runner(session)
    parts = [runner.run(names, {k: v[s] for k, v in feeds.items()})[0]
             for s in batches(n, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)
