"""Baseline repairs for side-by-side comparison with Shapley pruning: CLP and Fine-Pruning.

Both return the same `Repair` the Shapley stage does, so the scan pipeline writes their
sanitized models and reports them the same way. Baselines know no target class and use no
reversed trigger: `target` is -1 and `reversed_asr_before/after` are 0.0 (not defined for
them); the attack success of the true trigger is measured by `benchmarks/zoo.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data import ImageSet, Preprocess
from ..errors import DataError, Inconclusive
from ..findings import ChannelValue, LayerInfo, Repair
from ..graph.load import LoadedModel
from ..graph.prefix import CoalitionEvaluator
from ..policy import Policy
from ..runtime import Device
from .clp import LayerLipschitz, channel_lipschitz, layer_lipschitz
from .fine_pruning import FinePruningConfig, FinePruningResult, fine_prune

__all__ = ["BaselineConfig", "FinePruningConfig", "FinePruningResult", "LayerLipschitz",
           "METHODS", "channel_lipschitz", "clp_repair", "fine_pruning_repair", "fine_prune",
           "layer_lipschitz", "run_baseline"]

METHODS = ("clp", "fp")
TOP_CHANNELS = 20


@dataclass(frozen=True)
class BaselineConfig:
    clp_u: float = 3.0  # CLP prunes UCLC > mean + u·std within a layer (the paper's default)
    fp_max_fraction: float = 0.8  # Fine-Pruning prunes at most this share of its layer
    fp_shifts: int = 8  # shifted copies of each few-shot image for Fine-Pruning


def run_baseline(method: str, model: LoadedModel, layers: list[LayerInfo], prep: Preprocess,
                 images: ImageSet | None, policy: Policy, device: Device,
                 config: BaselineConfig = BaselineConfig()) -> Repair:
    """Repair with a baseline: "clp" (data-free; `images` only to report accuracy) or "fp"."""
    if method == "clp":
        return clp_repair(model, layers, prep, images, device, config.clp_u)
    if method == "fp":
        if images is None:
            raise DataError("fine-pruning needs clean images (--data)")
        cfg = FinePruningConfig(policy.repair.max_clean_drop, config.fp_max_fraction,
                                config.fp_shifts)
        return fine_pruning_repair(model, layers, prep, images, device, cfg)
    raise ValueError(f"unknown baseline {method!r} (known: {', '.join(METHODS)})")


def _fewshot_acc(model: LoadedModel, layers: list[LayerInfo], prep: Preprocess,
                 images: ImageSet, pruned: list[ChannelValue], device: Device
                 ) -> tuple[float, float, int]:
    """Few-shot accuracy with every channel on and with `pruned` zeroed, and image passes."""
    touched = {c.layer for c in pruned}
    scope = [layer for layer in layers if layer.name in touched] or layers[:1]
    evaluator = CoalitionEvaluator(model.runnable, scope, prep.to_model(images.pixels), device)
    rows = np.ones((2, evaluator.n_channels), np.float32)
    for c in pruned:
        rows[1, evaluator.flat_index(c.layer, c.channel)] = 0.0
    acc = (evaluator.logits(rows).argmax(-1) == images.labels[None]).mean(-1)
    return float(acc[0]), float(acc[1]), evaluator.forward_passes


def clp_repair(model: LoadedModel, layers: list[LayerInfo], prep: Preprocess,
               images: ImageSet | None, device: Device, u: float = 3.0) -> Repair:
    scored = layer_lipschitz(model.analysed, layers, u)
    if not scored:
        raise Inconclusive("CLP found no Conv-fed activation layer to prune", rule_id="SS204")
    values = []
    for s in scored:
        flagged = set(s.pruned.tolist())
        values += [ChannelValue(s.layer.name, c, float(s.uclc[c]), 0.0, c in flagged)
                   for c in range(s.layer.channels)]
    pruned = [v for v in values if v.pruned]
    top = sorted(values, key=lambda v: -v.shapley)[:TOP_CHANNELS]
    before = after = 0.0
    passes = 0
    if images is not None:
        before, after, passes = _fewshot_acc(model, layers, prep, images, pruned, device)
    return Repair(target=-1, channels_total=sum(layer.channels for layer in layers),
                  pruned=pruned, top_channels=top, reversed_asr_before=0.0,
                  reversed_asr_after=0.0, fewshot_acc_before=before, fewshot_acc_after=after,
                  permutations=0, forward_passes=passes, estimator="clp")


def fine_pruning_repair(model: LoadedModel, layers: list[LayerInfo], prep: Preprocess,
                        images: ImageSet, device: Device,
                        cfg: FinePruningConfig | None = None) -> Repair:
    result = fine_prune(model.runnable, layers, prep, images, device, cfg or FinePruningConfig())
    if result is None:
        raise Inconclusive("fine-pruning found no convolutional activation layer",
                           rule_id="SS204")
    name = result.layer.name
    pruned = [ChannelValue(name, int(c), float(result.mean_activation[c]), 0.0, True)
              for c in result.pruned]
    # report the most dormant channels: the ones Fine-Pruning suspects first
    top = [ChannelValue(name, int(c), float(result.mean_activation[c]), 0.0,
                        bool(i < len(result.pruned)))
           for i, c in enumerate(result.order[:TOP_CHANNELS])]
    return Repair(target=-1, channels_total=sum(layer.channels for layer in layers),
                  pruned=pruned, top_channels=top, reversed_asr_before=0.0,
                  reversed_asr_after=0.0, fewshot_acc_before=result.fewshot_acc_before,
                  fewshot_acc_after=result.fewshot_acc_after, permutations=0,
                  forward_passes=result.forward_passes, estimator="fine-pruning")
