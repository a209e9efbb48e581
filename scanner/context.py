"""What the stages of one scan share: its options, the vetted model and its preprocessing,
the images it reverses triggers on, and the result it fills in.

`scanner.api.scan` builds one ScanContext after loading the model and hands it to each
stage (detection.py, repair.py); a stage reads what earlier stages left and records what
it found, so no stage needs a dozen positional parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .autodiff import GradientProgram
from .data import ImageSet, Preprocess
from .detect import Verdict as DetectVerdict
from .findings import LayerInfo, ScanResult
from .graph.load import LoadedModel
from .policy import Catalog, Policy
from .progress import Progress
from .reverse import ReverseConfig, SynthesisConfig
from .runtime import Device


@dataclass(frozen=True)
class ScanOptions:
    data: Path | None = None  # few-shot images; None with data_free=True
    data_free: bool = False
    out: Path | None = None  # write the sanitized model here when a backdoor is repaired
    policy: str | Path = "default"
    method: str = "shapley"  # shapley | clp | fp | ft (baselines: scanner/baselines)
    device: str = "auto"
    seed: int = 0
    layers: tuple[str, ...] | None = None  # activation tensors (or node names) to score
    overrides: dict | None = None  # preprocessing overrides
    resize: bool = False  # resize --data images of another size instead of refusing (SS208)
    # the step budget is the policy's (detection.reverse_steps, .second_view_steps): a
    # ScanOptions that changes `steps` here is refused rather than silently overridden
    reverse: ReverseConfig = ReverseConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    prune_order: str = "greedy"
    permutations: int | None = None  # override the policy's Shapley sample budget
    epsilon: float | None = None
    stable_rounds: int = 0  # > 0: stop sampling once the top-k set is stable this many rounds
    # The reversed trigger is the *smallest* that works; a real one is stronger, and pruning
    # until the minimal one fails can leave the real one working (cnn_trojan: true ASR 52%
    # after such a repair, 21% with gain 2). Shapley values and the stop rule use a copy
    # this much stronger.
    trigger_gain: float = 2.0
    quiet: bool = False
    # write a repair that missed its target, or that the re-scan still flags, to `out`
    # anyway (marked shapscan.repair = incomplete); by default it is not written
    keep_incomplete: bool = False


@dataclass
class ScanContext:
    opts: ScanOptions
    policy: Policy
    catalog: Catalog
    progress: Progress
    result: ScanResult
    model: LoadedModel
    layers: list[LayerInfo]  # the activation layers scored: all, or those --layers names
    prep: Preprocess
    device: Device
    n_classes: int
    predict: Callable[[np.ndarray], np.ndarray]  # logits of the unmodified model
    # every reverse runs on this program (no BN-statistics head; synthesis builds its
    # own); None on a baseline scan, which needs no gradients
    program: GradientProgram | None = None
    images: ImageSet | None = None  # few-shot, or synthesised on a data-free scan
    bn_layers: int = 0  # BatchNormalization layers the synthesis matched (data-free)
    # the second view's synthesised inputs and BN layers matched, when it ran (the re-scan
    # of a repaired model looks at them again)
    second_images: ImageSet | None = None
    second_bn_layers: int = 0
    verdict: DetectVerdict | None = None
    # what detection.max_minutes is measured against: the scan's start on the progress
    # clock, and one reverse row's seconds as estimate.check_time timed them (None: not
    # timed: no limit and a quiet scan)
    started: float = 0.0
    row_s: float | None = None

    @property
    def view(self) -> str:
        """What the scan's own images are: the first view's name and the reports' word."""
        return "synthesised" if self.opts.data_free else "few-shot"

    @contextmanager
    def within_limit(self) -> Iterator[None]:
        """Stages run inside stop at the scan's detection.max_minutes (if any): their
        progress reports raise errors.OutOfTime past it (Progress.deadline)."""
        limit = self.policy.detection.max_minutes
        if limit:
            self.progress.deadline = self.started + 60 * limit
        try:
            yield
        finally:
            self.progress.deadline = None

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the stage's wall time to the result's (only when it completes)."""
        start = time.perf_counter()
        yield
        self.result.timings[stage] = (self.result.timings.get(stage, 0.0)
                                      + time.perf_counter() - start)
