"""JSON report: schema "shapscan-report/1", validated against rules/schemas/report.schema.json."""

from __future__ import annotations

import json
import math
from importlib import resources

import jsonschema
import numpy as np
import pytest
from report_fixtures import (
    backdoor_result,
    clean_result,
    error_result,
    inconclusive_result,
    suspicious_result,
)

from scanner.findings import Finding, ScanResult, Severity, Verdict
from scanner.report import SCHEMA_ID, render_json, to_dict, write_report


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    text = resources.files("scanner.rules").joinpath("schemas", "report.schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


ALL = [backdoor_result, clean_result, suspicious_result, error_result, inconclusive_result]


@pytest.mark.parametrize("make", ALL, ids=lambda f: f.__name__)
def test_each_outcome_validates(validator: jsonschema.Draft202012Validator, make) -> None:
    doc = json.loads(render_json([make()], fail_on=Severity.HIGH))
    validator.validate(doc)
    assert doc["schema"] == SCHEMA_ID == "shapscan-report/1"


def test_multi_model_report_and_gate(validator: jsonschema.Draft202012Validator) -> None:
    doc = json.loads(render_json([clean_result(), backdoor_result(), error_result()],
                                 fail_on=Severity.HIGH))
    validator.validate(doc)
    assert [r["verdict"] for r in doc["results"]] == ["clean", "backdoor", "error"]
    assert doc["gate"] == {"fail_on": "high", "exit_code": 2}
    assert "gate" not in json.loads(render_json([clean_result()]))


def test_backdoor_result_content() -> None:
    d = to_dict(backdoor_result())
    assert d["verdict"] == "backdoor" and d["max_severity"] == "critical"
    assert d["findings"][0]["rule_id"] == "SS201" and d["findings"][0]["severity"] == "critical"
    assert d["model"]["channels_total"] == 416 and len(d["model"]["layers"]) == 4
    assert d["model"]["inputs"] == [{"name": "input", "shape": ["N", 1, 28, 28]}]
    det = d["detection"]
    assert det["flagged_targets"] == [3] and len(det["classes"]) == 10
    assert det["views"] == [{"inputs": "few-shot", "decision_score": 1.6}]
    assert det["classes"][3]["flagged"] and det["classes"][3]["anomaly_index"] > 2.0
    rep = d["repair"]
    assert rep["pruned_count"] == 4 and rep["pruned_fraction"] == pytest.approx(4 / 416)
    assert rep["before"] == {"reversed_asr": 1.0, "target_probability": 0.97, "fewshot_acc": 1.0}
    assert rep["after"] == {"reversed_asr": 0.0, "target_probability": 0.002,
                            "fewshot_acc": 1.0}
    assert [c["channel"] for c in rep["pruned"]] == [77, 5, 41, 150]
    assert len(rep["top_channels"]) == 8
    assert rep["given_back"] == [{"layer": "/features/relu2/Relu_output_0", "channel": 17,
                                  "shapley": 0.031, "clean": 0.044, "pruned": False}]
    assert d["timings"]["shapley"] == pytest.approx(7.35)
    assert (d["device"], d["seed"], d["tool_version"]) == ("cpu", 0, "0.1.0")


def test_arrays_stay_out_of_json() -> None:
    text = render_json([backdoor_result()])
    doc = json.loads(text)
    assert "masks" not in doc["results"][0]["detection"]
    assert "patterns" not in text and "examples" not in text
    # a small array in finding details becomes a list; large ones are summarised
    assert doc["results"][0]["findings"][1]["details"]["channels"] == [77, 5, 41, 150]
    result = ScanResult("m.onnx", Verdict.CLEAN, findings=[Finding(
        "SS108", Severity.INFO, "x", details={"big": np.zeros((64, 64), np.float32),
                                             "scalar": np.float32(0.5),
                                             "severity": Severity.LOW})])
    details = to_dict(result)["findings"][0]["details"]
    assert details == {"big": {"shape": [64, 64], "dtype": "float32"}, "scalar": 0.5,
                       "severity": "low"}


def test_non_finite_numbers_become_null(validator: jsonschema.Draft202012Validator) -> None:
    result = clean_result()
    for c in result.detection.classes:  # every mask the same norm: MAD = 0
        c.anomaly_index = math.nan
    result.detection.classes[0].anomaly_index = math.inf
    result.timings["shapley"] = math.nan
    text = render_json([result])  # allow_nan=False: raises if anything slipped through
    doc = json.loads(text)
    validator.validate(doc)
    assert doc["results"][0]["detection"]["classes"][0]["anomaly_index"] is None
    assert doc["results"][0]["timings"]["shapley"] is None


def test_schema_rejects_drift(validator: jsonschema.Draft202012Validator) -> None:
    doc = json.loads(render_json([backdoor_result()]))
    doc["results"][0]["surprise"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(doc)


def test_write_report_is_atomic(tmp_path) -> None:
    target = tmp_path / "report.json"
    write_report(target, render_json([clean_result()]))
    assert json.loads(target.read_text())["schema"] == SCHEMA_ID
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left


def test_clean_result_lists_both_views_with_their_scores() -> None:
    views = to_dict(clean_result())["detection"]["views"]
    assert views == [{"inputs": "few-shot", "decision_score": 0.62},
                     {"inputs": "synthesised", "decision_score": 0.71}]
