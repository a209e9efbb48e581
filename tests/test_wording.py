"""The sentences that say what a figure was measured on (SS201, SS302)."""

from __future__ import annotations

import numpy as np
from report_fixtures import isolation_flagged_result

from scanner.policy import RepairPolicy
from scanner.reverse import ReversedTrigger
from scanner.wording import reversed_reach, target_missed


def test_a_repair_that_missed_only_the_probability_part_says_why_that_is_high() -> None:
    rep = isolation_flagged_result().repair
    rep.reversed_asr_after = 0.0
    rep.target_probability_after, rep.clean_target_probability_after = 0.026, 0.004
    text = target_missed(rep, RepairPolicy())
    # the old text ("still works on 0% ... at mean target probability 0.026") read as a
    # contradiction: 0 % flipped is why the probability part is named and compared
    assert "sends none of the 45 stamped rows (few-shot images of other classes) to class 0" \
        in text
    assert "still lifts class 0's mean probability on them to 0.026 against 0.004 on the " \
        "clean few-shot images of other classes (the target: at most 0.003 above)" in text
    assert "the real one is stronger" in text and "still works on 0%" not in text


def test_a_repair_that_still_flips_images_says_how_many_and_why_it_stopped() -> None:
    rep = isolation_flagged_result().repair
    rep.reversed_asr_after = 0.11
    rp = RepairPolicy()
    assert len(rep.pruned) < rp.max_channel_fraction * rep.channels_total
    text = target_missed(rep, rp)
    assert text.startswith("after zeroing 4 channels (no other candidate channel lowered it "
                           "within the clean-accuracy budget) the reversed trigger still "
                           "sends 11% of the 45 stamped rows")
    rep.channels_total = 200  # 4 of 200 is the 2 % budget
    assert "(the policy's channel budget, 2% of the channels)" in target_missed(rep, rp)
    rep.channel_budget, rep.channels_total = 0.1, 40  # a plan recovery followed: its budget
    assert "(the policy's channel budget, 10% of the channels)" in target_missed(rep, rp)
    rep.channels_total = 200
    rep.inputs = "synthesised"
    assert "(synthesised inputs of other classes)" in target_missed(rep, rp)
    rep.reversed_asr_after = 0.0  # the probability part: the clean rows are synthesised too
    assert "on the clean synthesised inputs of other classes" in target_missed(rep, rp)


def test_the_reversed_trigger_success_names_its_images() -> None:
    trig = ReversedTrigger("patch", 0, np.zeros((1, 4, 4)), np.zeros((4, 4)), 5.8, 1.0, rows=9)
    assert reversed_reach(trig, synthesised=False) == \
        "flips 100% of the 9 few-shot images of other classes it was reversed on"
    assert reversed_reach(trig, synthesised=True) == \
        "flips 100% of the 9 synthesised inputs of other classes it was reversed on"
