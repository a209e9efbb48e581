"""Fine-tuning alone: the baseline that shows what zeroing buys beside the recovery stage.

The classic fine-tuning defence on the scan's own inputs: the model's parameters are
trained in onnxruntime (scanner/recover.py) on the clean images with their labels, with
the augmentations, steps and learning rate of `[repair.recover]`; nothing is zeroed and no
trigger is unlearnt (a baseline detects nothing). Distillation from the original alone
would not move the weights (the student starts as the teacher), so the labels carry the
loss: `LABEL_WEIGHT` of each row's target, the original's softened prediction the rest.
"""

from __future__ import annotations

from ..api import Predictor
from ..data import ImageSet, Preprocess
from ..errors import Inconclusive
from ..findings import LayerInfo, Repair
from ..graph.load import LoadedModel
from ..policy import Policy
from ..recover import REFUSED_RULE, RecoverConfig, Recovered, describe, recover, untrainable
from ..runtime import Device

LABEL_WEIGHT = 1.0


def finetune_repair(model: LoadedModel, layers: list[LayerInfo], prep: Preprocess,
                    images: ImageSet, policy: Policy, device: Device, seed: int = 0
                    ) -> tuple[Repair, Recovered]:
    """Fine-tune the whole model on `images`; the Repair that reports it (no channel
    zeroed) and the trained initializers the export writes into the model."""
    why = untrainable(model)
    if why:
        raise Inconclusive(f"fine-tuning refused: {why}", rule_id=REFUSED_RULE)
    rc = policy.repair.recover
    cfg = RecoverConfig(steps=rc.steps, lr=rc.lr, ops=tuple(rc.parameters),
                        temperature=rc.temperature, unlearn_weight=0.0,
                        label_weight=LABEL_WEIGHT, flip=rc.flip, seed=seed)
    res = recover(model.runnable, model.runnable, prep, images, [], cfg, device=device)
    before, after = (float((Predictor(model, prep, device.requested, graph)(images.pixels)
                            .argmax(-1) == images.labels).mean())
                     for graph in (model.runnable, res.model))
    repair = Repair(target=-1, channels_total=sum(layer.channels for layer in layers),
                    pruned=[], top_channels=[], reversed_asr_before=0.0,
                    reversed_asr_after=0.0, fewshot_acc_before=before,
                    fewshot_acc_after=after, permutations=0, forward_passes=2 * len(images),
                    estimator="fine-tuning")
    repair.recovery_note = (f"fine-tuned: {res.steps} steps on {res.parameters} parameters "
                            f"with the images' labels, {res.seconds:.0f} s")
    return repair, Recovered(res.values, describe(cfg))

