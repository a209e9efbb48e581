"""Stage 2: is the model backdoored, and towards which class?

A backdoor target needs a far smaller reversed trigger than any honest class. For each
trigger family the norms l_t of all classes give an anomaly index
a_t = (median(u) − u_t) / (1.4826 · MAD(u)) with u = log l; a class is flagged when its
index in either family exceeds the policy threshold.

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


def anomaly_indices(norms: np.ndarray, log: bool = True) -> np.ndarray:
    """Low-side anomaly index of every entry; 0 where the spread is degenerate."""
    norms = np.asarray(norms, np.float64)
    if log:
        norms = np.log(np.maximum(norms, 1e-12))
    median = np.median(norms)
    mad = MAD_TO_SIGMA * np.median(np.abs(norms - median))
    if mad <= 1e-12:
        return np.zeros_like(norms)
    return (median - norms) / mad


@dataclass
class Verdict:
    detection: Detection
    triggers: dict[int, ReversedTrigger]  # flagged target -> the trigger that flagged it
    suspicious: list[int]  # above the warn level but below the threshold


def detect(result: ReverseResult, threshold: float, warn_threshold: float,
           data_free: bool = False, bn_layers: int = 0) -> Verdict:
    n = result.classes
    families = sorted({fam for fam, _ in result.triggers})
    index: dict[str, np.ndarray] = {}
    norms: dict[str, np.ndarray] = {}
    for fam in families:
        norms[fam] = np.array([result.triggers[(fam, t)].norm for t in range(n)])
        index[fam] = anomaly_indices(norms[fam])
    classes, flagged, suspicious, chosen = [], [], [], {}
    for t in range(n):
        best_fam = max(families, key=lambda f: index[f][t])
        score = float(index[best_fam][t])
        is_flagged = score > threshold
        patch = result.triggers.get(("patch", t))
        universal = result.triggers.get(("universal", t))
        classes.append(ClassReverse(
            target=t,
            mask_l1=float(patch.norm) if patch else float("nan"),
            anomaly_index=float(index["patch"][t]) if "patch" in index else float("nan"),
            reversed_asr=float(result.triggers[(best_fam, t)].asr),
            universal_norm=float(universal.norm) if universal else None,
            universal_anomaly_index=float(index["universal"][t]) if universal else None,
            flagged=is_flagged,
        ))
        if is_flagged:
            flagged.append(t)
            chosen[t] = result.triggers[(best_fam, t)]
        elif score > warn_threshold:
            suspicious.append(t)
    # strongest first: the Shapley stage repairs towards flagged[0] first
    flagged.sort(key=lambda t: -max(index[f][t] for f in families))
    detection = Detection(classes=classes, flagged_targets=flagged, threshold=threshold,
                          data_free=data_free, bn_layers_matched=bn_layers,
                          forward_passes=result.forward_passes)
    return Verdict(detection, chosen, suspicious)


def score(detection: Detection) -> float:
    """One number per model for ROC analysis: the largest anomaly index over classes."""
    values = [c.anomaly_index for c in detection.classes]
    values += [c.universal_anomaly_index for c in detection.classes
               if c.universal_anomaly_index is not None]
    return float(np.nanmax(values))
