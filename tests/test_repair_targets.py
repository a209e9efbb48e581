"""A scan that flags several classes repairs the most anomalous one and tests the others'
reversed triggers on the repaired model (SS304), on a real zoo model and real triggers."""

from __future__ import annotations

import numpy as np
from conftest import FEWSHOT, zoo_model

from scanner import api
from scanner.data import load_images
from scanner.findings import Repair, ScanResult
from scanner.graph.activations import discover_activations
from scanner.graph.load import load_model
from scanner.graph.prefix import CoalitionEvaluator
from scanner.policy import load_catalog, load_policy
from scanner.reverse import ReversedTrigger
from scanner.runtime import resolve_device


def test_a_flagged_class_whose_trigger_survives_the_repair_gets_ss304():
    model = load_model(zoo_model("cnn_badnets"))  # true backdoor: 3x3 white patch -> 0
    prep = api.model_preprocess(model)
    images = load_images(FEWSHOT, prep)
    evaluator = CoalitionEvaluator(model.proto, discover_activations(model.proto),
                                   prep.to_model(images.pixels), resolve_device("cpu"))
    h, w = images.pixels.shape[2:]
    patch = np.zeros((h, w), np.float32)
    patch[h - 4:h - 1, w - 4:w - 1] = 1.0
    white = np.ones(images.pixels.shape[1:], np.float32)
    triggers = {0: ReversedTrigger("patch", 0, white, patch, 9.0, 1.0),
                5: ReversedTrigger("patch", 5, white, np.zeros((h, w), np.float32), 0.0, 0.0)}
    result = ScanResult(str(zoo_model("cnn_badnets")))
    result.repair = Repair(target=3, channels_total=evaluator.n_channels, pruned=[],
                           top_channels=[], reversed_asr_before=1.0, reversed_asr_after=0.0,
                           fewshot_acc_before=1.0, fewshot_acc_after=1.0, permutations=0,
                           forward_passes=0, estimator="eps-greedy")
    # a "repair" of one channel that has nothing to do with the BadNets patch
    api._check_other_targets(result, evaluator, prep, images, [0], 3, triggers,
                             api.ScanOptions(), load_catalog(), load_policy("default").repair)
    [finding] = result.findings  # class 5's trigger (an empty mask) flips nothing
    assert finding.rule_id == "SS304" and finding.location == "class 0"
    assert finding.details["reversed_asr_after"] > 0.9  # 1.00 measured
    assert "few-shot images" in finding.message and "planned for class 3" in finding.message
    assert result.repair.forward_passes == 2 * 2 * 5 * 9  # 2 coalitions x 45 rows x 2 classes
