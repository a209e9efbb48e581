"""The scan's repair stage: Shapley values towards the flagged class, the plan (prune.py),
the check of the other flagged classes, the findings, and the sanitized export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .autodiff.masks import MaskGradientProgram
from .budget import forward_rows
from .context import ScanContext, ScanOptions
from .data import ImageSet, Preprocess, shifted
from .errors import Inconclusive
from .findings import ChannelValue, PlanCheck, Repair, ScanResult
from .graph.export import sanitize, save_atomic
from .graph.prefix import CoalitionEvaluator
from .policy import Catalog, RepairPolicy
from .prune import PruneConfig, PrunePlan, check, plan
from .recover import RecoverConfig, Recovered, describe, recover, untrainable, write_back
from .rescan import rescan, zeroed_channels
from .reverse import ReversedTrigger
from .shapley import ShapleyConfig, ShapleyResult, Utility, estimate
from .wording import target_missed, target_missed_reason

# shifted copies of each image (FINDINGS 5): of the other classes' images the trigger is
# stamped on, and of the clean images the repair's clean cost is measured on
STAMPED_COPIES, CLEAN_COPIES = 4, 8

# metadata_props key of a written repair: "complete", or "incomplete" (--keep-incomplete)
REPAIR_KEY = "shapscan.repair"


def repair(ctx: ScanContext) -> None:
    """Zero the channels that carry the backdoor towards the most anomalous flagged class,
    test the other flagged classes' triggers on the result, and export it if asked."""
    assert ctx.verdict is not None and ctx.images is not None
    target, *others = ctx.verdict.detection.flagged_targets
    triggers = ctx.verdict.triggers
    images = repair_images(ctx.images, target, ctx.policy.repair.max_images, ctx.opts.seed)
    with ctx.timed("shapley"):
        # shifted copies: the utilities average over more rows, so they are less noisy
        # (FINDINGS 5); the clean cost (a divergence, see prune.py) gets the most
        stamped = _stamped(images, target, triggers[target], ctx.opts.trigger_gain)
        clean = shifted(images, CLEAN_COPIES)
        # the first-order ranking's gradient session is gone before the evaluators cache
        # their images' prefix activations: the two never hold memory at once
        players = narrow_players(ctx, stamped, target)
        backdoor_eval = CoalitionEvaluator(
            ctx.model.runnable, ctx.layers, ctx.prep.to_model(stamped), ctx.device,
            max_batch_rows=forward_rows(ctx.model.runnable, ctx.policy.load.max_batch_bytes))
        clean_eval = backdoor_eval.with_images(ctx.prep.to_model(clean.pixels))
        cfg = _shapley_config(ctx)
        ctx.progress.stage(f"Shapley values towards class {target}")
        utility = Utility(target)
        values = estimate(backdoor_eval, utility, cfg, ctx.opts.seed, players=players,
                          progress=ctx.progress)
    with ctx.timed("prune"):
        ctx.progress.stage("choosing channels to zero")
        chosen = plan(backdoor_eval, clean_eval, clean.labels, utility, values,
                      _prune_config(ctx), progress=ctx.progress)
        _record_repair(ctx, images, backdoor_eval, values, chosen, target,
                       backdoor_eval.forward_passes + clean_eval.forward_passes)
        assert ctx.result.repair is not None
        ctx.result.repair.players = None if players is None else len(players)
    rep = ctx.result.repair
    # wanted but untrainable (float16, QDQ): _recover says so in SS301 and returns None
    recovered = _recover(ctx, rep, images) if chosen.channels and recovery_wanted(ctx) else None
    # the weights the export carries: the original's with the plan's channels masked, or
    # the recovered ones; the checks below are of that model
    repaired_eval = backdoor_eval
    if recovered is not None:
        with ctx.timed("recover"):
            repaired_eval = _judge_recovered(ctx, rep, recovered, chosen.channels, stamped,
                                             clean, utility)
    with ctx.timed("prune"):
        if chosen.channels:
            rep.family_asr = _family_asr(
                ctx, images, backdoor_eval, repaired_eval, chosen.channels, target,
                ctx.verdict.families.get(target) or [triggers[target]])
        if others and chosen.channels:
            _check_other_targets(ctx.result, backdoor_eval, repaired_eval, ctx.prep,
                                 images, chosen.channels, target,
                                 {t: triggers[t] for t in others}, ctx.opts, ctx.catalog,
                                 ctx.policy.repair)
    # the re-scan repeats the detection the scan ran (none: a stage driven by hand)
    if chosen.channels and ctx.policy.repair.rescan and ctx.result.detection is not None:
        with ctx.timed("rescan"):
            rep.rescan = rescan(ctx, rep, recovered)
    finish_repair(ctx, rep, recovered)


def _judge_recovered(ctx: ScanContext, repair: Repair, recovered: Recovered,
                     channels: list[int], stamped: np.ndarray, clean: ImageSet,
                     utility: Utility) -> CoalitionEvaluator:
    """The plan's figures again on the recovered weights (what the export carries): the
    fine-tuning may give the backdoor back, or finish removing it. The zeroed model's are
    kept in `repair.zeroed`. Returns the evaluator of the recovered model (the plan's
    channels are masked in its coalitions, as in the original's)."""
    graph = write_back(ctx.model.runnable, recovered.values, recovered.description)
    stamped_eval = CoalitionEvaluator(
        graph, ctx.layers, ctx.prep.to_model(stamped), ctx.device,
        max_batch_rows=forward_rows(graph, ctx.policy.load.max_batch_bytes))
    clean_eval = stamped_eval.with_images(ctx.prep.to_model(clean.pixels))
    now = check(stamped_eval, clean_eval, clean.labels, utility, channels, _prune_config(ctx))
    repair.zeroed = PlanCheck(repair.reversed_asr_after, repair.target_probability_after or 0.0,
                              repair.fewshot_acc_after,
                              repair.clean_target_probability_after or 0.0,
                              repair.target_reached)
    repair.reversed_asr_after, repair.target_probability_after = (now.reversed_asr,
                                                                  now.target_probability)
    repair.fewshot_acc_after = now.clean_acc
    repair.clean_target_probability_after = now.clean_target_probability
    repair.target_reached = now.target_reached
    repair.forward_passes += stamped_eval.forward_passes + clean_eval.forward_passes
    return stamped_eval


def _recover(ctx: ScanContext, repair: Repair, images: ImageSet) -> Recovered | None:
    """[repair.recover]: fine-tune the zeroed model (recover.py) against the original's
    outputs on the repair's images (`repair_images`), unlearning every reversed trigger
    family of the flagged classes. The trained initializers go into the re-scanned and the
    exported model; None (and a note in SS301's message) when the model cannot be trained."""
    assert ctx.verdict is not None
    rc = ctx.policy.repair.recover
    cfg = RecoverConfig(steps=rc.steps, lr=rc.lr, ops=rc.parameters,
                        temperature=rc.temperature, unlearn_weight=rc.unlearn_weight,
                        label_weight=rc.label_weight, flip=rc.flip, seed=ctx.opts.seed)
    flagged = ctx.verdict.detection.flagged_targets
    triggers = [trig for t in flagged
                for trig in ctx.verdict.families.get(t) or [ctx.verdict.triggers[t]]]
    with ctx.timed("recover"):
        ctx.progress.stage("recovering clean behaviour (fine-tuning the zeroed model)")
        why = untrainable(ctx.model)
        if why:
            repair.recovery_note = f"recovery skipped: {why}"
            return None
        zeroed = sanitize(ctx.model.runnable, zeroed_channels(repair), verify=False)
        try:
            res = recover(ctx.model.runnable, zeroed, ctx.prep, images, triggers, cfg,
                          targets=flagged, device=ctx.device, progress=ctx.progress)
        except Inconclusive as exc:
            repair.recovery_note = f"recovery skipped: {exc}"
            return None
    repair.recovery_note = (f"recovered: {res.steps} fine-tuning steps on "
                            f"{res.parameters - res.frozen} parameters (zeroed channels held "
                            f"at 0), {res.seconds:.0f} s")
    return Recovered(res.values, describe(cfg))


def narrow_players(ctx: ScanContext, stamped: np.ndarray, target: int) -> np.ndarray | None:
    """The channels the Shapley estimate plays with, when there are more than the policy's
    `shapley.max_players` (None: all of them).

    A permutation switches channels off one at a time, so its cost grows with the channel
    count: thousands of batched runs per permutation on a MobileNetV2 (issue #24). A
    first-order pass ranks every channel at the cost of one backward pass: the gradient of
    the target's margin over the mean other logit with respect to the channel's mask, on the
    stamped images (activation × gradient summed over positions, what zeroing the channel
    takes away to first order). The exact estimator then runs on the top of that ranking.
    """
    limit = ctx.policy.shapley.max_players
    if not limit or sum(la.channels for la in ctx.layers) <= limit:
        return None
    ctx.progress.stage(f"ranking channels for the Shapley estimate (first order, top {limit})")
    program = MaskGradientProgram(ctx.model.runnable, ctx.layers, ctx.device,
                                  max_bytes=ctx.policy.load.max_batch_bytes)
    k = ctx.n_classes
    weights = np.full((len(stamped), k), -1.0 / (k - 1), np.float32)
    weights[:, target] = 1.0
    _, grads = program.run(ctx.prep.to_model(stamped), weights)
    return np.sort(np.argsort(-grads.mean(0), kind="stable")[:limit])


def _shapley_config(ctx: ScanContext) -> ShapleyConfig:
    sp, opts = ctx.policy.shapley, ctx.opts
    return ShapleyConfig(permutations=opts.permutations or sp.permutations,
                         epsilon=sp.epsilon if opts.epsilon is None else opts.epsilon,
                         top_k=sp.top_k, truncation=sp.truncation,
                         stable_rounds=opts.stable_rounds)


def recovery_wanted(ctx: ScanContext) -> bool:
    """Whether recovery is to follow the zeroing: on, and real images. Data-free scans zero
    alone: distilled on synthesised inputs, recovery gave the sample cnn_trojan's backdoor
    back (true ASR 0.7 % zeroed, 37.4 % recovered)."""
    return ctx.policy.repair.recover.enabled and not ctx.opts.data_free


def recovering(ctx: ScanContext) -> bool:
    """Whether recovery will follow the zeroing: wanted, and a model it can train."""
    return recovery_wanted(ctx) and not untrainable(ctx.model)


def channel_budget(ctx: ScanContext) -> float:
    """The share of channels the plan may zero: [repair.recover]'s when recovery will
    follow, repair.max_channel_fraction otherwise. On the corpus zeroing alone at 10 % cost
    9-20 points; recovery gives part of it back."""
    rp = ctx.policy.repair
    return rp.recover.max_channel_fraction if recovering(ctx) else rp.max_channel_fraction


def _prune_config(ctx: ScanContext) -> PruneConfig:
    rp = ctx.policy.repair
    return PruneConfig(target_asr=rp.target_asr, target_probability=rp.target_probability,
                       max_channel_fraction=channel_budget(ctx),
                       max_clean_drop=rp.max_clean_drop, order=ctx.opts.prune_order,
                       give_back=not ctx.opts.data_free)


def repair_images(images: ImageSet, target: int, most: int, seed: int) -> ImageSet:
    """The scan's images the repair works on ([repair] max_images, 0: all): every one up to
    `most`, else the flagged class's own and a seeded random draw of the others, in their
    order. A memory bound: each evaluator of the repair holds 5 or 9 rows per image (shifted
    copies), and at 1,000 classes of 224x224 the clean rows alone were 5.4 GB of pixels."""
    if not most or len(images) <= most:
        return images
    own = np.flatnonzero(images.labels == target)[:most]
    rest = np.flatnonzero(images.labels != target)
    drawn = np.random.default_rng(seed).choice(rest, most - len(own), replace=False)
    return images.subset(np.sort(np.concatenate([own, drawn])))


def _stamped(images: ImageSet, target: int, trigger: ReversedTrigger, gain: float
             ) -> np.ndarray:
    """The trigger on the images of the other classes and shifted copies of each."""
    others = images.subset(np.flatnonzero(images.labels != target))
    return trigger.apply(shifted(others, STAMPED_COPIES).pixels, gain=gain)


def _success(original: CoalitionEvaluator, repaired: CoalitionEvaluator, prep: Preprocess,
             images: ImageSet, channels: list[int], target: int, trigger: ReversedTrigger,
             gain: float) -> tuple[float, float, int]:
    """`trigger` (towards `target`) stamped on the images of the other classes as the plan's
    was: the share sent to `target` by the model as shipped and by the repaired one (the
    `repaired` evaluator's weights, original or recovered, with `channels` zeroed), and the
    image passes that took."""
    pixels = prep.to_model(_stamped(images, target, trigger, gain))
    mask = np.ones((1, original.n_channels), np.float32)
    shipped = original.with_images(pixels)
    before = (shipped.logits(mask).argmax(-1) == target).mean()
    mask[0, channels] = 0.0
    fixed = repaired.with_images(pixels)
    after = (fixed.logits(mask).argmax(-1) == target).mean()
    return float(before), float(after), shipped.forward_passes + fixed.forward_passes


def _family_asr(ctx: ScanContext, images: ImageSet, original: CoalitionEvaluator,
                repaired: CoalitionEvaluator, channels: list[int], target: int,
                family_triggers: list[ReversedTrigger]) -> dict[str, tuple[float, float]]:
    """Each of the target's reversed triggers (one per family): its success on the model as
    shipped and on the repaired one."""
    assert ctx.result.repair is not None
    out = {}
    for trigger in family_triggers:
        before, after, passes = _success(original, repaired, ctx.prep, images, channels,
                                         target, trigger, ctx.opts.trigger_gain)
        ctx.result.repair.forward_passes += passes
        out[trigger.family] = (before, after)
    return out


def _check_other_targets(result: ScanResult, original: CoalitionEvaluator,
                         repaired: CoalitionEvaluator, prep: Preprocess, images: ImageSet,
                         channels: list[int], target: int,
                         triggers: dict[int, ReversedTrigger], opts: ScanOptions,
                         catalog: Catalog, rp: RepairPolicy) -> None:
    """The repair is planned for the most anomalous flagged class. Another flagged class's
    backdoor may live in other channels: its reversed trigger is tested on the repaired
    model, and SS304 says when it still works."""
    assert result.repair is not None
    kind = "synthesised" if opts.data_free else "few-shot"
    for t, trigger in triggers.items():
        before, after, passes = _success(original, repaired, prep, images, channels, t,
                                         trigger, opts.trigger_gain)
        result.repair.forward_passes += passes
        if after > rp.target_asr:
            result.findings.append(catalog.make(
                "SS304", f"class {t} was flagged too, and the repair was planned for class "
                f"{target}: on the repaired model class {t}'s reversed trigger still flips "
                f"{100 * after:.0f}% of the {kind} images of other classes (before: "
                f"{100 * before:.0f}%)", location=f"class {t}", target=t,
                reversed_asr_before=before, reversed_asr_after=after))


def _record_repair(ctx: ScanContext, images: ImageSet, evaluator: CoalitionEvaluator,
                   values: ShapleyResult, chosen: PrunePlan, target: int, passes: int) -> None:
    assert ctx.images is not None

    def channel_value(flat: int, pruned: bool) -> ChannelValue:
        layer, ch = evaluator.channel(flat)
        return ChannelValue(layer.name, ch, float(values.values[flat]),
                            float(chosen.clean.get(flat, 0.0)), pruned)

    pruned = [channel_value(c, True) for c in chosen.channels]
    pruned_set = set(chosen.channels)
    top = [channel_value(int(c), int(c) in pruned_set) for c in values.top(20)]
    ctx.result.repair = Repair(  # finished (findings, export) once the re-scan has spoken
        target=target, channels_total=evaluator.n_channels, pruned=pruned, top_channels=top,
        reversed_asr_before=chosen.asr_before, reversed_asr_after=chosen.asr_after,
        fewshot_acc_before=chosen.clean_acc_before, fewshot_acc_after=chosen.clean_acc_after,
        permutations=values.permutations, forward_passes=passes, estimator=values.estimator,
        target_reached=chosen.target_reached, target_probability_before=chosen.backdoor_before,
        target_probability_after=chosen.backdoor_after,
        given_back=[channel_value(c, False) for c in chosen.given_back], frontier=chosen.frontier,
        inputs=ctx.view, stamped_images=int((images.labels != target).sum()),
        stamped_copies=STAMPED_COPIES, clean_images=len(images),
        scan_images=len(ctx.images),
        clean_copies=CLEAN_COPIES, trigger_gain=ctx.opts.trigger_gain,
        clean_target_probability_after=chosen.clean_target_prob_after,
        channel_budget=channel_budget(ctx))


def finish_repair(ctx: ScanContext, repair: Repair, recovered: Recovered | None = None
                  ) -> None:
    """Findings for the repair and the sanitized export (shared by every method), with the
    recovered weights written into it when there are some."""
    result, catalog, rp, opts = ctx.result, ctx.catalog, ctx.policy.repair, ctx.opts
    if not repair.pruned and recovered is None:
        result.findings.append(catalog.make(
            "SS302", f"no channel set within budget removes the backdoor towards class "
            f"{repair.target}; model not repaired", location=f"class {repair.target}"))
        repair.status = "incomplete"
        repair.incomplete_reasons = ["no channel set within budget removes the backdoor"]
        return
    if not repair.target_reached:
        result.findings.append(catalog.make(
            "SS302", target_missed(repair, rp), location=f"class {repair.target}"))
    drop = repair.fewshot_acc_before - repair.fewshot_acc_after
    if drop > rp.max_clean_drop + 1e-9:
        result.findings.append(catalog.make(
            "SS303", f"repair lowers clean accuracy on the {repair.images_word} by "
            f"{100 * drop:.1f} points", location=f"class {repair.target}"))
    # a repair recovery followed has checks of its own ([repair.recover])
    growth, every_family = ((rp.recover.min_trigger_growth, rp.recover.every_family)
                            if recovered is not None else
                            (rp.min_trigger_growth, rp.every_family))
    repair.incomplete_reasons = _incomplete_reasons(result, repair, rp.target_asr, growth,
                                                    rp.target_asr if every_family else None)
    repair.status = "incomplete" if repair.incomplete_reasons else "complete"
    if opts.out is not None and (repair.status == "complete" or opts.keep_incomplete):
        model = ctx.model
        sanitized = sanitize(model.proto, zeroed_channels(repair), {
            "shapscan.method": repair.estimator, "shapscan.target": str(repair.target),
            "shapscan.source_sha256": model.sha256, REPAIR_KEY: repair.status},
            layer_graph=model.layer_graph)
        if recovered is not None:
            sanitized = write_back(sanitized, recovered.values, recovered.description)
        save_atomic(sanitized, opts.out)
        repair.output_path = str(opts.out)
    repair.withheld = opts.out is not None and repair.output_path is None
    if repair.status == "incomplete":
        result.findings.append(catalog.make(
            "SS305", _incomplete_message(repair, opts.out), location=f"class {repair.target}",
            reasons=list(repair.incomplete_reasons), written=repair.output_path is not None))
    # the rows the summary describes: SS201's rate is on other rows (the unshifted images)
    rows = (f"on the {repair.stamped_images * (1 + repair.stamped_copies)} stamped rows "
            if repair.stamped_images else "")
    result.findings.append(catalog.make(
        "SS301", f"zeroed {len(repair.pruned)} of {repair.channels_total} channels "
        f"({100 * repair.pruned_fraction:.2f}%)"
        + (f"; reversed trigger success {rows}{100 * repair.reversed_asr_before:.0f}% -> "
           f"{100 * repair.reversed_asr_after:.0f}%" if repair.target >= 0 else "")
        + (f"; {repair.recovery_note}" if repair.recovery_note else "")
        + (f"; sanitized model written to {opts.out}" if repair.output_path else "")
        + ("; data-free: clean behaviour was only checked on synthesised inputs, measure the "
           "repaired model's accuracy on real data before deploying it"
           if opts.data_free and opts.method == "shapley" else ""),
        location=f"class {repair.target}", repstatus=repair.status))


def _incomplete_reasons(result: ScanResult, repair: Repair, target_asr: float,
                        min_growth: float = 0.0, family_asr: float | None = None) -> list[str]:
    """Why the repaired model may still obey a trigger; empty when nothing says so.
    `target_asr`: the plan's success target; `family_asr`: the most any of the target's
    reversed triggers may still succeed on."""
    reasons = []
    if not repair.target_reached:
        reasons.append(target_missed_reason(repair, target_asr))
    survivors = [f.details["target"] for f in result.findings if f.rule_id == "SS304"]
    if survivors:
        reasons.append(f"the reversed trigger of flagged class "
                       f"{', '.join(map(str, survivors))} still works on it (SS304)")
    if repair.rescan is not None and not repair.rescan.clean:
        reasons.append(f"the re-scan of the repaired model still flags class "
                       f"{', '.join(map(str, repair.rescan.flagged_targets))}")
    growth = None if repair.rescan is None else repair.rescan.growth
    if growth is not None and growth < min_growth:
        reasons.append(f"on the repaired model class {repair.target}'s reversed "
                       f"{repair.rescan.target_family} trigger is {growth:.2f}x its size "
                       f"before (at least {min_growth:g}x asked): a real trigger is many "
                       "times smaller than the class's trigger once the backdoor is gone, so "
                       "the class may never have been backdoored, or the repair blocks only "
                       "the reversed pattern")
    if family_asr is not None:
        alive = {f: a for f, (_, a) in repair.family_asr.items() if a > family_asr}
        if alive:
            reasons.append(f"class {repair.target}'s reversed " + ", ".join(
                f"{f} trigger still works on {100 * a:.0f}%" for f, a in alive.items())
                + f" of the stamped {repair.images_word}")
    return reasons


def _incomplete_message(repair: Repair, out: Path | None) -> str:
    text = f"repair incomplete: {'; '.join(repair.incomplete_reasons)}"
    if repair.output_path:
        return (f"{text}; written to {repair.output_path} anyway (--keep-incomplete), marked "
                f"{REPAIR_KEY} = incomplete in its metadata")
    if out is not None:
        return (f"{text}; the repaired model was NOT written to {out}: rerun with "
                f"--keep-incomplete to write it anyway, marked {REPAIR_KEY} = incomplete")
    return text
