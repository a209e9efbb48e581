"""Sentences that findings use to say what a number was measured on and why it matters.

A reviewer reads SS201's success rate, the repair's before/after and SS302 side by side;
each is measured on other rows (the images a trigger was reversed on; those images with
shifted copies and the trigger at twice its strength), so each says which.
"""

from __future__ import annotations

from .findings import Repair
from .policy import RepairPolicy
from .reverse import ReversedTrigger


def images_word(synthesised: bool) -> str:
    return "synthesised inputs" if synthesised else "few-shot images"


def reversed_reach(trigger: ReversedTrigger, synthesised: bool) -> str:
    """`flips 100% of the 9 few-shot images of other classes it was reversed on`."""
    word = images_word(synthesised)
    of = (f"the {trigger.rows} {word} of other classes it was reversed on" if trigger.rows
          else f"the {word} of other classes it was reversed on")
    return f"flips {100 * trigger.asr:.0f}% of {of}"


def target_missed(repair: Repair, rp: RepairPolicy) -> str:
    """SS302 after a repair that zeroed channels but missed its target. The target has two
    parts (prune.py): few stamped rows still go to the class, *and* the trigger no longer
    lifts the class's probability above what clean images get. A repair can meet the first
    and miss the second: the reversed trigger no longer wins, but still moves the output,
    and the real trigger is stronger (on resnet_badnets a margin of 0.015 left 11.7 % of
    the test images flipped). That is why it is HIGH even at 0 %."""
    n, t = len(repair.pruned), repair.target
    share = repair.channel_budget or rp.max_channel_fraction
    budget = max(1, int(share * repair.channels_total))
    stop = (f"the policy's channel budget, {100 * share:g}% of the "
            "channels" if n >= budget else
            "no other candidate channel lowered it within the clean-accuracy budget")
    rows = (f"{repair.stamped_images * (1 + repair.stamped_copies)} stamped rows"
            if repair.stamped_images else "stamped rows")
    head = f"after zeroing {n} channels ({stop}) the reversed trigger "
    flips = _flips(repair, rp.target_asr)
    if flips is None:
        return (head + f"still sends {100 * repair.reversed_asr_after:.0f}% of the {rows} "
                f"({repair.images_word} of other classes) to class {t} (the target: at most "
                f"{100 * rp.target_asr:g}%): the backdoor is weakened, not removed")
    return (head + f"sends {flips} of the {rows} ({repair.images_word} of other classes) to "
            f"class {t}, but still lifts class {t}'s mean probability on them to "
            f"{repair.target_probability_after:.3f} against "
            f"{repair.clean_target_probability_after:.3f} on the clean {repair.images_word} "
            f"of other classes (the target: at most {rp.target_probability:g} above): a "
            "trigger that still moves the output may still work at full strength, and the "
            "real one is stronger than the reversed one")


def target_missed_reason(repair: Repair, target_asr: float) -> str:
    """SS302 in the one line of SS305's reasons: the success rate, or, when that met its
    target, the probability the trigger still lifts ("still works on 0%" read as a
    contradiction)."""
    rows = f"the stamped {repair.images_word}"
    flips = _flips(repair, target_asr)
    if flips is None:
        return (f"the reversed trigger still works on {100 * repair.reversed_asr_after:.0f}% "
                f"of {rows} (SS302)")
    return (f"the reversed trigger sends {flips} of {rows} to class {repair.target} but "
            f"still lifts its mean probability on them to "
            f"{repair.target_probability_after:.3f} (clean images of other classes: "
            f"{repair.clean_target_probability_after:.3f}) (SS302)")


def _flips(repair: Repair, target_asr: float) -> str | None:
    """Which half of the plan's target a repair missed: None when the stamped rows' success
    is still above `target_asr` (or the probabilities are unknown); else how many rows
    still flip ("none", "only 3%"), the probability half being what was missed."""
    prob, clean = repair.target_probability_after, repair.clean_target_probability_after
    if repair.reversed_asr_after > target_asr or prob is None or clean is None:
        return None
    return ("none" if repair.reversed_asr_after == 0
            else f"only {100 * repair.reversed_asr_after:.0f}%")
