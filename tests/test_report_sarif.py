"""SARIF 2.1.0 output, validated against the vendored official OASIS schema (errata 01)."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest
from report_fixtures import (
    backdoor_result,
    clean_result,
    error_result,
    inconclusive_result,
    suspicious_result,
)

from scanner.findings import Finding, ScanResult, Severity, Verdict
from scanner.policy import load_catalog
from scanner.report import render_sarif
from scanner.report.sarif import artifact_uri, sarif_level


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft4Validator:
    schemas = resources.files("scanner.rules").joinpath("schemas")
    text = schemas.joinpath("sarif-schema-2.1.0.json").read_text()
    schema = json.loads(text)
    assert schema["id"].endswith("/sarif-schema-2.1.0.json")
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def sarif(results: list[ScanResult]) -> dict:
    return json.loads(render_sarif(results, load_catalog()))


@pytest.mark.parametrize("results", [
    [backdoor_result()], [clean_result()], [error_result()], [inconclusive_result()], [],
    [backdoor_result(), suspicious_result(), error_result(), inconclusive_result()],
], ids=["backdoor", "clean", "error", "inconclusive", "empty", "mixed"])
def test_validates_against_official_schema(validator: jsonschema.Draft4Validator,
                                           results: list[ScanResult]) -> None:
    log = sarif(results)
    errors = sorted(validator.iter_errors(log), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
    assert log["version"] == "2.1.0" and len(log["runs"]) == 1


def test_rules_come_from_catalog_and_rule_index_points_at_them() -> None:
    catalog = load_catalog()
    run = sarif([backdoor_result(), error_result(), suspicious_result()])["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == list(catalog.ids)
    ss201 = rules[catalog.index("SS201")]
    assert ss201["name"] == "backdoor-detected"
    assert ss201["fullDescription"]["text"] == catalog.get("SS201").description
    assert ss201["help"]["text"] == catalog.get("SS201").remediation
    assert ss201["defaultConfiguration"]["level"] == "error"
    assert rules[catalog.index("SS202")]["defaultConfiguration"]["level"] == "warning"
    assert rules[catalog.index("SS108")]["defaultConfiguration"]["level"] == "note"
    assert len(run["results"]) == 4  # SS201 + SS301, SS102, SS202
    for result in run["results"]:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]


@pytest.mark.parametrize(("severity", "level"), [
    (Severity.CRITICAL, "error"), (Severity.HIGH, "error"), (Severity.MEDIUM, "warning"),
    (Severity.LOW, "note"), (Severity.INFO, "note")])
def test_level_follows_the_finding_severity(severity: Severity, level: str) -> None:
    assert sarif_level(severity) == level
    # an override changed SS201's severity: the result level follows the finding
    result = ScanResult("m.onnx", Verdict.BACKDOOR,
                        findings=[Finding("SS201", severity, "class 3", "logits")])
    assert sarif([result])["runs"][0]["results"][0]["level"] == level


def test_locations_artifacts_and_logical_locations() -> None:
    run = sarif([clean_result(), backdoor_result()])["runs"][0]
    assert [a["location"]["uri"] for a in run["artifacts"]] == [
        "samples/models/cnn_clean.onnx", "samples/models/cnn_badnets.onnx"]
    assert run["artifacts"][1]["hashes"]["sha-256"] == backdoor_result().model.sha256
    ss201 = run["results"][0]
    loc = ss201["locations"][0]
    assert loc["physicalLocation"]["artifactLocation"] == {
        "uri": "samples/models/cnn_badnets.onnx", "index": 1}
    assert loc["logicalLocations"] == [{"name": "logits", "fullyQualifiedName": "logits"}]
    assert "logicalLocations" not in run["results"][1]["locations"][0]  # SS301: no node
    assert ss201["partialFingerprints"]["shapscanFinding/v1"] != \
        run["results"][1]["partialFingerprints"]["shapscanFinding/v1"]


def test_errors_and_skips_are_notifications() -> None:
    run = sarif([error_result(), inconclusive_result()])["runs"][0]
    invocation = run["invocations"][0]
    assert invocation["executionSuccessful"] is False
    levels = [n["level"] for n in invocation["toolExecutionNotifications"]]
    assert levels == ["error", "warning"]
    assert sarif([clean_result()])["runs"][0]["invocations"][0]["executionSuccessful"]


def test_artifact_uri_forms(tmp_path) -> None:
    assert artifact_uri("models/a b.onnx") == "models/a%20b.onnx"
    absolute = tmp_path / "m.onnx"
    assert artifact_uri(str(absolute)) == absolute.as_uri()


def test_schema_catches_a_malformed_log(validator: jsonschema.Draft4Validator) -> None:
    log = sarif([backdoor_result()])
    log["runs"][0]["results"][0]["level"] = "fatal"
    del log["runs"][0]["tool"]["driver"]["name"]
    assert len(list(validator.iter_errors(log))) >= 2
