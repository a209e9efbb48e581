"""Executors for a scan of several models: one after another in this process, or one Ray
task per model on a Ray cluster.

Ray schedules the tasks, re-runs a task whose worker process or node was lost (its
max_retries) and brings the results back; shapscan adds no scheduler, queue or RPC of its
own. Ray is an optional import (the `ray` extra). Models, data and outputs stay paths: a
task reads and writes them where the driver would, so a multi-node cluster needs them on a
filesystem every node sees at the same path. A scan is deterministic for its seed, so a
re-run task gives the result the lost one would have.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from . import __version__
from .api import ScanOptions, scan
from .errors import ShapscanError, UsageError, first_line
from .findings import ScanResult, Verdict
from .progress import Progress
from .runtime import THREADS_ENV

ScanFn = Callable[[Path, ScanOptions, Progress], ScanResult]
Job = tuple[Path, ScanOptions]

RAY_MISSING = "--executor ray needs Ray: pip install 'shapscan[ray]' (or pip install ray)"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS's cluster, else a local one for this run
    cpus: float = 1.0  # each model's task asks Ray for this many CPUs ...
    gpus: float = 0.0  # ... and GPUs (a fraction shares one)
    retries: int = 3  # Ray's max_retries: re-runs of a task whose worker was lost


def import_ray() -> ModuleType:
    """The ray module, or a usage error (exit 4) that says how to get it."""
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def scan_model(path: Path, options: ScanOptions, several: bool, progress: Progress,
               scan_fn: ScanFn = scan) -> ScanResult:
    """One model's scan as the gate runs it, timed. A usage problem that belongs to one
    model of several (--layers naming a layer this model lacks) is that model's error, so
    the others are still scanned and every report is written; alone, it stops the run."""
    start = time.perf_counter()
    try:
        result = scan_fn(path, options, progress)
    except UsageError as exc:
        if not several:
            raise
        result = ScanResult(model_path=str(path), verdict=Verdict.ERROR, errors=[str(exc)],
                            method=options.method, seed=options.seed,
                            tool_version=__version__)
    result.timings["total"] = time.perf_counter() - start
    return result


def scan_locally(jobs: Sequence[Job], several: bool, quiet: bool,
                 scan_fn: ScanFn = scan) -> Iterator[ScanResult]:
    for path, options in jobs:
        yield scan_model(path, options, several, Progress(enabled=not quiet), scan_fn)


@dataclass
class _TaskOutcome:
    """What a Ray task sends back: a result, or the usage error that stops the run."""

    result: ScanResult | None
    usage_error: str | None = None


def _attempt_number() -> int:
    """0 on a task's first run, n on its n-th re-run. Ray exposes this only on its core
    worker (the public state API needs the dashboard, which a bare `ray.init` lacks); a
    Ray without it reads as a first run, which under-reports retries but nothing else."""
    import ray

    worker = getattr(getattr(ray, "_private", None), "worker", None)
    core = getattr(getattr(worker, "global_worker", None), "core_worker", None)
    try:
        return int(core.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 (private API: any failure means "unknown")
        return 0


def _ray_task(path: Path, options: ScanOptions, several: bool, threads: str,
              scan_fn: ScanFn) -> _TaskOutcome:
    # ORT sizes its pool from the machine's cores, not from what Ray granted the task: two
    # tasks on two granted cores would each start two threads
    os.environ[THREADS_ENV] = threads
    try:
        result = scan_model(path, options, several, Progress(enabled=False), scan_fn)
    except UsageError as exc:
        return _TaskOutcome(None, str(exc))
    result.attempts = _attempt_number() + 1
    return _TaskOutcome(result)


def _lost(ray: ModuleType, path: Path, options: ScanOptions, exc: Exception,
          retries: int) -> ScanResult:
    """The result of a model whose task Ray gave up on: its worker or node was lost on
    every try, or Ray's memory monitor killed it (the model is too large for the node)."""
    result = ScanResult(model_path=str(path), method=options.method, seed=options.seed,
                        tool_version=__version__, attempts=retries + 1)
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        result.verdict = Verdict.INCONCLUSIVE
        result.skipped.append("inconclusive: ran out of memory; Ray's memory monitor stopped "
                              "the task scanning it on every try")
    else:
        result.verdict = Verdict.ERROR
        result.errors.append(f"not scanned: the Ray worker scanning it was lost on each of "
                             f"{retries + 1} tries ({type(exc).__name__}: {first_line(exc)})")
    return result


def check_reachable(address: str) -> None:
    """Refuse an address nothing listens on at once: ray.init waits on such a cluster for
    minutes, retrying, and prints a warning every few seconds meanwhile."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or a form Ray parses itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ShapscanError(f"cannot reach the Ray cluster at {address}: "
                            f"{exc.strerror or exc}") from None


def _connect(ray: ModuleType, address: str | None) -> bool:
    """Join the cluster (or start a local one); True when this run started the session
    and must end it. A session the caller already holds (a test, a notebook) is used as is."""
    if ray.is_initialized():
        return False
    # a local cluster started here has no use for the dashboard; Ray refuses that keyword
    # when it joins a running cluster
    local = address is None and "RAY_ADDRESS" not in os.environ
    extra = {"include_dashboard": False} if local else {}
    if local:
        # Ray starts its workers at the driver's niceness + 15; here they do all of the
        # run's work, and on a busy machine that left them a fraction of the CPU a local
        # scan gets (benchmarks/fleet.py saw nice 19 against 5)
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address, logging_level=logging.WARNING, **extra)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address}" if address else "(ray.init)"
        raise ShapscanError(f"cannot reach the Ray cluster {where}: {first_line(exc)}"
                            ) from None
    return True


def _check_resources(ray: ModuleType, ray_options: RayOptions) -> None:
    """Refuse a request no node of the cluster can ever meet: Ray would keep such a task
    pending for good (waiting for an autoscaler), and a CI gate would hang."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for name, flag, asked in (("CPU", "--ray-cpus", ray_options.cpus),
                              ("GPU", "--ray-gpus", ray_options.gpus)):
        most = max((n.get(name, 0.0) for n in nodes), default=0.0)
        if asked > most:
            hint = " (--device cuda asks for 1 by default)" if name == "GPU" else ""
            raise UsageError(f"{flag} {asked:g}{hint}: no node of the Ray cluster has that "
                             f"many {name}s (the largest has {most:g})")


def scan_on_ray(jobs: Sequence[Job], several: bool, ray_options: RayOptions,
                scan_fn: ScanFn = scan) -> Iterator[ScanResult]:
    """Submit one task per model at once and yield the results in the jobs' order (the
    summaries then read as a local run's). A bug in a task (its exception) stops the run
    as it would locally. The tasks still out are not cancelled one by one: in Ray 2.x,
    `ray.cancel` racing a task's reply in flight aborts the driver ("Tried to complete
    task that was not pending"; it stopped two of our CI runs). A session this
    run started ends with it, and Ray stops the ended job's tasks; in a session the caller
    holds (a test, a notebook), they run to their end and their results are dropped."""
    ray = import_ray()
    started = _connect(ray, ray_options.address)
    threads = os.environ.get(THREADS_ENV) or str(max(1, math.ceil(ray_options.cpus)))
    try:
        _check_resources(ray, ray_options)
        task = ray.remote(_ray_task).options(
            num_cpus=ray_options.cpus, num_gpus=ray_options.gpus,
            max_retries=ray_options.retries, retry_exceptions=False, name="shapscan-scan")
        refs = [task.remote(path, options, several, threads, scan_fn)
                for path, options in jobs]
        for (path, options), ref in zip(jobs, refs, strict=True):
            try:
                outcome: _TaskOutcome = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise cause if isinstance(cause, Exception) else exc from None
            except ray.exceptions.RayError as exc:
                outcome = _TaskOutcome(_lost(ray, path, options, exc, ray_options.retries))
            if outcome.usage_error is not None:
                raise UsageError(outcome.usage_error)
            yield outcome.result
    finally:
        if started:
            ray.shutdown()
