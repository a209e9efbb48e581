"""The estimators on games whose Shapley values are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from scanner.shapley import ShapleyConfig, Utility, estimate, topk_overlap


class AndGame:
    """The backdoor works (target logit high) only while all `carriers` are on.

    Shapley value of each carrier = v(all) − v(none) split evenly; every other channel: 0.
    Evaluates K identical 'images' per coalition, like the real evaluator's [M, K, classes].
    """

    def __init__(self, n: int, carriers: list[int], images: int = 3) -> None:
        self.n_channels = n
        self.carriers = carriers
        self.images = images
        self.forward_passes = 0

    def logits(self, coalitions: np.ndarray) -> np.ndarray:
        on = coalitions[:, self.carriers].min(axis=1)  # 1 only when every carrier is on
        out = np.zeros((len(coalitions), self.images, 2))
        out[:, :, 1] = 10.0 * on[:, None] - 5.0
        self.forward_passes += len(coalitions) * self.images
        return out


@pytest.mark.parametrize("epsilon", [1.0, 0.2])
def test_and_game_values(epsilon):
    game = AndGame(60, [7, 42])
    cfg = ShapleyConfig(permutations=40, epsilon=epsilon, top_k=5, truncation=0.1)
    res = estimate(game, Utility(1), cfg, seed=0)
    gap = res.v_all - (1 / (1 + np.exp(5.0)))
    # exact: the first carrier switched off takes the whole drop; each carrier half the time
    assert set(res.top(2).tolist()) == {7, 42}
    assert res.values[[7, 42]].sum() == pytest.approx(gap, rel=1e-6)
    others = np.delete(res.values, [7, 42])
    assert np.abs(others).max() < 1e-9


def test_discarding_threshold_and_eps_greedy_cut_forward_passes():
    game = AndGame(200, [3, 150, 199])
    plain = estimate(game, Utility(1), ShapleyConfig(permutations=24, epsilon=1.0,
                                                    truncation=0.0), seed=1)
    game.forward_passes = 0
    fast = estimate(game, Utility(1), ShapleyConfig(permutations=24, epsilon=0.2,
                                                   truncation=0.1, top_k=5), seed=1)
    assert fast.forward_passes * 3 <= plain.forward_passes
    assert topk_overlap(plain.top(3), fast.top(3), 3) == 1.0


def test_stable_topk_stops_early():
    game = AndGame(50, [1, 2])
    res = estimate(game, Utility(1), ShapleyConfig(permutations=200, epsilon=0.2, top_k=2,
                                                  parallel=4, stable_rounds=3), seed=0)
    assert res.permutations < 200


def test_pass_budget_is_not_overrun_by_the_next_round():
    game = AndGame(50, [1, 2])
    full = estimate(game, Utility(1), ShapleyConfig(permutations=40, epsilon=1.0,
                                                   truncation=0.0, parallel=4), seed=0)
    per_round = 4 * 50 * game.images  # 4 full-length permutations of 50 channels
    assert full.forward_passes == game.images + 10 * per_round  # v(all), then 10 rounds
    game.forward_passes = 0
    capped = estimate(game, Utility(1), ShapleyConfig(permutations=40, epsilon=1.0,
                                                     truncation=0.0, parallel=4,
                                                     max_passes=3 * per_round + 100),
                       seed=0)
    assert capped.permutations == 12  # a 4th round would spend 4 * per_round
    assert capped.forward_passes == game.images + 3 * per_round


def test_progress_counts_finished_permutations_up_to_the_budget():
    calls: list[tuple[int, int]] = []
    game = AndGame(60, [7, 42])
    estimate(game, Utility(1), ShapleyConfig(permutations=20, parallel=8), seed=0,
             progress=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert {t for _, t in calls} == {20}
    assert done == sorted(done) and done[-1] == 20
    # within a round of 8 the bar moves as permutations finish, not only at its end
    assert len(set(done)) > 3
