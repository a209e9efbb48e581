"""`scan --executor local|ray` and the Ray flags: where the models of one run are scanned."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import click

from ..errors import UsageError
from ..findings import ScanResult
from ..fleet import Job, RayOptions, check_reachable, import_ray, scan_locally, scan_on_ray


def executor_options(fn: Callable) -> Callable:
    options = [
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True,
                     help="local: the models one after another in this process; ray: each "
                          "model as a Ray task (pip install 'shapscan[ray]').",),
        click.option("--ray-address", default=None, metavar="ADDRESS",
                     help="Ray cluster to run on (default: RAY_ADDRESS's, else a local one "
                          "started for this run). Models, data and outputs must be at the "
                          "same paths on every node."),
        click.option("--ray-cpus", type=click.FloatRange(0, min_open=True), default=None,
                     help="CPUs each model's task asks for  [default: 1]"),
        click.option("--ray-gpus", type=click.FloatRange(0), default=None,
                     help="GPUs each task asks for, a fraction shares one  [default: 1 with "
                          "--device cuda, else 0]"),
        click.option("--ray-retries", type=click.IntRange(0), default=None,
                     help="Times Ray re-runs a model's task whose worker or node was lost  "
                          "[default: 3]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def ray_options_from(executor: str, device: str, ray_address: str | None,
                     ray_cpus: float | None, ray_gpus: float | None,
                     ray_retries: int | None) -> RayOptions | None:
    """The Ray settings (None: scan locally). Refuses a Ray flag without --executor ray,
    --executor ray without Ray installed (exit 4), and an address nothing listens on
    (exit 2), before anything is scanned or written."""
    given = {"--ray-address": ray_address, "--ray-cpus": ray_cpus, "--ray-gpus": ray_gpus,
             "--ray-retries": ray_retries}
    if executor != "ray":
        stray = [flag for flag, value in given.items() if value is not None]
        if stray:
            raise UsageError(f"{stray[0]} needs --executor ray")
        return None
    import_ray()
    if ray_address is not None:
        check_reachable(ray_address)
    defaults = RayOptions()
    return RayOptions(
        address=ray_address,
        cpus=defaults.cpus if ray_cpus is None else ray_cpus,
        gpus=(1.0 if device == "cuda" else 0.0) if ray_gpus is None else ray_gpus,
        retries=defaults.retries if ray_retries is None else ray_retries)


def scanned(jobs: Sequence[Job], several: bool, quiet: bool,
            ray_options: RayOptions | None) -> Iterator[ScanResult]:
    """Each job's result, in the jobs' order."""
    if ray_options is None:
        return scan_locally(jobs, several, quiet)
    return scan_on_ray(jobs, several, ray_options)
