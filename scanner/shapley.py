"""Stage 3: Monte Carlo permutation estimates of each channel's Shapley value for the backdoor.

Players are activation channels; v(S) is the backdoor utility when only the channels in S
are on — the mean target-class probability of the reversed trigger over the stamped
few-shot images (smooth; the attack success rate is reported alongside). A permutation
starts with every channel on and switches them off in order; channel i's marginal is
v(before) − v(after). Two speed-ups from the paper:

* discarding threshold: once v < truncation · v(all), the backdoor is gone in this
  permutation and the remaining marginals are taken as 0 (not evaluated);
* ε-greedy: with probability 1 − ε a permutation starts with the current top-k channels
  (in random order), so the threshold trips early and samples focus on the contenders.

Many permutations advance together: every batched evaluator call carries `chunk` steps of
`parallel` permutations, each row its own coalition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    n_channels: int
    forward_passes: int

    def logits(self, coalitions: np.ndarray) -> np.ndarray: ...  # [M, n] -> [M, K, classes]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@dataclass(frozen=True)
class Utility:
    """Target probability (smooth) of the stamped images, and the attack success rate."""

    target: int

    def __call__(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prob = softmax(logits)[..., self.target].mean(-1)
        asr = (logits.argmax(-1) == self.target).mean(-1)
        return prob, asr


@dataclass(frozen=True)
class ShapleyConfig:
    permutations: int = 40
    epsilon: float = 0.2  # share of fully random permutations (1.0 = plain truncated MC)
    top_k: int = 20
    truncation: float = 0.1  # discard once v < truncation · v(all)
    parallel: int = 8  # permutations advanced together
    chunk: int = 8  # permutation steps per evaluator call
    stable_rounds: int = 0  # > 0: stop early once the top-k set is unchanged this many rounds
    max_depth: int | None = None  # truncate every permutation after this many channels
    # image-pass budget: no new round of permutations once the next one (at the mean cost
    # of the rounds so far) would go past it
    max_passes: int | None = None


@dataclass
class ShapleyResult:
    values: np.ndarray  # [n_channels] backdoor Shapley estimate
    counts: np.ndarray  # how many permutations evaluated each channel's marginal
    permutations: int
    forward_passes: int  # image evaluations
    coalitions: int
    v_all: float
    v_empty_estimate: float
    mean_depth: float  # channels switched off before the threshold tripped
    seconds: float
    estimator: str
    history: list[list[int]] = field(default_factory=list)  # top-k after each round

    def top(self, k: int) -> np.ndarray:
        return np.argsort(-self.values, kind="stable")[:k]


def estimate(evaluator: Evaluator, utility: Utility, cfg: ShapleyConfig = ShapleyConfig(),
             seed: int = 0, players: np.ndarray | None = None,
             progress: Callable[[int, int], None] | None = None) -> ShapleyResult:
    """Truncated Monte Carlo Shapley with the discarding threshold and ε-greedy starts."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = evaluator.n_channels
    players = np.arange(n) if players is None else np.asarray(players)
    passes0 = evaluator.forward_passes
    full = np.ones((1, n), np.float32)
    v_all = float(utility(evaluator.logits(full))[0][0])
    threshold = cfg.truncation * v_all
    total = np.zeros(n)
    counts = np.zeros(n, np.int64)
    depths: list[int] = []
    coalitions = 1
    history: list[list[int]] = []
    v_empty: list[float] = []
    done = 0
    stable = 0
    estimator = "truncated-mc" if cfg.epsilon >= 1.0 else "eps-greedy"
    max_depth = min(cfg.max_depth or len(players), len(players))
    while done < cfg.permutations:
        batch = min(cfg.parallel, cfg.permutations - done)
        orders = [_order(players, total / max(1, done), cfg, rng) for _ in range(batch)]
        state = np.ones((batch, n), np.float32)
        prev = np.full(batch, v_all)
        pos = np.zeros(batch, int)
        alive = np.ones(batch, bool)
        while alive.any():
            rows, owners, channels = [], [], []
            for b in np.flatnonzero(alive):
                mask = state[b].copy()
                for step in range(cfg.chunk):
                    if pos[b] + step >= max_depth:
                        break
                    ch = orders[b][pos[b] + step]
                    mask[ch] = 0.0
                    rows.append(mask.copy())
                    owners.append(b)
                    channels.append(ch)
            if not rows:
                break
            values, _ = utility(evaluator.logits(np.stack(rows)))
            coalitions += len(rows)
            for r, (b, ch) in enumerate(zip(owners, channels, strict=True)):
                if not alive[b]:
                    continue  # tripped earlier in this chunk: the rest of its rows are discarded
                total[ch] += prev[b] - values[r]
                counts[ch] += 1
                prev[b] = values[r]
                state[b, ch] = 0.0
                pos[b] += 1
                if values[r] < threshold or pos[b] >= max_depth:
                    alive[b] = False
                    depths.append(int(pos[b]))
                    if pos[b] >= len(players):
                        v_empty.append(float(values[r]))
            if progress:  # permutations finished so far: a slow round still moves the bar
                progress(done + batch - int(alive.sum()), cfg.permutations)
        done += batch
        top = np.argsort(-total, kind="stable")[: cfg.top_k].tolist()
        stable = stable + 1 if history and set(top) == set(history[-1]) else 0
        history.append(top)
        if progress:
            progress(done, cfg.permutations)
        if cfg.stable_rounds and stable >= cfg.stable_rounds:
            log.debug("top-%d stable for %d rounds after %d permutations", cfg.top_k, stable, done)
            break
        spent = evaluator.forward_passes - passes0
        if cfg.max_passes is not None and spent * (len(history) + 1) / len(history) \
                > cfg.max_passes:
            log.debug("pass budget %d spent after %d permutations", cfg.max_passes, done)
            break
    return ShapleyResult(
        values=total / max(1, done), counts=counts, permutations=done,
        forward_passes=evaluator.forward_passes - passes0, coalitions=coalitions, v_all=v_all,
        v_empty_estimate=float(np.mean(v_empty)) if v_empty else float("nan"),
        mean_depth=float(np.mean(depths)) if depths else 0.0,
        seconds=time.perf_counter() - start, estimator=estimator, history=history)


def _order(players: np.ndarray, estimate_now: np.ndarray, cfg: ShapleyConfig,
           rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(players)
    if cfg.epsilon >= 1.0 or rng.random() < cfg.epsilon or not estimate_now.any():
        return order
    ranked = players[np.argsort(-estimate_now[players], kind="stable")]
    head = rng.permutation(ranked[: cfg.top_k])
    rest = order[~np.isin(order, head)]
    return np.concatenate([head, rest])


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return len(set(a[:k].tolist()) & set(b[:k].tolist())) / k
