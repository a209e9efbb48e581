"""The rule catalog and gate policies, loaded from the TOML data in rules/.

A policy sets the detection thresholds, repair budgets, Shapley sampling, load limits, the
severity at which the gate fails, and per-rule severity overrides or suppressions. Policy
files are user input: every unknown key, unknown rule id, wrong type or out-of-range value
is a UsageError (exit 4) naming the file and the key, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ShapscanError, UsageError
from .findings import Finding, Severity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

BUILTIN_POLICIES = ("default", "strict", "permissive")


# ---------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    severity: Severity  # default severity; policies may override it
    description: str
    remediation: str


@dataclass(frozen=True)
class Catalog:
    """The rules in catalog order (SARIF's ruleIndex is the position in this order)."""

    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {rule.id: i for i, rule in enumerate(self.rules)})

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __contains__(self, rule_id: object) -> bool:
        return rule_id in self._by_id  # type: ignore[attr-defined]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(rule.id for rule in self.rules)

    def index(self, rule_id: str) -> int:
        """Position of the rule in the catalog; KeyError for an unknown id (a bug)."""
        try:
            return self._by_id[rule_id]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"unknown rule id {rule_id!r}") from None

    def get(self, rule_id: str) -> Rule:
        """The rule with this id; KeyError for an unknown id (a bug in the caller)."""
        return self.rules[self.index(rule_id)]

    def make(self, rule_id: str, message: str, location: str | None = None,
             **details: object) -> Finding:
        """A finding for `rule_id` at the rule's default severity (policies apply later)."""
        return Finding(rule_id, self.get(rule_id).severity, message, location, dict(details))


_RULE_KEYS = ("id", "name", "severity", "description", "remediation")


def parse_catalog(text: str, source: str = "catalog.toml") -> Catalog:
    """Parse catalog TOML. The catalog ships with the package, so a defect is our bug:
    it raises ShapscanError (exit 2), not UsageError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ShapscanError(f"{source}: not valid TOML ({exc})") from None
    rules: list[Rule] = []
    for i, entry in enumerate(data.get("rule", [])):
        missing = [k for k in _RULE_KEYS if not isinstance(entry.get(k), str)]
        extra = sorted(set(entry) - set(_RULE_KEYS))
        if missing or extra:
            raise ShapscanError(f"{source}: rule #{i + 1}: missing {missing} / unknown {extra}")
        try:
            severity = Severity.parse(entry["severity"])
        except ValueError as exc:
            raise ShapscanError(f"{source}: rule {entry['id']}: {exc}") from None
        rules.append(Rule(entry["id"], entry["name"], severity,
                          " ".join(entry["description"].split()),
                          " ".join(entry["remediation"].split())))
    ids = [rule.id for rule in rules]
    if len(set(ids)) != len(ids) or not ids:
        raise ShapscanError(f"{source}: rule ids must be unique and non-empty")
    return Catalog(tuple(rules))


@functools.cache
def load_catalog() -> Catalog:
    """The catalog shipped in rules/catalog.toml (parsed once; Catalog is immutable)."""
    text = resources.files("scanner.rules").joinpath("catalog.toml").read_text(encoding="utf-8")
    return parse_catalog(text, "rules/catalog.toml")


# ---------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class FastPlan:
    """[detection.fast]: what a scan does instead of stopping (SS210) when the thorough plan
    is forecast over `detection.max_minutes`: the label-free sweep screens the classes
    (`reverse.sweep`), fewer classes are reversed in full on fewer rows a step, and
    data-free synthesis makes inputs for fewer classes. SS212 says it was taken."""

    enabled: bool = True
    shortlist: int = 8
    reference_classes: int = 48
    reverse_rows: int = 840  # 56 classes x 3 families x 5 images (ReverseConfig.min_images)
    synthesised_classes: int = 56


@dataclass(frozen=True)
class DetectionPolicy:
    anomaly_threshold: float = 2.5  # flag a class (SS201) above this anomaly index
    warn_threshold: float = 2.0  # report a suspicious class (SS202) above this
    # flag a class whose patch trigger is anomalous (> warn) and this isolated from the next
    isolation_threshold: float = 1.0
    # the warp test also asks the warp to be this many times smaller than the median class's
    warp_ratio: float = 4.0
    # when the few-shot images flag no class, look again on inputs synthesised from the
    # model's BatchNormalization statistics (models with BN only; about doubles a clean scan)
    synthesised_view: bool = True
    # Adam steps of every trigger reverse (few-shot and data-free), and of the second view's
    # (README "Step budget", benchmarks/reverse_steps.py: 120 / 50 drew as many verdicts
    # right as 150 / 150 over 6 seeds x 12 zoo models, in 60 % of the time)
    reverse_steps: int = 120
    second_view_steps: int = 50
    # below this clean accuracy on the few-shot images the scan is inconclusive (SS206):
    # a model that misreads its clean inputs (wrong preprocessing, wrong labels, a broken
    # model) makes every reversed trigger look like a backdoor or none
    min_clean_accuracy: float = 0.5
    # below this share of the model's classes with at least one few-shot image the scan is
    # inconclusive (SS207): a class without images skews how easily the others are reached
    # (zoo: one class left out gets a clean model flagged)
    min_class_coverage: float = 1.0
    # evidence.py beside the norms: how concentrated each reversed trigger's channel support
    # is, and each class's MM-BD max margin (Adam steps below; 0 leaves it out)
    evidence: bool = True
    margin_steps: int = 100
    # the evidence in the decision (detect.EvidenceRule): the norm tests do not flag a
    # class whose triggers' selectivity is below selectivity_floor; a class whose
    # selectivity is above margin_gate is flagged by its MM-BD margin index over
    # margin_scale (0: no margin test)
    selectivity_floor: float = -math.inf  # off: see default.toml
    margin_scale: float = 0.0
    margin_gate: float = 0.0
    # stop as inconclusive (SS210) before synthesis and reverse when they are forecast to
    # take longer than this many minutes on this machine (estimate.py); 0: no limit
    max_minutes: float = 120.0
    # many classes (reverse.screen): above `shortlist_over` classes every class's triggers
    # get a short screen (`screen_steps` Adam steps on `screen_images` images), and only
    # the `shortlist` classes it found easiest to reach, beside `reference_classes` random
    # others as the yardstick, are reversed in full; 0: every class in full
    shortlist_over: int = 200
    shortlist: int = 16
    reference_classes: int = 48
    screen_steps: int = 40
    screen_images: int = 2
    # which screen: "classes" (every class's triggers, as above) or "sweep" (label-free
    # triggers that move images out of their class: `sweep_restarts` per family, for
    # `sweep_steps` steps on `sweep_images` images; its cost does not grow with the classes)
    screen: str = "classes"
    sweep_steps: int = 40
    sweep_images: int = 32
    sweep_restarts: int = 2
    # rows of one full reverse step at most (reverse.ReverseConfig.max_rows)
    reverse_rows: int = 3000
    # inputs data-free synthesis makes on a shortlisted model: this many random classes
    synthesised_classes: int = 64
    fast: FastPlan = FastPlan()

    @property
    def evidence_decides(self) -> bool:
        """Whether the decision uses the evidence beside the norms (a selectivity floor or
        a margin test), rather than only reporting it."""
        return math.isfinite(self.selectivity_floor) or self.margin_scale > 0

    def fast_plan(self) -> DetectionPolicy:
        """This policy with [detection.fast] taken: the sweep screens any model with more
        classes than the fast plan reverses in full, and the evidence beside the norms is
        gathered only when the decision uses it (on the 1,000-class 224x224 MobileNetV2
        it was 5 of the scan's 31 minutes, for report columns)."""
        f = self.fast
        return dataclasses.replace(
            self, screen="sweep", shortlist=f.shortlist, reference_classes=f.reference_classes,
            shortlist_over=f.shortlist + f.reference_classes, reverse_rows=f.reverse_rows,
            synthesised_classes=f.synthesised_classes,
            evidence=self.evidence and self.evidence_decides)


@dataclass(frozen=True)
class RecoverPolicy:
    """[repair.recover]: fine-tune the zeroed model (scanner/recover.py)."""

    enabled: bool = True
    # the channel budget of a plan that recovery follows (repair.max_channel_fraction is
    # the budget of zeroing alone: recovery off, or a model it cannot train)
    max_channel_fraction: float = 0.10
    # repair.min_trigger_growth and repair.every_family for a repair that recovery followed
    # (recovery unlearns the very triggers the family check stamps: the re-scan, which
    # reverses new ones, is the independent check)
    min_trigger_growth: float = 0.0
    every_family: bool = False
    steps: int = 300  # Adam steps
    lr: float = 3e-4
    # op types whose float parameters are trained (weights and biases; BN/LN scale and bias)
    parameters: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "BatchNormalization",
                                   "LayerNormalization")
    temperature: float = 2.0  # distillation temperature
    unlearn_weight: float = 1.0  # weight of a trigger-stamped row against a clean one
    label_weight: float = 0.0  # share of the few-shot label in each row's target
    flip: bool = False  # horizontal flips in the augmentation (only where the data allows)


@dataclass(frozen=True)
class RepairPolicy:
    enabled: bool = True
    target_asr: float = 0.05  # reversed-trigger success on the few-shot images to reach
    target_probability: float = 0.003  # ... and their mean target-class probability
    max_channel_fraction: float = 0.02  # budget: share of all activation channels zeroed
    max_clean_drop: float = 0.10  # budget: few-shot clean accuracy drop (absolute)
    # run the detector again on the repaired model; a class it still flags makes the
    # repair incomplete
    rescan: bool = True
    # ... and so does a target whose reversed trigger (the family it was flagged with) on
    # the repaired model is less than this many times its size before (0: no such test)
    min_trigger_growth: float = 0.0
    # ... and so does a target whose reversed trigger of another family (patch, universal,
    # warp) still succeeds above target_asr on the repaired model
    every_family: bool = True
    # memory bound: the repair works on at most this many of the scan's images (0: all)
    max_images: int = 100
    recover: RecoverPolicy = RecoverPolicy()


@dataclass(frozen=True)
class ShapleyPolicy:
    permutations: int = 40
    epsilon: float = 0.2  # probability of a fully random permutation (else top-k first)
    top_k: int = 20
    truncation: float = 0.1  # stop a permutation when utility < truncation * v(all)
    # above this many channels the estimate plays only with the top of a first-order
    # ranking (repair.narrow_players); 0: always every channel
    max_players: int = 1500


@dataclass(frozen=True)
class LoadPolicy:
    allowed_domains: tuple[str, ...] = ("", "ai.onnx", "ai.onnx.ml")
    max_model_bytes: int = 2_000_000_000
    # memory one batched run may use, estimated from the graph's tensor sizes (budget.py):
    # larger batches are cut into runs that fit
    max_batch_bytes: int = 2_000_000_000


def _frozen_overrides() -> Mapping[str, Severity]:
    return types.MappingProxyType({})


@dataclass(frozen=True)
class Policy:
    name: str = "default"
    detection: DetectionPolicy = DetectionPolicy()
    repair: RepairPolicy = RepairPolicy()
    shapley: ShapleyPolicy = ShapleyPolicy()
    load: LoadPolicy = LoadPolicy()
    fail_on: Severity = Severity.HIGH
    # read-only mapping; excluded from the hash because mappings are not hashable
    overrides: Mapping[str, Severity] = field(default_factory=_frozen_overrides, hash=False)
    suppress: frozenset[str] = frozenset()

    def apply(self, findings: list[Finding]) -> list[Finding]:
        """Drop suppressed rules and apply severity overrides; order is kept."""
        out: list[Finding] = []
        for finding in findings:
            if finding.rule_id in self.suppress:
                continue
            severity = self.overrides.get(finding.rule_id)
            if severity is not None and severity != finding.severity:
                finding = dataclasses.replace(finding, severity=severity)
            out.append(finding)
        return out

    def severity_of(self, rule: Rule) -> Severity | None:
        """Effective severity of a catalog rule under this policy; None when suppressed."""
        if rule.id in self.suppress:
            return None
        return self.overrides.get(rule.id, rule.severity)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (severities as lower-case names), e.g. for `rules --json`."""
        return {
            "name": self.name,
            "fail_on": self.fail_on.name.lower(),
            "suppress": sorted(self.suppress),
            "overrides": {k: v.name.lower() for k, v in sorted(self.overrides.items())},
            # JSON has no infinity: an unbounded value (selectivity_floor = -inf) is null
            "detection": {k: None if isinstance(v, float) and not math.isfinite(v) else v
                          for k, v in dataclasses.asdict(self.detection).items()},
            "repair": dataclasses.asdict(self.repair),
            "shapley": dataclasses.asdict(self.shapley),
            "load": {**dataclasses.asdict(self.load),
                     "allowed_domains": list(self.load.allowed_domains)},
        }


# Allowed ranges: (low, high, low_inclusive, high_inclusive); None = unbounded.
_Range = tuple[float | None, float | None, bool, bool]
_RANGES: dict[str, _Range] = {
    "detection.anomaly_threshold": (0.0, None, False, True),
    "detection.warn_threshold": (0.0, None, False, True),
    "detection.isolation_threshold": (0.0, None, False, True),
    "detection.warp_ratio": (1.0, None, True, True),
    "detection.min_clean_accuracy": (0.0, 1.0, True, True),
    "detection.min_class_coverage": (0.0, 1.0, True, True),
    "detection.reverse_steps": (1, 100_000, True, True),
    "detection.second_view_steps": (1, 100_000, True, True),
    "detection.margin_steps": (0, 100_000, True, True),
    "detection.max_minutes": (0.0, None, True, True),
    "detection.shortlist_over": (0, None, True, True),
    "detection.shortlist": (1, None, True, True),
    "detection.reference_classes": (3, None, True, True),
    "detection.screen_steps": (1, 100_000, True, True),
    "detection.screen_images": (1, 1_000, True, True),
    "detection.sweep_steps": (1, 100_000, True, True),
    "detection.sweep_images": (1, 100_000, True, True),
    "detection.sweep_restarts": (1, 1_000, True, True),
    "detection.reverse_rows": (1, None, True, True),
    "detection.synthesised_classes": (1, None, True, True),
    "detection.fast.shortlist": (1, None, True, True),
    "detection.fast.reference_classes": (3, None, True, True),
    "detection.fast.reverse_rows": (1, None, True, True),
    "detection.fast.synthesised_classes": (1, None, True, True),
    "detection.selectivity_floor": (None, None, True, True),
    "detection.margin_scale": (0.0, None, True, True),
    "detection.margin_gate": (None, None, True, True),
    "repair.target_asr": (0.0, 1.0, True, True),
    "repair.target_probability": (0.0, 1.0, True, True),
    "repair.max_channel_fraction": (0.0, 1.0, False, True),
    "repair.max_clean_drop": (0.0, 1.0, True, True),
    "repair.min_trigger_growth": (0.0, None, True, True),
    "repair.max_images": (0, None, True, True),
    "repair.recover.max_channel_fraction": (0.0, 1.0, False, True),
    "repair.recover.min_trigger_growth": (0.0, None, True, True),
    "repair.recover.steps": (1, 100_000, True, True),
    "repair.recover.lr": (0.0, 1.0, False, True),
    "repair.recover.temperature": (0.0, None, False, True),
    "repair.recover.unlearn_weight": (0.0, None, True, True),
    "repair.recover.label_weight": (0.0, 1.0, True, True),
    "shapley.permutations": (1, 100_000, True, True),
    "shapley.epsilon": (0.0, 1.0, True, True),
    "shapley.top_k": (1, None, True, True),
    "shapley.max_players": (0, None, True, True),
    "shapley.truncation": (0.0, 1.0, True, False),
    "load.max_model_bytes": (1, None, True, True),
    "load.max_batch_bytes": (1, None, True, True),
}
# List-valued keys and the strings they may hold.
_CHOICES: dict[str, tuple[str, ...]] = {
    "detection.screen": ("classes", "sweep"),
    "repair.recover.parameters": ("Conv", "Gemm", "MatMul", "BatchNormalization",
                                  "LayerNormalization"),
}
_SECTIONS: dict[str, type] = {
    "detection": DetectionPolicy, "repair": RepairPolicy, "shapley": ShapleyPolicy,
    "load": LoadPolicy,
}
_TOP_KEYS = ("name", "extends", "fail_on", "suppress", "overrides", *_SECTIONS)


class _PolicyParser:
    """Turns one policy document into a Policy; every error names the file and the key."""

    def __init__(self, source: str, catalog: Catalog):
        self.source = source
        self.catalog = catalog

    def fail(self, key: str, problem: str) -> UsageError:
        return UsageError(f"policy {self.source}: {key}: {problem}")

    def parse(self, data: dict[str, Any], base: Policy) -> Policy:
        for key in data:
            if key not in _TOP_KEYS:
                raise self.fail(key, f"unknown key (expected one of: {', '.join(_TOP_KEYS)})")
        sections = {name: self.section(name, data.get(name, {}), getattr(base, name))
                    for name in _SECTIONS}
        detection = sections["detection"]
        if detection.warn_threshold > detection.anomaly_threshold:
            raise self.fail("detection.warn_threshold",
                            f"{detection.warn_threshold} is above detection.anomaly_threshold "
                            f"({detection.anomaly_threshold})")
        name = data.get("name", base.name)
        if not isinstance(name, str) or not name.strip():
            raise self.fail("name", "expected a non-empty string")
        fail_on = self.severity("fail_on", data["fail_on"]) if "fail_on" in data else base.fail_on
        return Policy(name=name, fail_on=fail_on,
                      overrides=types.MappingProxyType(
                          {**base.overrides, **self.overrides(data.get("overrides", {}))}),
                      suppress=base.suppress | self.suppress(data.get("suppress", [])),
                      **sections)

    def severity(self, key: str, value: object) -> Severity:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a severity name, got {type(value).__name__}")
        try:
            return Severity.parse(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def rule_id(self, key: str, value: object) -> str:
        if not isinstance(value, str) or value not in self.catalog:
            raise self.fail(key, f"unknown rule id {value!r} (see `shapscan rules`)")
        return value

    def overrides(self, table: object) -> dict[str, Severity]:
        if not isinstance(table, dict):
            raise self.fail("overrides", "expected a table of rule id = severity")
        return {self.rule_id(f"overrides.{rid}", rid): self.severity(f"overrides.{rid}", sev)
                for rid, sev in table.items()}

    def suppress(self, value: object) -> frozenset[str]:
        if not isinstance(value, list):
            raise self.fail("suppress", "expected a list of rule ids")
        return frozenset(self.rule_id("suppress", rid) for rid in value)

    def section(self, name: str, table: object, base: Any) -> Any:
        if not isinstance(table, dict):
            raise self.fail(name, "expected a table")
        known = {f.name: f for f in dataclasses.fields(base)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            dotted = f"{name}.{key}"
            if key not in known:
                raise self.fail(dotted, f"unknown key (expected one of: {', '.join(known)})")
            values[key] = self.value(dotted, value, getattr(base, key))
        return dataclasses.replace(base, **values)

    def value(self, key: str, value: object, default: object) -> object:
        """Check `value` against the type of the default and the key's allowed range."""
        if dataclasses.is_dataclass(default):  # a sub-table, e.g. [repair.recover]
            return self.section(key, value, default)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise self.fail(key, f"expected true or false, got {value!r}")
            return value
        if isinstance(default, str):
            if not isinstance(value, str) or value not in _CHOICES[key]:
                raise self.fail(key, f"expected one of {', '.join(_CHOICES[key])}, "
                                     f"got {value!r}")
            return value
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(key, "expected a list of strings")
            unknown = sorted(set(value) - set(_CHOICES.get(key, value)))
            if unknown:
                raise self.fail(key, f"unknown {', '.join(unknown)} (expected some of: "
                                     f"{', '.join(_CHOICES[key])})")
            return tuple(value)
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(key, f"expected an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.fail(key, f"expected a number, got {value!r}")
            value = float(value)
            if value != value:  # NaN passes every comparison below
                raise self.fail(key, "expected a number, got nan")
        self.check_range(key, value)  # type: ignore[arg-type]
        return value

    def check_range(self, key: str, value: float) -> None:
        low, high, low_in, high_in = _RANGES.get(key, (None, None, True, True))
        ok = ((low is None or (value >= low if low_in else value > low))
              and (high is None or (value <= high if high_in else value < high)))
        if not ok:
            lo = "(-inf" if low is None else ("[" if low_in else "(") + f"{low}"
            hi = "inf)" if high is None else f"{high}" + ("]" if high_in else ")")
            raise self.fail(key, f"{value} is out of range {lo}, {hi}")


def _read_toml(path: Path | None, text: str | None, source: str) -> dict[str, Any]:
    try:
        if text is None:
            assert path is not None
            if path.exists() and not path.is_file():  # a FIFO would block the read
                raise UsageError(f"policy {source}: not a regular file")
            text = path.read_text(encoding="utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise UsageError(f"policy {source}: no such file (built-in policies: "
                         f"{', '.join(BUILTIN_POLICIES)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"policy {source}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"policy {source}: not valid TOML ({exc})") from None


@functools.cache
def _builtin(name: str) -> Policy:
    source = f"rules/policies/{name}.toml"
    text = resources.files("scanner.rules").joinpath("policies", f"{name}.toml").read_text("utf-8")
    data = _read_toml(None, text, source)
    if "extends" in data:
        raise UsageError(f"policy {source}: extends: not allowed in a built-in policy")
    return _PolicyParser(source, load_catalog()).parse(data, Policy(name=name))


def load_policy(name_or_path: str | Path) -> Policy:
    """A built-in policy by name ("default", "strict", "permissive") or a TOML file.

    A file may set `extends = "<built-in name>"` to start from that policy (default:
    "default"); keys it sets replace the base's, overrides and suppressions add to them.
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_POLICIES:
        return _builtin(name_or_path)
    path = Path(name_or_path)
    source = str(path)
    if path.is_dir():
        raise UsageError(f"policy {source}: is a directory, expected a .toml file")
    data = _read_toml(path, None, source)
    parser = _PolicyParser(source, load_catalog())
    extends = data.pop("extends", "default")
    if extends not in BUILTIN_POLICIES:
        raise parser.fail("extends", f"expected one of {', '.join(BUILTIN_POLICIES)}, "
                                     f"got {extends!r}")
    base = _builtin(extends)
    return parser.parse(data, dataclasses.replace(base, name=path.stem))
