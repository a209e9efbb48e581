"""JSON report, schema "shapscan-report/1" (rules/schemas/report.schema.json).

Versioning: adding an optional field keeps "shapscan-report/1"; renaming, removing or
changing the meaning of a field bumps the number. Severities are lower-case names
("high"), verdicts their value ("backdoor"). Numbers that are not finite (an anomaly index
when every mask has the same norm) become null, because JSON has no Infinity. Arrays
(reversed masks, patterns, stamped examples) stay out of JSON: they are in the HTML report.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import __version__
from ..findings import (
    ChannelValue,
    ClassReverse,
    Detection,
    Finding,
    LayerInfo,
    ModelOutput,
    ModelSummary,
    Repair,
    ScanResult,
    Severity,
)
from ..gate import ExitCode, exit_code

SCHEMA_ID = "shapscan-report/1"
_MAX_DETAIL_ARRAY = 256  # larger arrays in finding details are summarised by shape


def json_safe(value: object) -> Any:
    """Plain JSON data for a finding's free-form details (numpy, enums, tuples)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):
        return value.name.lower() if isinstance(value, Severity) else value.value
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        if value.size <= _MAX_DETAIL_ARRAY:
            return json_safe(value.tolist())
        return {"shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    return str(value)


def _num(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _finding(f: Finding) -> dict[str, Any]:
    return {"rule_id": f.rule_id, "severity": f.severity.name.lower(), "message": f.message,
            "location": f.location, "details": json_safe(f.details)}


def _layer(layer: LayerInfo) -> dict[str, Any]:
    return {"name": layer.name, "op": layer.op, "node": layer.node,
            "channels": layer.channels, "rank": layer.rank, "axis": layer.axis}


def _io(items: list[tuple[str, list[int | str]]]) -> list[dict[str, Any]]:
    return [{"name": name, "shape": [d if isinstance(d, int) else str(d) for d in shape]}
            for name, shape in items]


def _model(m: ModelSummary) -> dict[str, Any]:
    return {"path": m.path, "sha256": m.sha256, "opset": m.opset, "size_bytes": m.size_bytes,
            "inputs": _io(m.inputs), "outputs": _io(m.outputs),
            "channels_total": m.channels_total, "layers": [_layer(x) for x in m.layers]}


def _class(c: ClassReverse) -> dict[str, Any]:
    return {"target": c.target, "mask_l1": _num(c.mask_l1),
            "anomaly_index": _num(c.anomaly_index), "reversed_asr": _num(c.reversed_asr),
            "universal_norm": _num(c.universal_norm),
            "universal_anomaly_index": _num(c.universal_anomaly_index),
            "patch_anomaly_index": _num(c.patch_anomaly_index),
            "patch_isolation": _num(c.patch_isolation),
            "warp_norm": _num(c.warp_norm), "warp_anomaly_index": _num(c.warp_anomaly_index),
            "warp_isolation": _num(c.warp_isolation), "warp_ratio": _num(c.warp_ratio),
            "family_asr": {k: _num(v) for k, v in c.family_asr.items()},
            "selectivity": {k: _num(v) for k, v in c.selectivity.items()},
            "max_margin": _num(c.max_margin), "margin_index": _num(c.margin_index),
            "flagged": c.flagged}


def _detection(d: Detection) -> dict[str, Any]:
    return {"threshold": _num(d.threshold), "data_free": d.data_free,
            "views": [{"inputs": k, "decision_score": _num(v)} for k, v in d.views.items()],
            "bn_layers_matched": d.bn_layers_matched, "flagged_targets": list(d.flagged_targets),
            "forward_passes": d.forward_passes, "classes": [_class(c) for c in d.classes],
            "shortlist": None if d.shortlist is None else {
                "classes": d.shortlist.classes, "candidates": list(d.shortlist.candidates),
                "reference": list(d.shortlist.reference),
                "screen_steps": d.shortlist.screen_steps,
                "screen_images": d.shortlist.screen_images,
                "screen": d.shortlist.screen, "yardstick": dict(d.shortlist.yardstick),
                "seconds": _num(d.shortlist.seconds)}}


def _channel(c: ChannelValue) -> dict[str, Any]:
    return {"layer": c.layer, "channel": c.channel, "shapley": _num(c.shapley),
            "clean": _num(c.clean), "pruned": c.pruned}


def _repair(r: Repair) -> dict[str, Any]:
    return {
        "target": r.target, "estimator": r.estimator, "permutations": r.permutations,
        "players": r.players,
        "images": {"used": r.clean_images, "of": max(r.scan_images, r.clean_images)}
        if r.clean_images else None,
        "forward_passes": r.forward_passes, "channels_total": r.channels_total,
        "pruned_count": len(r.pruned), "pruned_fraction": _num(r.pruned_fraction),
        "target_reached": r.target_reached, "output_path": r.output_path,
        "before": {"reversed_asr": _num(r.reversed_asr_before),
                   "target_probability": _num(r.target_probability_before),
                   "fewshot_acc": _num(r.fewshot_acc_before)},
        "after": {"reversed_asr": _num(r.reversed_asr_after),
                  "target_probability": _num(r.target_probability_after),
                  "fewshot_acc": _num(r.fewshot_acc_after)},
        "zeroed": None if r.zeroed is None else {
            "reversed_asr": _num(r.zeroed.reversed_asr),
            "target_probability": _num(r.zeroed.target_probability),
            "fewshot_acc": _num(r.zeroed.clean_acc),
            "target_reached": r.zeroed.target_reached},
        "pruned": [_channel(c) for c in r.pruned],
        "top_channels": [_channel(c) for c in r.top_channels],
        "given_back": [_channel(c) for c in r.given_back],
        "family_asr": {f: {"before": _num(b), "after": _num(a)}
                       for f, (b, a) in r.family_asr.items()},
        "status": r.status, "incomplete_reasons": list(r.incomplete_reasons),
        "withheld": r.withheld,
        "frontier": [{"channels": p.channels, "reversed_asr": _num(p.reversed_asr),
                      "target_probability": _num(p.target_probability),
                      "clean_cost": _num(p.clean_cost), "clean_acc": _num(p.clean_acc)}
                     for p in r.frontier],
        "rescan": None if r.rescan is None else {
            "views": list(r.rescan.views), "flagged_targets": list(r.rescan.flagged_targets),
            "anomaly_indices": {str(t): _num(v) for t, v in r.rescan.anomaly_indices.items()},
            "forward_passes": r.rescan.forward_passes,
            "target_family": r.rescan.target_family,
            "target_size_before": _num(r.rescan.target_size_before),
            "target_size_after": _num(r.rescan.target_size_after),
            "target_growth": _num(r.rescan.growth),
            "others_median_after": _num(r.rescan.others_median_after)},
    }


def to_dict(result: ScanResult) -> dict[str, Any]:
    """One model's result as plain JSON data (an item of the report's "results")."""
    top = result.max_severity
    doc: dict[str, Any] = {
        "model_path": result.model_path,
        "verdict": result.verdict.value,
        "max_severity": top.name.lower() if top is not None else None,
        "method": result.method,
        "device": result.device,
        "seed": result.seed,
        "tool_version": result.tool_version or __version__,
        "findings": [_finding(f) for f in result.findings],
        "errors": list(result.errors),
        "skipped": list(result.skipped),
        "model": _model(result.model) if result.model else None,
        "detection": _detection(result.detection) if result.detection else None,
        "repair": _repair(result.repair) if result.repair else None,
        "timings": {stage: _num(seconds) for stage, seconds in result.timings.items()},
        "output": _output(result.output) if result.output else None,
    }
    if result.attempts > 1:  # only a re-run Ray task says so: local reports stay as they were
        doc["attempts"] = result.attempts
    return doc


def _output(o: ModelOutput) -> dict[str, Any]:
    return {"path": o.path, "written": o.written, "kind": o.kind, "reason": o.reason or None}


def report_dict(results: Sequence[ScanResult], *, fail_on: Severity | None = None,
                not_scanned: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole report document; "gate" (fail_on and the exit code it gives, see
    scanner.gate) is present when the caller passes fail_on.

    `not_scanned` (the run was interrupted: the model it was scanning, then the ones it
    never reached) makes the report partial: "partial" is true, "results" holds the models
    that finished, and the gate's exit code is the interrupted run's 130."""
    doc: dict[str, Any] = {"schema": SCHEMA_ID,
                           "tool": {"name": "shapscan", "version": __version__},
                           "partial": not_scanned is not None,
                           "results": [to_dict(r) for r in results]}
    if not_scanned is not None:
        doc["not_scanned"] = list(not_scanned)
    if fail_on is not None:
        code = ExitCode.INTERRUPTED if not_scanned is not None else exit_code(results, fail_on)
        doc["gate"] = {"fail_on": fail_on.name.lower(), "exit_code": int(code)}
    return doc


def render_json(results: Sequence[ScanResult], *, fail_on: Severity | None = None,
                not_scanned: Sequence[str] | None = None) -> str:
    """The report as JSON text (strict JSON: no NaN/Infinity)."""
    doc = report_dict(results, fail_on=fail_on, not_scanned=not_scanned)
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"
