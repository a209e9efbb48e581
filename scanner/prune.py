"""Stage 4: choose the channels to zero.

Channels are ranked by backdoor Shapley value penalised by their contribution to clean
behaviour (FINDINGS.md: pruning by backdoor value alone costs 1.5–2 accuracy points per
channel on small nets). Two orders:

* ``ranked`` — the paper's: zero channels in rank order until the reversed trigger's
  success on the stamped few-shot images falls below the target;
* ``greedy`` (default) — among the top Shapley candidates, each round zeroes the channel
  whose removal, *given the channels already zeroed*, lowers the backdoor utility most net
  of the clean cost it adds. Channels interact (the reason for Shapley values at all), so
  re-measuring after each removal finds smaller sets; when carriers back each other up and
  no single removal helps, the Shapley rank decides.

Both stop at the target, within the budget (share of channels, clean drop on the
few-shot images). When the target was reached on real clean images, a clean-up pass then
gives back every zeroed channel the plan turns out not to need: one whose return keeps the
target reached and lowers the clean cost. Later picks can make early ones redundant: on
resnet_blended it gave back 4 of 13 channels, 85.4 -> 86.8 % test accuracy at 0.0 % ASR.
It trades the backdoor's margin for clean behaviour, so it is only as good as the clean
cost it is judged by: on synthesised inputs (data-free scans) it gained resnet_blended 1.5
points but let the real trigger back on cnn_trojan (test ASR 0.4 -> 12.2 %), so data-free
scans skip it. When the target was missed nothing is given back either: on data-free
cnn_blended and cnn_sig a channel whose return did not lift the stamped images' target
probability (within 1e-3) still carried the real trigger (10.5 -> 12.8 %, 9.3 -> 10.8 %).

The target has two parts: the stamped images' attack success at most
`target_asr`, *and* their mean target probability at most `target_probability` above the
one clean images of the other classes get from the same pruned model (the trigger no
longer moves the output). Success alone stops as soon as the trigger just misses the
argmax on a few dozen rows, while the real trigger on unseen images still works: on
resnet_badnets the channel that made few-shot success 0 left 11.7% test ASR at 0.015 mean
target probability; two more channels (0.002) left 1.3%, for 0.1 point of accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .findings import FrontierPoint, PlanCheck
from .shapley import Evaluator, ShapleyResult, Utility, softmax


@dataclass(frozen=True)
class PruneConfig:
    target_asr: float = 0.05
    target_probability: float = 0.003
    max_channel_fraction: float = 0.02
    max_clean_drop: float = 0.10
    clean_penalty: float = 1.0  # β in score = φ − β · clean contribution
    candidates: int = 40
    order: str = "greedy"  # or "ranked"
    # give back zeroed channels the reached target does not need; the scan turns it off
    # when its clean images are synthesised (their clean cost is not worth the margin)
    give_back: bool = True


@dataclass
class PrunePlan:
    channels: list[int]  # flat channel indices, in the order they were zeroed
    scores: np.ndarray  # [n] the ranking score (φ − β·clean) of every channel
    clean: dict[int, float]  # clean contribution of each candidate
    asr_before: float
    asr_after: float
    backdoor_before: float  # mean target probability of the stamped images
    backdoor_after: float
    clean_acc_before: float
    clean_acc_after: float
    target_reached: bool
    coalitions: int
    # zeroed by the search, then switched back on by the give-back pass (in that order)
    given_back: list[int] = field(default_factory=list)
    # the search's walk: the plan before any zeroing, then after each channel it zeroed
    frontier: list[FrontierPoint] = field(default_factory=list)
    # mean target probability clean images of other classes get from the pruned model:
    # the stamped images' is compared with it (`target_probability`)
    clean_target_prob_after: float = 0.0


# the greedy search and give-back move len(chosen) // _STRIDE channels a round (at least
# one): one at a time below 2 x _STRIDE zeroed channels, so small nets are searched as before
_STRIDE = 16


def _step(zeroed: int, most: int) -> int:
    """Channels a round moves with `zeroed` channels zeroed, at most `most`."""
    return min(max(1, zeroed // _STRIDE), most)


@dataclass(frozen=True)
class _Measure:
    bd_prob: np.ndarray
    bd_asr: np.ndarray
    clean_cost: np.ndarray  # KL(original ‖ pruned) on the clean images
    clean_acc: np.ndarray
    clean_target_prob: np.ndarray  # mean target probability of clean other-class images


def _row(m: _Measure, j: int) -> _Measure:
    """Coalition j of a measure, as a measure of one."""
    return _Measure(*(a[j: j + 1] for a in (m.bd_prob, m.bd_asr, m.clean_cost, m.clean_acc,
                                            m.clean_target_prob)))


def _reached(m: _Measure, cfg: PruneConfig) -> np.ndarray:
    return ((m.bd_asr <= cfg.target_asr)
            & (m.bd_prob - m.clean_target_prob <= cfg.target_probability))


class _Clean:
    """Clean-behaviour cost of a coalition: KL divergence from the original model's outputs.

    With one image per class, accuracy barely moves when a useful channel is zeroed (the
    few-shot images are classified with confidence); the divergence of the output
    distribution does, and it needs no labels. On cnn_badnets its rank correlation with
    the test-set accuracy drop of single channels was 0.77, against 0.3 for few-shot
    accuracy or true-class probability.
    """

    def __init__(self, clean: Evaluator, labels: np.ndarray, target: int) -> None:
        self.evaluator = clean
        self.labels = labels
        self.others = labels != target
        self.target = target
        self.reference = softmax(clean.logits(np.ones((1, clean.n_channels), np.float32)))[0]

    def __call__(self, coalitions: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits = self.evaluator.logits(coalitions)
        p = self.reference[None]
        log_q = logits - logits.max(-1, keepdims=True)
        log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
        kl = (p * (np.log(p + 1e-12) - log_q)).sum(-1).mean(-1)
        acc = (logits.argmax(-1) == self.labels[None]).mean(-1)
        target_prob = np.exp(log_q[:, self.others, self.target]).mean(-1)
        return kl, acc, target_prob


def _measure(backdoor: Evaluator, clean: _Clean, utility: Utility,
             coalitions: np.ndarray) -> _Measure:
    bd_prob, bd_asr = utility(backdoor.logits(coalitions))
    kl, acc, target_prob = clean(coalitions)
    return _Measure(bd_prob, bd_asr, kl, acc, target_prob)


class _Ticker:
    """Progress of a plan in coalitions measured, against what it measures at most in its
    search (every greedy round up to the channel budget: a plan that reaches its target
    sooner finishes sooner) and typically in give-back."""

    def __init__(self, progress: Callable[[int, int], None] | None, pool: int, budget: int,
                 cfg: PruneConfig) -> None:
        most = min(budget, pool)
        searched, zeroed = 0, 0
        while cfg.order != "ranked" and zeroed < most:
            step = _step(zeroed, most - zeroed)
            searched += min(cfg.candidates, pool - zeroed) + (step > 1)
            zeroed += step
        if cfg.order == "ranked":
            searched = most
        # give-back: a round measures every zeroed channel, and most plans end after one
        # or two (each round's bound, most x 80 rounds, put "20 minutes left" on a plan
        # that took 3); a longer give-back waits at 100 %
        given = 2 * most if cfg.give_back else 0
        self.progress, self.total, self.done = progress, pool + searched + given + 1, 0

    def __call__(self, coalitions: int) -> None:
        self.done += coalitions
        if self.progress:
            self.progress(min(self.done, self.total), self.total)


def plan(backdoor: Evaluator, clean: Evaluator, clean_labels: np.ndarray, utility: Utility,
         shapley: ShapleyResult, cfg: PruneConfig = PruneConfig(),
         progress: Callable[[int, int], None] | None = None) -> PrunePlan:
    n = backdoor.n_channels
    budget = max(1, int(np.floor(cfg.max_channel_fraction * n)))
    cost = _Clean(clean, clean_labels, utility.target)
    pool = shapley.top(max(cfg.candidates, budget))
    pool = pool[shapley.values[pool] > 0]
    tick = _Ticker(progress, len(pool), budget, cfg)
    base = _measure(backdoor, cost, utility, np.ones((1, n), np.float32))
    # no channel with a positive value (e.g. the trigger works without any of them): none
    # to zero, and the plan says the target was not reached
    contrib = (_measure(backdoor, cost, utility, _without(np.ones(n, np.float32), pool))
               .clean_cost if len(pool) else np.zeros(0))
    scores = shapley.values.copy()
    scores[pool] -= cfg.clean_penalty * contrib
    tick(len(pool))
    search = _ranked if cfg.order == "ranked" else _greedy
    chosen, coalitions = search(backdoor, cost, utility, pool, scores, budget, base, cfg, tick)
    frontier = _frontier(backdoor, cost, utility, base, chosen)
    given_back: list[int] = []
    if cfg.give_back:
        chosen, given_back, measured = _give_back(backdoor, cost, utility, chosen, cfg, tick)
        coalitions += measured
    mask = np.ones((1, n), np.float32)
    mask[0, chosen] = 0.0
    after = _measure(backdoor, cost, utility, mask)
    tick(1)
    return PrunePlan(
        channels=[int(c) for c in chosen], scores=scores,
        clean={int(c): float(v) for c, v in zip(pool, contrib, strict=True)},
        asr_before=float(base.bd_asr[0]), asr_after=float(after.bd_asr[0]),
        backdoor_before=float(base.bd_prob[0]), backdoor_after=float(after.bd_prob[0]),
        clean_acc_before=float(base.clean_acc[0]), clean_acc_after=float(after.clean_acc[0]),
        target_reached=bool(_reached(after, cfg)[0]),
        coalitions=coalitions + len(pool) + len(frontier) + 1, frontier=frontier,
        given_back=[int(c) for c in given_back],
        clean_target_prob_after=float(after.clean_target_prob[0]))


def check(backdoor: Evaluator, clean: Evaluator, clean_labels: np.ndarray, utility: Utility,
          channels: list[int], cfg: PruneConfig = PruneConfig()) -> PlanCheck:
    """The stop rule of `plan` for `channels` zeroed: how a plan found on the original's
    weights stands on other weights of the same graph (the recovered ones)."""
    mask = np.ones((1, backdoor.n_channels), np.float32)
    mask[0, channels] = 0.0
    m = _measure(backdoor, _Clean(clean, clean_labels, utility.target), utility, mask)
    return PlanCheck(float(m.bd_asr[0]), float(m.bd_prob[0]), float(m.clean_acc[0]),
                     float(m.clean_target_prob[0]), bool(_reached(m, cfg)[0]))


def _frontier(backdoor: Evaluator, cost: _Clean, utility: Utility, base: _Measure,
              chosen: list[int]) -> list[FrontierPoint]:
    """The walk the search took, one batched run: the first j channels it zeroed, for
    every j (the greedy search measured exactly these coalitions on its way)."""
    rows = np.ones((len(chosen), backdoor.n_channels), np.float32)
    for j in range(len(chosen)):
        rows[j, chosen[: j + 1]] = 0.0
    walk = [base]
    if len(chosen):
        walk.append(_measure(backdoor, cost, utility, rows))
    return [FrontierPoint(int(j + first), float(m.bd_asr[j]), float(m.bd_prob[j]),
                          float(m.clean_cost[j]), float(m.clean_acc[j]))
            for first, m in enumerate(walk) for j in range(len(m.bd_asr))]


def _without(current: np.ndarray, channels: np.ndarray | list[int]) -> np.ndarray:
    """One coalition per channel: `current` with that channel also switched off."""
    rows = np.repeat(current[None], len(channels), axis=0)
    rows[np.arange(len(channels)), channels] = 0.0
    return rows


def _within_clean_budget(m: _Measure, base: _Measure, cfg: PruneConfig) -> np.ndarray:
    return base.clean_acc[0] - m.clean_acc <= cfg.max_clean_drop + 1e-9


def _ranked(backdoor: Evaluator, cost: _Clean, utility: Utility, pool: np.ndarray,
            scores: np.ndarray, budget: int, base: _Measure, cfg: PruneConfig,
            tick: Callable[[int], None] | None = None) -> tuple[list[int], int]:
    order = pool[np.argsort(-scores[pool], kind="stable")][:budget]
    if len(order) == 0:
        return [], 0
    rows = np.ones((len(order), backdoor.n_channels), np.float32)
    for j in range(len(order)):
        rows[j, order[: j + 1]] = 0.0
    m = _measure(backdoor, cost, utility, rows)
    if tick:
        tick(len(rows))
    ok = _within_clean_budget(m, base, cfg)
    reached = np.flatnonzero(_reached(m, cfg) & ok)
    if len(reached):
        return order[: reached[0] + 1].tolist(), len(rows)
    # target out of reach: the longest prefix that keeps clean behaviour
    within = np.flatnonzero(ok)
    return (order[: within[-1] + 1].tolist() if len(within) else []), len(rows)


def _greedy(backdoor: Evaluator, cost: _Clean, utility: Utility, pool: np.ndarray,
            scores: np.ndarray, budget: int, base: _Measure, cfg: PruneConfig,
            tick: Callable[[int], None] | None = None) -> tuple[list[int], int]:
    """Each round measures the `cfg.candidates` best-ranked channels not yet zeroed (the
    window), each switched off on top of those already zeroed, and zeroes the one whose
    removal helps most. Past `_STRIDE` channels a round zeroes len(chosen) // _STRIDE of
    the window's best at once (one more run checks them together), so a plan on a
    2,592-channel net at a 10 % budget takes dozens of rounds, not 259 of 259 runs."""
    chosen: list[int] = []
    current = np.ones(backdoor.n_channels, np.float32)
    cur_bd, cur_cost = float(base.bd_prob[0]), float(base.clean_cost[0])
    coalitions = 0
    remaining = sorted(pool.tolist(), key=lambda c: -scores[c])
    while remaining and len(chosen) < budget:
        window = remaining[: cfg.candidates]
        m = _measure(backdoor, cost, utility, _without(current, window))
        coalitions += len(window)
        if tick:
            tick(len(window))
        gain = (cur_bd - m.bd_prob) - cfg.clean_penalty * (m.clean_cost - cur_cost)
        gain[~_within_clean_budget(m, base, cfg)] = -np.inf
        best = int(np.argmax(gain))
        if not np.isfinite(gain[best]):
            break  # every channel in the window would break clean behaviour
        if gain[best] <= 1e-6:
            # No single channel lowers the backdoor: its carriers back each other up (an
            # OR). That is what Shapley values see and marginals do not: take the best
            # ranked candidate that keeps clean behaviour and let the next rounds tell.
            allowed = np.isfinite(gain) & (scores[window] > 0)
            if not allowed.any():
                break
            picks = [int(np.flatnonzero(allowed)[np.argmax(scores[window][allowed])])]
        else:
            step = _step(len(chosen), budget - len(chosen))
            helpful = np.flatnonzero(gain > 1e-6)
            picks = helpful[np.argsort(-gain[helpful], kind="stable")][:step].tolist()
        if len(picks) == 1:
            now = _row(m, picks[0])
        else:
            trial = current.copy()
            trial[[window[j] for j in picks]] = 0.0
            now = _measure(backdoor, cost, utility, trial[None])
            coalitions += 1
            if not _within_clean_budget(now, base, cfg)[0]:
                # together they break clean behaviour: the single best only
                picks = picks[:1]
                now = _row(m, picks[0])
        for channel in [window[j] for j in picks]:
            remaining.remove(channel)
            chosen.append(channel)
            current[channel] = 0.0
        cur_bd, cur_cost = float(now.bd_prob[0]), float(now.clean_cost[0])
        if _reached(now, cfg)[0]:
            break
    return chosen, coalitions


def _give_back(backdoor: Evaluator, cost: _Clean, utility: Utility, chosen: list[int],
               cfg: PruneConfig, tick: Callable[[int], None] | None = None
               ) -> tuple[list[int], list[int], int]:
    """Switch back on, one at a time, the zeroed channels a plan that reached its target
    does not need.

    Each round tries every zeroed channel back on. A channel qualifies if, without it, the
    target stays reached and the clean cost falls; of those the one with the lowest clean
    cost comes back; past `_STRIDE` zeroed channels, the len(chosen) // _STRIDE cheapest of
    them together when that keeps the target and lowers the cost. At most 2 x
    `cfg.candidates` rounds. Returns the channels still zeroed (in their order), those
    given back (in the order they came back) and the coalitions measured."""
    chosen, restored = list(chosen), []
    if not chosen:
        return chosen, restored, 0
    current = np.ones(backdoor.n_channels, np.float32)
    current[chosen] = 0.0
    now = _measure(backdoor, cost, utility, current[None])
    if not _reached(now, cfg)[0]:
        return chosen, restored, 1
    coalitions, cost_now = 1, float(now.clean_cost[0])
    for _ in range(2 * cfg.candidates):  # a large plan is not searched k times over
        if not chosen:
            break
        rows = np.repeat(current[None], len(chosen), axis=0)
        rows[np.arange(len(chosen)), chosen] = 1.0  # row j: chosen[j] back on
        m = _measure(backdoor, cost, utility, rows)
        coalitions += len(chosen)
        if tick:
            tick(len(chosen))
        ok = np.flatnonzero(_reached(m, cfg) & (m.clean_cost < cost_now))
        if not len(ok):
            break
        ok = ok[np.argsort(m.clean_cost[ok], kind="stable")]
        back, cost_now = [int(ok[0])], float(m.clean_cost[ok[0]])
        step = _step(len(chosen), len(ok))
        if step > 1:  # a large plan: the `step` cheapest back on together, if that holds
            trial = current.copy()
            trial[[chosen[j] for j in ok[:step]]] = 1.0
            joint = _measure(backdoor, cost, utility, trial[None])
            coalitions += 1
            if _reached(joint, cfg)[0] and joint.clean_cost[0] < cost_now:
                back, cost_now = ok[:step].tolist(), float(joint.clean_cost[0])
        for j in sorted(back, reverse=True):
            restored.append(chosen.pop(j))
            current[restored[-1]] = 1.0
    return chosen, restored, coalitions
