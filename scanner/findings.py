"""The result model: findings, severities, and ScanResult.

Reporters (scanner/report/) read only these types, never the engine. Findings, errors and
skipped items are three separate outcomes: a result with errors still reports its findings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class Severity(enum.IntEnum):
    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown severity {text!r} (expected one of: {names})") from None


class Verdict(enum.Enum):
    CLEAN = "clean"
    BACKDOOR = "backdoor"
    # a baseline (CLP, Fine-Pruning) pruned the model: it makes no detection claim either way
    REPAIR_ONLY = "repair-only"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    """One observation with a stable rule id (see rules/catalog.toml)."""

    rule_id: str
    severity: Severity
    message: str
    location: str | None = None  # node, initializer or graph input name
    details: dict[str, object] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class LayerInfo:
    """An activation layer: the players of the Shapley game are its channels."""

    name: str  # the activation's output tensor name
    op: str  # Relu, SiLU (pattern), HardSwish, ...
    node: str  # name of the node producing the tensor
    channels: int
    rank: int  # 4 for feature maps, 3 for token tensors [N, T, D], 2 for [N, C] features
    axis: int = 1  # where the channels lie: 1 (NCHW, [N, C]), rank - 1 (channels-last, tokens)


@dataclass
class ClassReverse:
    """Trigger reverse for one candidate target class."""

    target: int
    mask_l1: float  # L1 norm of the reversed mask (pixels): the patch family
    anomaly_index: float  # the score compared with the threshold: mean of the patch and
    # universal families' indices
    reversed_asr: float  # share of non-target few-shot images sent to `target`
    universal_norm: float | None = None  # mask-free perturbation family (full-image triggers)
    universal_anomaly_index: float | None = None
    patch_anomaly_index: float | None = None
    patch_isolation: float | None = None  # gap to the next smallest patch trigger (σ units)
    warp_norm: float | None = None  # RMS displacement (pixels) of the warp family (WaNet)
    warp_anomaly_index: float | None = None
    warp_isolation: float | None = None  # gap to the next smallest warp (σ units)
    warp_ratio: float | None = None  # median class's warp norm / this class's
    # per family: share of the rows its reversed trigger sent to `target` (below the
    # reverse's goal: the trigger never worked, its norm is where the steps ran out)
    family_asr: dict[str, float] = field(default_factory=dict)
    # evidence.py: per family, log ratio of what zeroing the trigger's top channels costs
    # the class's own images against what it costs the trigger (large: a separate path)
    selectivity: dict[str, float] = field(default_factory=dict)
    max_margin: float | None = None  # MM-BD: the largest logit margin found for the class
    margin_index: float | None = None  # its high-side robust index across classes
    flagged: bool = False


@dataclass(frozen=True)
class Shortlist:
    """A many-class scan's screen (reverse.screen or reverse.sweep): which classes were
    reversed in full."""

    classes: int  # the model's
    candidates: list[int]  # the classes the screen found easiest to reach, best first
    reference: list[int]  # random others: the yardstick of the anomaly indices
    screen_steps: int
    screen_images: int  # per class ("classes"), in all ("sweep")
    seconds: float
    screen: str = "classes"  # or "sweep" (policy detection.screen)
    # per trigger family: how many reference classes' triggers reached the goal; they set
    # the median and spread when there are enough of them (detect.yardsticks)
    yardstick: dict[str, int] = field(default_factory=dict)


@dataclass
class Detection:
    classes: list[ClassReverse]
    flagged_targets: list[int]
    threshold: float
    data_free: bool
    bn_layers_matched: int = 0  # data-free synthesis: BatchNormalization nodes used as prior
    # reversed trigger of each flagged class, pixel space [0, 1]: mask [H, W], pattern [C, H, W]
    # (a warp trigger: its displacement magnitude as the mask, no pattern)
    masks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    patterns: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    # one stamped example image per flagged class, pixel space [C, H, W]
    examples: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    forward_passes: int = 0
    families: dict[int, str] = field(default_factory=dict)  # flagged class -> trigger family
    # flagged class -> the test that flagged it: "combined" (the index drawn against the
    # threshold), "patch" or "warp" (that family's index, anomalous and isolated); a class
    # flagged by a family test can sit below the threshold on the combined index
    reasons: dict[int, str] = field(default_factory=dict)
    # each set of inputs triggers were reversed on ("few-shot", "synthesised": the second
    # view runs when the few-shot images flag nothing) -> its decision score (how far its
    # most suspicious class goes past the rule, above 1 = flagged; detect.score). The
    # statistics above are from the view that flagged, else from the first.
    views: dict[str, float] = field(default_factory=dict)
    # a many-class scan reverses only some classes in full (`classes` then lists those)
    shortlist: Shortlist | None = None
    # its reference classes when they are the yardstick: reported, never flagged (detect)
    yardstick_classes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class FrontierPoint:
    """One step of the repair plan's walk (prune.py): the plan after `channels` zeroings."""

    channels: int
    reversed_asr: float  # on the stamped images
    target_probability: float  # mean target probability of the stamped images
    clean_cost: float  # KL(original ‖ pruned) on the clean images
    clean_acc: float


@dataclass
class Rescan:
    """The detector run again on the repaired model, on the views the scan used."""

    views: list[str]
    flagged_targets: list[int]
    anomaly_indices: dict[int, float]  # flagged class -> its anomaly index on the repaired model
    forward_passes: int = 0
    # the repair's target, in the trigger family the scan flagged it with, on the view that
    # flagged it: the reversed trigger's size (mask L1, perturbation L2, warp RMS) on the
    # original and on the repaired model, and the median size of the other classes' on the
    # repaired model. A repair that removed the backdoor makes the target as hard to reach
    # as any class; one that blocked only the reversed pattern leaves it about as cheap.
    target_family: str | None = None
    target_size_before: float | None = None
    target_size_after: float | None = None
    others_median_after: float | None = None

    @property
    def growth(self) -> float | None:
        """The target's trigger size on the repaired model over its size before."""
        if self.target_size_before is None or self.target_size_after is None:
            return None
        return self.target_size_after / max(self.target_size_before, 1e-12)

    @property
    def clean(self) -> bool:
        return not self.flagged_targets


@dataclass(frozen=True)
class ChannelValue:
    layer: str
    channel: int
    shapley: float  # backdoor Shapley value (utility: target probability of reversed trigger)
    clean: float  # contribution to clean utility on the few-shot images
    pruned: bool = False


@dataclass(frozen=True)
class PlanCheck:
    """The plan's figures for one channel set, on whichever weights the evaluators run."""

    reversed_asr: float
    target_probability: float  # mean target probability of the stamped images
    clean_acc: float
    clean_target_probability: float  # of the clean images of other classes
    target_reached: bool


@dataclass
class Repair:
    target: int
    channels_total: int
    pruned: list[ChannelValue]
    top_channels: list[ChannelValue]  # highest backdoor value, for the report
    reversed_asr_before: float
    reversed_asr_after: float
    fewshot_acc_before: float
    fewshot_acc_after: float
    permutations: int
    forward_passes: int
    estimator: str  # "eps-greedy", "truncated-mc", "clp", "fine-pruning"
    # channels the Shapley estimate played with, the top of a first-order ranking
    # (repair.narrow_players); None: every channel
    players: int | None = None
    output_path: str | None = None
    target_reached: bool = True
    # mean target-class probability of the stamped few-shot images (Shapley pruning only)
    target_probability_before: float | None = None
    target_probability_after: float | None = None
    # zeroed while planning, then switched back on as not needed (prune.py's give-back pass)
    given_back: list[ChannelValue] = field(default_factory=list)
    # "complete": the plan reached its target and the re-scan flagged nothing; otherwise
    # "incomplete", and --out gets the model only with --keep-incomplete, marked so in its
    # metadata_props (shapscan.repair)
    status: str = "complete"
    incomplete_reasons: list[str] = field(default_factory=list)
    withheld: bool = False  # --out was given and the incomplete repair was not written
    frontier: list[FrontierPoint] = field(default_factory=list)  # the plan's walk
    rescan: Rescan | None = None
    recovery_note: str | None = None  # [repair.recover]: what fine-tuning did, or why not
    # the plan is built on one reversed trigger; the target's trigger of every family the
    # scan reversed (patch, universal, warp), stamped on the same rows: family -> its
    # success on the original and on the repaired model
    family_asr: dict[str, tuple[float, float]] = field(default_factory=dict)
    # what the before/after figures were measured on (Shapley pruning; 0: not recorded):
    # the other classes' images stamped with the reversed trigger at `trigger_gain` times
    # its strength, and the clean images, each followed by shifted copies of itself
    inputs: str = "few-shot"  # or "synthesised" (data-free)
    stamped_images: int = 0
    stamped_copies: int = 0
    clean_images: int = 0
    clean_copies: int = 0
    # the scan's images, when the repair drew `clean_images` of them ([repair] max_images)
    scan_images: int = 0
    trigger_gain: float = 1.0
    # mean target probability that clean images of other classes get from the repaired
    # model: the stop rule compares the stamped images' with it
    clean_target_probability_after: float | None = None
    # with [repair.recover]: the plan's figures on the zeroed model before the fine-tuning
    # (the *_after fields, family_asr and SS304 are then of the recovered model)
    zeroed: PlanCheck | None = None
    # the share of channels the plan was allowed (None: the policy's repair budget)
    channel_budget: float | None = None

    @property
    def pruned_fraction(self) -> float:
        return len(self.pruned) / max(1, self.channels_total)

    @property
    def images_word(self) -> str:
        """What the scan's own images are, in the reports' words."""
        return "synthesised inputs" if self.inputs == "synthesised" else "few-shot images"

    def stamped_rows(self) -> str:
        """Which rows the reversed trigger's success and target probability are on."""
        if not self.stamped_images:
            return f"the stamped {self.images_word}"
        rows = self.stamped_images * (1 + self.stamped_copies)
        return (f"{rows} rows: the {self.stamped_images} {self.images_word} of other classes"
                f"{self.drawn()} and {self.stamped_copies} shifted copies of each, stamped "
                f"with the reversed trigger at {self.trigger_gain:g}x its strength")

    def clean_rows(self) -> str:
        """Which rows the clean accuracy before and after is on."""
        if not self.clean_images:
            return f"the {self.images_word}"
        rows = self.clean_images * (1 + self.clean_copies)
        return (f"{rows} rows: the {self.clean_images} {self.images_word}{self.drawn()} and "
                f"{self.clean_copies} shifted copies of each")

    def drawn(self) -> str:
        """How the repair's images came from the scan's, when it did not use them all."""
        if self.scan_images <= self.clean_images:
            return ""
        return (f" (drawn from the scan's {self.scan_images}: at most repair.max_images, the "
                "flagged class's own among them)")


@dataclass
class ModelSummary:
    path: str
    sha256: str
    opset: int
    inputs: list[tuple[str, list[int | str]]]
    outputs: list[tuple[str, list[int | str]]]
    layers: list[LayerInfo]
    size_bytes: int

    @property
    def channels_total(self) -> int:
        return sum(layer.channels for layer in self.layers)


@dataclass(frozen=True)
class ModelOutput:
    """What `--out` got for one model: the repaired model, an unchanged copy of a model the
    scan found clean (a pipeline deploys one path either way), or nothing, and why."""

    path: str
    kind: str | None  # "repaired" | "unchanged-copy"; None: nothing was written
    reason: str = ""  # why nothing was written

    @property
    def written(self) -> bool:
        return self.kind is not None


@dataclass
class ScanResult:
    model_path: str
    verdict: Verdict = Verdict.INCONCLUSIVE
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    model: ModelSummary | None = None
    detection: Detection | None = None
    repair: Repair | None = None
    method: str = "shapley"
    device: str = "cpu"
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    tool_version: str = ""
    output: ModelOutput | None = None  # set by the CLI when --out was given
    # runs of the scan it took: above 1 when its Ray worker was lost and Ray re-ran it
    attempts: int = 1

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)
