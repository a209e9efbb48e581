"""Stage 2: is the model backdoored, and towards which class?

A backdoor target needs a far smaller reversed trigger than any honest class. For each
trigger family the norms l_t of all classes give an anomaly index
a_t = (median(u) − u_t) / (1.4826 · MAD(u)) with u = log l; a class is flagged when the
mean of its two families' indices exceeds the policy threshold.

Why the logarithm: trigger norms are scale quantities (a mask of 5 pixels against honest
classes between 17 and 58 on cnn_badnets). On the raw scale the large honest norms inflate
the MAD and the true target scored 1.8; on the log scale it scores 4.6, while honest
classes keep their spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .findings import ClassReverse, Detection
from .reverse import ReversedTrigger, ReverseResult

MAD_TO_SIGMA = 1.4826


def _robust(norms: np.ndarray, log: bool = True) -> tuple[np.ndarray, float, float]:
    """(values, median, 1.4826 · MAD), on the log scale unless `log` is False."""
    u = np.asarray(norms, np.float64)
    if log:
        u = np.log(np.maximum(u, 1e-12))
    median = float(np.median(u))
    return u, median, MAD_TO_SIGMA * float(np.median(np.abs(u - median)))


def anomaly_indices(norms: np.ndarray, log: bool = True) -> np.ndarray:
    """Low-side anomaly index of every entry; 0 where the spread is degenerate."""
    u, median, mad = _robust(norms, log)
    if mad <= 1e-12:
        return np.zeros_like(u)
    return (median - u) / mad


@dataclass
class Verdict:
    detection: Detection
    triggers: dict[int, ReversedTrigger]  # flagged target -> the trigger that flagged it
    suspicious: list[int]  # above the warn level but below the threshold


def isolation(norms: np.ndarray) -> np.ndarray:
    """How far the smallest norm stands from the second smallest, in robust standard
    deviations of the log norms; 0 for every other class."""
    u, _, mad = _robust(norms)
    out = np.zeros_like(u)
    if len(u) > 1 and mad > 1e-12:
        first, second = np.argsort(u, kind="stable")[:2]
        out[first] = (u[second] - u[first]) / mad
    return out


def detect(result: ReverseResult, threshold: float, warn_threshold: float,
           isolation_threshold: float = 1.0, data_free: bool = False,
           bn_layers: int = 0) -> Verdict:
    """Flag a class when its combined anomaly index exceeds `threshold`, or when its patch
    trigger is both anomalous (above `warn_threshold`) and isolated (≥ `isolation_threshold`).

    The combined index is the mean of the families' indices. Either family alone has
    honest outliers on Fashion-MNIST (a patch turns anything into a bag; shirts are close to
    every top), while a full-image backdoor target is small in both. Honest easy classes
    come in groups (shirt, T-shirt, pullover, coat), a patch backdoor's target stands alone:
    resnet_badnets' mask is 2.9 pixels against 16.5 for the next class. See the zoo
    calibration in README.
    """
    n = result.classes
    families = sorted({fam for fam, _ in result.triggers})
    norms = {fam: np.array([result.triggers[(fam, t)].norm for t in range(n)])
             for fam in families}
    index = {fam: anomaly_indices(norms[fam]) for fam in families}
    combined = np.mean([index[f] for f in families], axis=0)
    alone = isolation(norms["patch"]) if "patch" in norms else np.zeros(n)
    classes, flagged, suspicious, chosen = [], [], [], {}
    for t in range(n):
        by_patch = "patch" in index and bool(
            index["patch"][t] > warn_threshold and alone[t] >= isolation_threshold)
        # the family that stands out most supplies the trigger for the Shapley stage
        best_fam = "patch" if by_patch else max(families, key=lambda f: index[f][t])
        patch = result.triggers.get(("patch", t))
        universal = result.triggers.get(("universal", t))
        is_flagged = bool(combined[t] > threshold) or by_patch
        classes.append(ClassReverse(
            target=t,
            mask_l1=float(patch.norm) if patch else float("nan"),
            anomaly_index=float(combined[t]),
            reversed_asr=float(result.triggers[(best_fam, t)].asr),
            universal_norm=float(universal.norm) if universal else None,
            universal_anomaly_index=float(index["universal"][t]) if universal else None,
            patch_anomaly_index=float(index["patch"][t]) if patch else None,
            patch_isolation=float(alone[t]) if patch else None,
            flagged=is_flagged,
        ))
        if is_flagged:
            flagged.append(t)
            chosen[t] = result.triggers[(best_fam, t)]
        elif combined[t] > warn_threshold:
            suspicious.append(t)
    flagged.sort(key=lambda t: -max(combined[t], alone[t]))  # strongest first: repaired first
    detection = Detection(classes=classes, flagged_targets=flagged, threshold=threshold,
                          data_free=data_free, bn_layers_matched=bn_layers,
                          forward_passes=result.forward_passes)
    return Verdict(detection, chosen, suspicious)


def score(detection: Detection) -> float:
    """One number per model for ROC analysis: the largest anomaly index over classes."""
    return float(np.nanmax([c.anomaly_index for c in detection.classes]))
