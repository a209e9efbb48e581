"""Self-contained HTML report for a security reviewer: one file, no scripts, no network.

Everything the model controls (node, tensor and layer names, metadata, error texts that
quote them) is escaped with `esc`; images are PNG data URIs and charts are inline SVG.
"""

from __future__ import annotations

import math
from importlib import resources

import numpy as np

from .. import __version__
from ..detect import MIN_CONVERGED
from ..findings import Detection, Finding, ModelSummary, Repair, ScanResult, Verdict
from .charts import (
    BAR,
    FLAG,
    anomaly_chart,
    esc,
    flagged_by_test,
    frontier_chart,
    png_data_uri,
    shapley_chart,
)

_TITLES = {Verdict.BACKDOOR: "BACKDOOR DETECTED", Verdict.CLEAN: "CLEAN",
           Verdict.INCONCLUSIVE: "INCONCLUSIVE", Verdict.ERROR: "ERROR — MODEL NOT SCANNED",
           Verdict.REPAIR_ONLY: "REPAIR ONLY — NO DETECTION"}


def _css() -> str:
    return resources.files("scanner.report").joinpath("report.css").read_text("utf-8")


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if math.isfinite(value) else ("∞" if value > 0 else "n/a")


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit} ({n:,} B)"
        size /= 1024
    return f"{n} B"


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _banner(result: ScanResult) -> str:
    sub: list[str] = []
    d, r = result.detection, result.repair
    if result.verdict is Verdict.BACKDOOR and d is not None and d.flagged_targets:
        targets = ", ".join(esc(t) for t in d.flagged_targets)
        sub.append(f"target class {targets}")
    if r is not None:
        sub.append(f"{len(r.pruned)} of {r.channels_total:,} channels zeroed, reversed "
                   f"trigger success {_pct(r.reversed_asr_before)} → "
                   f"{_pct(r.reversed_asr_after)}")
        if r.output_path:
            sub.append(f"repaired model: <code>{esc(r.output_path)}</code>"
                       + (" (incomplete)" if r.status == "incomplete" else ""))
        elif r.withheld:
            sub.append("repair incomplete: the repaired model was not written")
    if result.verdict is Verdict.CLEAN:
        sub.append("no class is reachable with an anomalously small trigger")
    out = result.output
    if out is not None and out.kind == "unchanged-copy":
        sub.append(f"model copied unchanged to <code>{esc(out.path)}</code>")
    elif out is not None and not out.written:
        sub.append(f"nothing written to <code>{esc(out.path)}</code>: {esc(out.reason)}")
    if result.errors:
        sub.append(f"{len(result.errors)} error(s): see below")
    top = result.max_severity
    if top is not None:
        sub.append(f"highest finding severity: {top.name}")
    return (f'<div class="banner {esc(result.verdict.value)}"><div class="verdict">'
            f'{_TITLES[result.verdict]}</div><div class="sub">{" · ".join(sub)}</div></div>')


def _model(result: ScanResult, m: ModelSummary | None) -> str:
    rows = [("Model", f"<code>{esc(result.model_path)}</code>")]
    if m is not None:
        io = [(esc(name), "×".join(esc(d) for d in shape)) for name, shape in m.inputs]
        out = [(esc(name), "×".join(esc(d) for d in shape)) for name, shape in m.outputs]
        rows += [
            ("SHA-256", f'<span class="mono">{esc(m.sha256)}</span>'),
            ("Size", esc(_bytes(m.size_bytes))),
            ("Opset", esc(m.opset)),
            ("Inputs", "<br>".join(f"<code>{n}</code> [{s}]" for n, s in io)),
            ("Outputs", "<br>".join(f"<code>{n}</code> [{s}]" for n, s in out)),
            ("Activation layers", f"{len(m.layers)} ({m.channels_total:,} channels)"),
        ]
    rows += [("Method", esc(result.method)), ("Device", esc(result.device)),
             ("Seed", esc(result.seed))]
    html = _kv(rows)
    if m is not None and m.layers:
        body = "".join(f"<tr><td><code>{esc(x.name)}</code></td><td>{esc(x.op)}</td>"
                       f"<td><code>{esc(x.node)}</code></td><td class=num>{x.channels}</td></tr>"
                       for x in m.layers)
        html += (f"<details><summary>{len(m.layers)} activation layers</summary><table>"
                 "<tr><th>Tensor</th><th>Op</th><th>Node</th><th class=num>Channels</th></tr>"
                 f"{body}</table></details>")
    return html


def _detection(d: Detection) -> str:
    source = ("synthesised inputs, "
              f"{d.bn_layers_matched} BatchNormalization layers as prior"
              if d.data_free else "few-shot clean images")
    if len(d.views) > 1:
        source += ("; the few-shot images flagged nothing, so inputs synthesised from the model "
                   "were checked too (decision score, above 1 flags: "
                   + ", ".join(f"{k} {_num(v, 2)}" for k, v in d.views.items()) + ")")
    if d.shortlist is not None:
        sl = d.shortlist
        chose = (f"a {sl.screen_steps}-step screen on {sl.screen_images} image(s) each chose "
                 f"the {len(sl.candidates)} easiest to reach" if sl.screen == "classes" else
                 f"a {sl.screen_steps}-step sweep of label-free triggers on {sl.screen_images} "
                 f"images chose the {len(sl.candidates)} they sent the images to most")
        source += (f"; of the model's {sl.classes} classes, {chose} for the full reverse, "
                   f"beside {len(sl.reference)} random others whose norms set the median and "
                   "spread and which are never flagged themselves (the chart shows those "
                   "classes)")
        if sl.yardstick:
            source += ("; of those, the triggers that reached the reverse's goal, which "
                       f"alone set a family's median and spread where {MIN_CONVERGED} or more "
                       "did: "
                       + ", ".join(f"{n} ({fam})" for fam, n in sl.yardstick.items()))
    parts = [f'<p class="note">Anomaly index of each class\'s reversed triggers '
             f'(how much smaller than the median, in robust standard deviations of the log '
             f'norm, averaged over the patch and full-image families; the warp family, '
             f'for image-warping triggers, is judged on its own). '
             f'Classes above the threshold ({_num(d.threshold, 2)}) are flagged, and so is a '
             f'class whose patch or warp trigger alone is anomalous and stands apart from the '
             f'next class\'s (the patch and warp tests; a red diamond marks that index). Inputs: '
             f'{esc(source)}; {d.forward_passes:,} forward passes.</p>',
             anomaly_chart(d.classes, d.threshold, reasons=d.reasons)]
    for c in d.classes:
        mark = flagged_by_test(c, d.reasons)
        if mark is not None:
            value, test = mark
            family = test.split()[0]
            parts.append(f'<p class="note flagged-by"><b>Class {esc(c.target)}</b> was flagged '
                         f'by the {esc(test)}, not by the combined index its bar shows '
                         f'({_num(c.anomaly_index, 2)}): its {esc(family)} trigger alone is '
                         f'anomalous (index {_num(value, 2)}, the red diamond) and stands '
                         f'apart from the next class\'s (see the SS201 finding for the '
                         f'cuts).</p>')
    rows = "".join(
        f'<tr class="{"flagged" if c.flagged else ""}"><td class=num>{esc(c.target)}</td>'
        f"<td class=num>{_num(c.mask_l1, 1)}</td>"
        f"<td class=num>{_num(c.patch_anomaly_index, 2)}</td>"
        f"<td class=num>{_num(c.universal_norm, 2)}</td>"
        f"<td class=num>{_num(c.universal_anomaly_index, 2)}</td>"
        f"<td class=num>{_num(c.warp_norm, 2)}</td>"
        f"<td class=num>{_num(c.warp_anomaly_index, 2)}</td>"
        f"<td class=num>{_num(c.anomaly_index, 2)}</td>"
        f"<td class=num>{_pct(c.reversed_asr)}</td>"
        f"<td class=num>{_num(c.max_margin, 1)}</td>"
        f"<td class=num>{_num(c.selectivity.get('patch'), 2)} / "
        f"{_num(c.selectivity.get('universal'), 2)}</td>"
        f"<td>{'yes' if c.flagged else ''}</td></tr>"
        for c in d.classes)
    parts.append("<details><summary>Per-class table</summary><table><tr>"
                 "<th class=num>Class</th><th class=num>Mask L1</th>"
                 "<th class=num>Patch index</th><th class=num>Perturbation L2</th>"
                 "<th class=num>Full-image index</th><th class=num>Warp RMS (px)</th>"
                 "<th class=num>Warp index</th>"
                 "<th class=num>Anomaly index</th><th class=num>Reversed trigger success</th>"
                 "<th class=num>Max margin (MM-BD)</th>"
                 "<th class=num>Selectivity, patch / full-image</th>"
                 f"<th>Flagged</th></tr>{rows}</table></details>")
    for t in d.flagged_targets:
        if t not in d.masks:
            continue
        mask = np.asarray(d.masks[t])
        if mask.ndim == 3 and mask.shape[0] == 1:  # [1, H, W] from a batched optimiser
            mask = mask[0]
        warp = d.families.get(t) == "warp"
        figures = [("displacement magnitude (warp)" if warp else "mask", mask)]
        if t in d.patterns:
            pattern = np.asarray(d.patterns[t])
            figures += [("pattern", pattern), ("trigger (mask × pattern)", pattern * mask)]
        if t in d.examples:
            figures.append(("stamped example", d.examples[t]))
        imgs = "".join(f'<figure><img src="{png_data_uri(img)}" alt="{esc(label)}">'
                       f"<figcaption>{esc(label)}</figcaption></figure>"
                       for label, img in figures)
        parts.append(f"<h3>Reversed trigger for class {esc(t)}</h3>"
                     f'<div class="triggers">{imgs}</div>')
    return "".join(parts)


def _repair(r: Repair) -> str:
    word = r.images_word
    rows = [
        (f"Reversed trigger success (stamped {word})", _pct(r.reversed_asr_before),
         _pct(r.reversed_asr_after)),
        (f"Mean target-class probability (stamped {word})",
         _num(r.target_probability_before), _num(r.target_probability_after)),
        (f"Clean accuracy ({word})", _pct(r.fewshot_acc_before), _pct(r.fewshot_acc_after)),
        ("Channels zeroed", "0", f"{len(r.pruned)} of {r.channels_total:,} "
                                 f"({_pct(r.pruned_fraction)})"),
    ]
    z = r.zeroed  # with recovery: the zeroed model before fine-tuning, a middle column
    middle = [] if z is None else [_pct(z.reversed_asr), _num(z.target_probability),
                                   _pct(z.clean_acc), f"{len(r.pruned)}"]
    table = "".join(f"<tr><th>{esc(k)}</th><td class=num>{b}</td>"
                    + (f"<td class=num>{middle[i]}</td>" if middle else "")
                    + f"<td class=num>{a}</td></tr>" for i, (k, b, a) in enumerate(rows))
    head = ("<th class=num>Zeroed, before recovery</th><th class=num>After recovery</th>"
            if z is not None else "<th class=num>After</th>")
    parts = [f'<p class="note">Target class {esc(r.target)}; estimator {esc(r.estimator)}, '
             f"{r.permutations} permutations, {r.forward_passes:,} forward passes. "
             f"Target reached: <b>{'yes' if r.target_reached else 'no'}</b>"
             + ("" if z is None else " (after recovery; before it: "
                f"{'yes' if z.target_reached else 'no'})") + ".</p>",
             f"<table><tr><th></th><th class=num>Before</th>{head}</tr>"
             f"{table}</table>"]
    if r.stamped_images or r.clean_images:
        parts.append(f'<p class="note rows">Measured on the scan\'s own {esc(word)}, not a '
                     f"test set. Trigger success and probability on {esc(r.stamped_rows())}; "
                     f"clean accuracy on {esc(r.clean_rows())}. Measure the repaired model "
                     "on held-out data before deploying it.</p>")
    if r.output_path:
        parts.append(f"<p>Repaired model written to <code>{esc(r.output_path)}</code>"
                     + (", marked <code>shapscan.repair = incomplete</code>"
                        if r.status == "incomplete" else "") + ".</p>")
    if r.status == "incomplete":
        kept = ("" if r.output_path else " Not written: <code>--keep-incomplete</code> writes "
                "it anyway, marked <code>shapscan.repair = incomplete</code>.")
        parts.append(f"<p><b>Repair incomplete</b>: "
                     f"{esc('; '.join(r.incomplete_reasons))}.{kept}</p>")
    if r.rescan is not None:
        found = ("no class flagged" if r.rescan.clean else "still flags class " + ", ".join(
            f"{esc(t)} (anomaly index {_num(r.rescan.anomaly_indices[t])})"
            for t in r.rescan.flagged_targets))
        growth = r.rescan.growth
        size = ("" if growth is None else
                f" Class {esc(r.target)}'s reversed {esc(r.rescan.target_family)} trigger: "
                f"{_num(r.rescan.target_size_before)} before, "
                f"{_num(r.rescan.target_size_after)} after the repair ({growth:.2f}x; other "
                f"classes' median {_num(r.rescan.others_median_after)}).")
        parts.append(f"<p>Re-scan of the repaired model "
                     f"({esc(', '.join(r.rescan.views))}): {found}.{size}</p>")
    if r.frontier:
        parts.append('<h3>Repair frontier</h3><p class="note">Each step of the plan: the '
                     "reversed trigger's success on the stamped images (red, left) and the "
                     "clean cost, the divergence from the original model's outputs on the "
                     "clean images (blue, right), against the channels zeroed; dashed: the "
                     f"{len(r.pruned)} the plan kept.</p>"
                     + frontier_chart(r.frontier, len(r.pruned)))
    if r.top_channels:
        parts.append(f'<h3>Top channels by backdoor Shapley value</h3><p class="legend note">'
                     f'<span style="background:{FLAG}"></span>zeroed'
                     f'<span style="background:{BAR}"></span>kept</p>'
                     f"{shapley_chart(r.top_channels)}")
    if r.pruned:
        body = "".join(f"<tr><td><code>{esc(c.layer)}</code></td><td class=num>{c.channel}"
                       f"</td><td class=num>{_num(c.shapley, 4)}</td>"
                       f"<td class=num>{_num(c.clean, 4)}</td></tr>" for c in r.pruned)
        parts.append("<h3>Zeroed channels</h3><table><tr><th>Layer</th><th class=num>Channel"
                     "</th><th class=num>Backdoor Shapley</th><th class=num>Clean contribution"
                     f"</th></tr>{body}</table>")
    if r.given_back:
        names = ", ".join(f"<code>{esc(c.layer)}</code> {c.channel}" for c in r.given_back)
        parts.append(f'<p class="note">Zeroed while planning, then switched back on because '
                     f"the target held without them and clean behaviour improved: {names}.</p>")
    return "".join(parts)


def _findings(findings: list[Finding]) -> str:
    if not findings:
        return '<p class="note">No findings.</p>'
    ordered = sorted(findings, key=lambda f: -f.severity)
    body = "".join(
        f'<tr><td><span class="sev {f.severity.name.lower()}">{f.severity.name}</span></td>'
        f"<td class=nowrap><code>{esc(f.rule_id)}</code></td><td>{esc(f.message)}</td>"
        f"<td>{f'<code>{esc(f.location)}</code>' if f.location else ''}</td></tr>"
        for f in ordered)
    return ("<table><tr><th>Severity</th><th>Rule</th><th>Message</th><th>Location</th></tr>"
            f"{body}</table>")


def _timings(result: ScanResult) -> str:
    if not result.timings:
        return '<p class="note">No timings recorded.</p>'
    # the CLI records wall time as "total"; otherwise the stages are summed
    stages = {k: v for k, v in result.timings.items() if k != "total"}
    total = result.timings.get("total", sum(v for v in stages.values() if math.isfinite(v)))
    rows = "".join(f"<tr><td>{esc(stage)}</td><td class=num>{_num(s, 2)} s</td></tr>"
                   for stage, s in stages.items())
    return (f"<table><tr><th>Stage</th><th class=num>Time</th></tr>{rows}"
            f"<tr><th>total</th><th class=num>{_num(total, 2)} s</th></tr></table>")


def render_html(result: ScanResult) -> str:
    """One self-contained HTML page for one model's result."""
    # Verdict first, then why (findings, errors), then the evidence, then context.
    sections = [f"<h1>shapscan report — <code>{esc(result.model_path)}</code></h1>",
                _banner(result), "<h2>Findings</h2>", _findings(result.findings)]
    if result.errors or result.skipped:
        items = "".join(f"<li>{esc(e)}</li>" for e in result.errors)
        items += "".join(f"<li>skipped: {esc(s)}</li>" for s in result.skipped)
        sections.append(f"<h2>Errors and skipped items</h2><ul class=\"errors\">{items}</ul>")
    if result.detection is not None:
        sections += ["<h2>Detection</h2>", _detection(result.detection)]
    if result.repair is not None:
        sections += ["<h2>Repair</h2>", _repair(result.repair)]
    sections += ["<h2>Model</h2>", _model(result, result.model),
                 "<h2>Timings</h2>", _timings(result),
                 f"<footer>shapscan {esc(result.tool_version or __version__)} · seed "
                 f"{esc(result.seed)} · device {esc(result.device)}</footer>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>shapscan: {esc(result.verdict.value)} — {esc(result.model_path)}</title>"
            f"<style>{_css()}</style></head><body><main>{''.join(sections)}</main>"
            "</body></html>\n")
