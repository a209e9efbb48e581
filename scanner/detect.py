"""Stage 2: is the model backdoored, and towards which class?

A backdoor target needs a far smaller reversed trigger than any honest class. For each
trigger family the norms l_t of all classes give an anomaly index
a_t = (median(u) − u_t) / (1.4826 · MAD(u)) with u = log l; a class is flagged when the
mean of its patch and universal indices exceeds the policy threshold, or when one family's
trigger is both anomalous and isolated from the next class's (`detect`).

Why the logarithm: trigger norms are scale quantities (a mask of 5 pixels against honest
classes between 17 and 58 on cnn_badnets). On the raw scale the large honest norms inflate
the MAD and the true target scored 1.8; on the log scale it scores 4.6, while honest
classes keep their spread.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from .evidence import Evidence
from .findings import ClassReverse, Detection
from .reverse import ReversedTrigger, ReverseResult

MAD_TO_SIGMA = 1.4826
MIN_REFERENCE = 3  # reference classes below which `detect` measures against all reversed
# reference triggers that reached the goal, per family, below which a shortlisted scan's
# yardstick keeps the ones that did not (`yardsticks`)
MIN_CONVERGED = 8


def _robust(norms: np.ndarray, log: bool = True, reference: np.ndarray | None = None
            ) -> tuple[np.ndarray, float, float]:
    """(values, median, 1.4826 · MAD), on the log scale unless `log` is False; median and
    MAD of the entries where `reference` is true (default all)."""
    u = np.asarray(norms, np.float64)
    if log:
        u = np.log(np.maximum(u, 1e-12))
    r = u if reference is None else u[reference]
    median = float(np.median(r))
    return u, median, MAD_TO_SIGMA * float(np.median(np.abs(r - median)))


def anomaly_indices(norms: np.ndarray, log: bool = True,
                    reference: np.ndarray | None = None) -> np.ndarray:
    """Low-side anomaly index of every entry against the median and spread of the
    `reference` entries (default all); 0 where the spread is degenerate."""
    u, median, mad = _robust(norms, log, reference)
    if mad <= 1e-12:
        return np.zeros_like(u)
    return (median - u) / mad


@dataclass
class Verdict:
    detection: Detection
    triggers: dict[int, ReversedTrigger]  # flagged target -> the trigger that flagged it
    reasons: dict[int, str]  # flagged target -> the test: "combined", "patch" or "warp"
    suspicious: list[int]  # above the warn level but below the threshold
    # flagged target -> steps its trigger was reversed again, alone, before the repair
    refined: dict[int, int] = field(default_factory=dict)
    # flagged target -> its reversed trigger of every family (what recovery unlearns)
    families: dict[int, list[ReversedTrigger]] = field(default_factory=dict)

    def keep_only(self, target: int) -> Verdict:
        """This verdict with every flag but the one on `target` withdrawn."""
        det = self.detection
        det.flagged_targets = [t for t in det.flagged_targets if t == target]
        for c in det.classes:
            c.flagged = c.flagged and c.target == target
        return Verdict(det, {t: v for t, v in self.triggers.items() if t == target},
                       {t: v for t, v in self.reasons.items() if t == target},
                       self.suspicious,
                       families={t: v for t, v in self.families.items() if t == target})


# the warp test's default median ratio (policy key detection.warp_ratio; see `detect`)
WARP_RATIO = 4.0


def most_suspicious(detection: Detection, warn_threshold: float, isolation_threshold: float,
                    warp_ratio: float = WARP_RATIO, evidence_rule: EvidenceRule | None = None
                    ) -> int | None:
    """The class that comes closest to being flagged: the largest per-class decision score
    (`class_scores`; None when no class that can be flagged has a finite one)."""
    finite = {t: v for t, v in class_scores(
        detection.classes, detection.threshold, warn_threshold, isolation_threshold,
        warp_ratio, evidence_rule).items()
        if np.isfinite(v) and t not in detection.yardstick_classes}
    return max(finite, key=finite.__getitem__) if finite else None


def isolation(norms: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """How far the smallest norm stands from the second smallest, in robust standard
    deviations of the log norms (of the `reference` entries; default all); 0 for every
    other class."""
    u, _, mad = _robust(norms, reference=reference)
    out = np.zeros_like(u)
    if len(u) > 1 and mad > 1e-12:
        first, second = np.argsort(u, kind="stable")[:2]
        out[first] = (u[second] - u[first]) / mad
    return out


# Families whose indices are averaged into the combined index: a full-image trigger is small
# both as a mask-and-pattern and as an additive perturbation. A warp is neither, so the warp
# family is judged on its own (anomalous and isolated) rather than diluting that mean.
COMBINED = ("patch", "universal")


def detect(result: ReverseResult, threshold: float, warn_threshold: float,
           isolation_threshold: float = 1.0, data_free: bool = False,
           bn_layers: int = 0, warp_ratio: float = WARP_RATIO,
           evidence: Evidence | None = None, evidence_rule: EvidenceRule | None = None
           ) -> Verdict:
    """Flag a class when its combined anomaly index exceeds `threshold`, when its patch
    trigger is both anomalous (above `warn_threshold`) and isolated (≥ `isolation_threshold`),
    or when its warp trigger is anomalous (above `threshold`), isolated, and at least
    `warp_ratio` times smaller than the median class's.

    The combined index is the mean of the patch and universal indices. Either family alone
    has honest outliers on Fashion-MNIST (a patch turns anything into a bag; shirts are close
    to every top), while a full-image backdoor target is small in both. Honest easy classes
    come in groups (shirt, T-shirt, pullover, coat), a patch backdoor's target stands alone:
    resnet_badnets' mask is 2.9 pixels against 16.5 for the next class.

    A warp backdoor's target (WaNet) is reached by a warp some 20 times smaller than the
    median class's (few-shot 0.2 pixels RMS against 4.2–4.6; warp index 8 and 15, 7 and 14
    robust σ from the next class) while its patch and universal triggers are only
    moderately small (combined 1.9–2.1). The warp test asks for the full `threshold`, not
    the warn level: honest classes reach warp indices up to 1.9 (few-shot) and 2.2
    (data-free) on the clean zoo models, and data-free up to 4.2 with isolation 3.2 on
    backdoored ones (resnet_badnets' bag, cnn_blended's ankle boot: without the ratio below
    they carried a second, wrong flag). Honest warp norms can also cluster so tightly
    that a modestly small one gets a large index: with seed 1, cnn_clean's ankle boot
    reached warp index 3.98 (isolation 1.52) few-shot at 1.6 times below the median, and
    data-free its sandal 4.02 (isolation 3.44) at 1.3 times. Hence the scale-free ratio:
    WaNet targets sit 9-23 times below the median, honest classes at most 2.0.
    These cuts were calibrated on the 12-model sample zoo, only 3 of them clean: a small
    sample, see README.

    With `evidence` and an `evidence_rule`, the evidence beside the norms enters the
    decision (`class_scores`, `EvidenceRule`).
    """
    ids = _reversed(result)
    n = len(ids)  # positions 0..n-1 below; ids[i] is the class
    families = _families(result)
    refs = yardsticks(result)
    norms = {fam: np.array([result.triggers[(fam, t)].norm for t in ids])
             for fam in families}
    index = {fam: anomaly_indices(norms[fam], reference=refs[fam]) for fam in families}
    averaged = [f for f in COMBINED if f in index] or families
    combined = np.mean([index[f] for f in averaged], axis=0)
    alone = {fam: isolation(norms[fam], reference=refs[fam]) for fam in ("patch", "warp")
             if fam in norms}
    ratio = ({"warp": np.median(norms["warp"] if refs["warp"] is None
                                else norms["warp"][refs["warp"]])
              / np.maximum(norms["warp"], 1e-12)} if "warp" in norms else {})
    margins = (margin_index(evidence.max_margin[ids])
               if evidence is not None and evidence.max_margin is not None else None)
    by_patch = [("patch" in index and bool(
        index["patch"][i] > warn_threshold and alone["patch"][i] >= isolation_threshold))
        for i in range(n)]
    by_warp = [("warp" in index and bool(
        index["warp"][i] > threshold and alone["warp"][i] >= isolation_threshold
        and ratio["warp"][i] >= warp_ratio)) for i in range(n)]
    # the family that stands out most supplies the trigger for the Shapley stage
    best = ["patch" if by_patch[i] else "warp" if by_warp[i]
            else max(families, key=lambda f: index[f][i]) for i in range(n)]
    classes = [_class_reverse(result, ids[i], i, index, alone, ratio, float(combined[i]),
                              best[i], evidence, None if margins is None else float(margins[i]))
               for i in range(n)]
    decision = class_scores(classes, threshold, warn_threshold, isolation_threshold,
                            warp_ratio, evidence_rule)
    yardstick = yardstick_classes(result)
    flagged, suspicious, chosen, reasons = [], [], {}, {}
    every: dict[int, list[ReversedTrigger]] = {}
    for i, c in enumerate(classes):
        t, best_fam = ids[i], best[i]
        c.flagged = decision[t] > 1.0 and t not in yardstick
        if c.flagged:
            flagged.append(t)
            chosen[t] = result.triggers[(best_fam, t)]
            every[t] = [result.triggers[(f, t)] for f in families if (f, t) in result.triggers]
            reasons[t] = ("combined" if combined[i] > threshold else "patch" if by_patch[i]
                          else "warp" if by_warp[i] else "evidence")
        elif combined[i] > warn_threshold or decision[t] > 1.0:
            suspicious.append(t)
    # the strongest is repaired first: the largest of its combined index and isolations
    strength = {ids[i]: max([combined[i]] + [alone[f][i] for f in alone])
                for i in range(n) if ids[i] in chosen}
    flagged.sort(key=lambda t: -strength[t])
    detection = Detection(classes=classes, flagged_targets=flagged, threshold=threshold,
                          data_free=data_free, bn_layers_matched=bn_layers,
                          forward_passes=result.forward_passes
                          + (evidence.forward_passes if evidence else 0),
                          yardstick_classes=sorted(yardstick))
    return Verdict(detection, chosen, reasons, suspicious, families=every)


def yardsticks(result: ReverseResult) -> dict[str, np.ndarray | None]:
    """Per trigger family, which reversed classes (positions in `result.targets` order)
    set the median and spread of the anomaly indices; None: all of them.

    A scan that reversed every class measures against every class. A shortlisted scan
    measures against its random reference classes (against every class reversed when a
    screen left fewer than MIN_REFERENCE of them), and of those only the ones whose
    trigger of the family reached the reverse's success goal, when at least MIN_CONVERGED
    did: a trigger that never flipped its rows has no size yet, its norm is wherever the
    step budget ran out. On the 1,000-class 224x224 MobileNetV2 pair, 35 and 38 of the 56
    classes reversed never reached the goal in 120 steps; their masks (7,500-12,500
    pixels) formed a tight cluster whose spread made every class that did converge look
    anomalous (17 flags on the clean model)."""
    if not yardstick_classes(result):
        return dict.fromkeys(_families(result))
    ref = np.isin(_reversed(result), result.reference)
    return {fam: reached if reached.sum() >= MIN_CONVERGED else ref
            for fam, reached in reached_goal(result).items()}


def yardstick_classes(result: ReverseResult) -> set[int]:
    """The classes `detect` measures against but never flags: a shortlisted scan's
    reference (when it is the yardstick, `yardsticks`). The screen chose the candidates as
    the classes a backdoor would make easy to reach, and the reference at random; testing
    the reference too would test 56 classes against a cut chosen on scans of 10 to 43
    (more honest outliers by chance alone: on the clean 1,000-class 224x224 MobileNetV2
    one reference class's full-image trigger came out 2.4 times below the median, combined
    index 2.99), to catch a target the screen missed only when the random draw happened
    to pick it. Such a class is reported as suspicious (SS202), not flagged."""
    if result.reference is None or len(result.reference) < MIN_REFERENCE:
        return set()
    return set(result.reference)


def reached_goal(result: ReverseResult) -> dict[str, np.ndarray]:
    """Per trigger family, which reference classes' triggers reached the reverse's goal
    (positions in `result.targets` order; none without a reference)."""
    ids = _reversed(result)
    ref = np.isin(ids, result.reference or [])
    return {fam: ref & np.array([result.triggers[(fam, t)].asr >= result.asr_goal
                                 for t in ids]) for fam in _families(result)}


def _reversed(result: ReverseResult) -> list[int]:
    """The classes reversed, in the order of `detect`'s per-class arrays."""
    return list(range(result.classes)) if result.targets is None else list(result.targets)


def _families(result: ReverseResult) -> list[str]:
    return sorted({fam for fam, _ in result.triggers})


def margin_index(margins: np.ndarray) -> np.ndarray:
    """High-side robust index of each class's MM-BD max margin, on the raw scale (margins
    can be 0 or negative): (m − median) / (1.4826 · MAD); 0 where the spread is degenerate."""
    m = np.asarray(margins, np.float64)
    median = float(np.median(m))
    mad = MAD_TO_SIGMA * float(np.median(np.abs(m - median)))
    return np.zeros_like(m) if mad <= 1e-12 else (m - median) / mad


def _class_reverse(result: ReverseResult, t: int, i: int, index: dict[str, np.ndarray],
                   alone: dict[str, np.ndarray], ratio: dict[str, np.ndarray],
                   combined: float, best_fam: str, evidence: Evidence | None,
                   margin: float | None) -> ClassReverse:
    """Class `t`, at position `i` of the per-family arrays."""
    def norm(fam: str) -> float | None:
        trig = result.triggers.get((fam, t))
        return float(trig.norm) if trig else None

    def at(values: dict[str, np.ndarray], fam: str) -> float | None:
        return float(values[fam][i]) if fam in values else None

    mask_l1 = norm("patch")
    return ClassReverse(
        target=t,
        mask_l1=float("nan") if mask_l1 is None else mask_l1,
        anomaly_index=combined,
        reversed_asr=float(result.triggers[(best_fam, t)].asr),
        universal_norm=norm("universal"),
        universal_anomaly_index=at(index, "universal"),
        patch_anomaly_index=at(index, "patch"),
        patch_isolation=at(alone, "patch"),
        warp_norm=norm("warp"),
        warp_anomaly_index=at(index, "warp"),
        warp_isolation=at(alone, "warp"),
        warp_ratio=at(ratio, "warp"),
        family_asr={fam: float(trig.asr) for (fam, c), trig in result.triggers.items()
                    if c == t},
        selectivity={} if evidence is None else {
            fam: v for (fam, c), v in evidence.selectivity.items() if c == t},
        max_margin=(None if evidence is None or evidence.max_margin is None
                    else float(evidence.max_margin[t])),
        margin_index=margin,
    )


def selectivity(c: ClassReverse) -> float | None:
    """Mean selectivity of the class's patch and full-image triggers (evidence.py), the
    families whose anomaly indices the combined index averages; None without evidence."""
    values = [c.selectivity[f] for f in COMBINED if f in c.selectivity]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class EvidenceRule:
    """How the evidence beside the norms (evidence.py) enters the decision.

    * Veto: a class whose patch and full-image triggers have a mean selectivity below
      `selectivity_floor` is an honest easy class (its triggers are made of its own
      features: zeroing their channels costs its own images more than the triggers), and
      the norm tests do not flag it.
    * Margin: a class whose triggers are selective (above `margin_gate`) is also flagged
      by its MM-BD max-margin index alone, as a ratio to `margin_scale` (above 1 =
      flagged). The gate keeps out the honest classes that are easy to push far above the
      others: their triggers ride on their own features too.

    None switches a part off. Both were chosen on the development corpus's calibration
    half (benchmarks/corpus_rules.py; README "Detection, measured").
    """

    selectivity_floor: float | None = None
    margin_scale: float | None = None
    margin_gate: float = 0.0


def class_scores(classes: Sequence[ClassReverse], threshold: float, warn_threshold: float,
                 isolation_threshold: float, warp_ratio: float = WARP_RATIO,
                 evidence_rule: EvidenceRule | None = None) -> dict[int, float]:
    """How far each class goes past the decision rule of `detect` (above 1 = flagged).

    The norm tests, each as a ratio to its cut: combined / threshold, the patch test
    min(patch index / warn, isolation / cut) and the warp test min(warp index /
    threshold, isolation / cut, median ratio / warp_ratio); their largest, unless the
    evidence rule vetoes the class; and the largest of that and the gated margin ratio
    (`EvidenceRule`)."""
    rule = evidence_rule or EvidenceRule()

    def ratio(value: float | None, bound: float) -> float:
        return -np.inf if value is None or not np.isfinite(value) else value / bound

    def decide(c: ClassReverse) -> float:
        tests = max(ratio(c.anomaly_index, threshold),
                    min(ratio(c.patch_anomaly_index, warn_threshold),
                        ratio(c.patch_isolation, isolation_threshold)),
                    min(ratio(c.warp_anomaly_index, threshold),
                        ratio(c.warp_isolation, isolation_threshold),
                        ratio(c.warp_ratio, warp_ratio)))
        sel = selectivity(c)
        if rule.selectivity_floor is not None and sel is not None \
                and sel < rule.selectivity_floor:
            tests = min(tests, 0.0)
        if rule.margin_scale and sel is not None and sel > rule.margin_gate \
                and c.margin_index is not None and np.isfinite(c.margin_index):
            tests = max(tests, c.margin_index / rule.margin_scale)
        return float(tests)

    return {c.target: decide(c) for c in classes}


def score(detection: Detection, warn_threshold: float, isolation_threshold: float,
          classes: Collection[int] | None = None, warp_ratio: float = WARP_RATIO,
          evidence_rule: EvidenceRule | None = None) -> float:
    """One number per model for ROC analysis: the largest `class_scores` entry among
    `classes` (default all that can be flagged: not a shortlisted scan's yardstick), -inf
    when there is none."""
    per_class = class_scores(detection.classes, detection.threshold, warn_threshold,
                             isolation_threshold, warp_ratio, evidence_rule)
    return max((v for t, v in per_class.items()
                if (t in classes if classes is not None
                    else t not in detection.yardstick_classes)), default=-np.inf)
