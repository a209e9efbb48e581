"""The first-order narrowing of the Shapley players (repair.narrow_players)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from conftest import FEWSHOT, zoo_entries, zoo_model

from scanner import api
from scanner.attacks import Attack
from scanner.context import ScanOptions
from scanner.data import load_images
from scanner.findings import ScanResult
from scanner.graph.mask import MaskedModel
from scanner.policy import load_catalog, load_policy
from scanner.progress import Progress
from scanner.repair import narrow_players
from scanner.shapley import softmax


def _context(max_players: int) -> api.ScanContext:
    opts = ScanOptions(data=FEWSHOT, quiet=True)
    result = ScanResult(str(zoo_model("cnn_badnets")))
    ctx = api._load(result, zoo_model("cnn_badnets"), opts, load_policy("default"),
                    load_catalog(), Progress(enabled=False))
    ctx.policy = replace(ctx.policy, shapley=replace(ctx.policy.shapley,
                                                     max_players=max_players))
    return ctx


def test_the_narrowed_players_hold_the_channels_whose_removal_stops_the_trigger_most():
    """cnn_badnets (416 channels), its real trigger on the few-shot images of other classes:
    the 10 channels whose removal alone lowers the target probability most, measured by
    zeroing each one, are all among the 64 the first-order ranking keeps."""
    entry = next(e for e in zoo_entries() if e["name"] == "cnn_badnets")
    ctx = _context(64)
    images = load_images(FEWSHOT, ctx.prep)
    others = images.pixels[images.labels != entry["target"]]
    stamped = Attack(entry["attack"], entry["params"]).apply(others)
    players = narrow_players(ctx, stamped, entry["target"])
    assert players is not None and len(players) == 64 and len(set(players.tolist())) == 64

    masked = MaskedModel(ctx.model.runnable, ctx.layers)
    x = ctx.prep.to_model(stamped)
    n = sum(layer.channels for layer in ctx.layers)
    drops = np.empty(n)
    base = softmax(masked.run_ones(x))[:, entry["target"]].mean()
    for ch in range(n):
        coalition = np.ones((len(x), n), np.float32)
        coalition[:, ch] = 0.0
        drops[ch] = base - softmax(masked.run_flat(x, coalition))[:, entry["target"]].mean()
    assert set(np.argsort(-drops)[:10].tolist()) <= set(players.tolist())


def test_no_narrowing_at_or_below_the_limit_or_when_switched_off():
    ctx = _context(416)  # exactly the channel count
    stamped = load_images(FEWSHOT, ctx.prep).pixels[:4]
    assert narrow_players(ctx, stamped, 0) is None
    assert narrow_players(_context(0), stamped, 0) is None
