"""SARIF 2.1.0 log for code-scanning dashboards (GitHub, GitLab, Azure DevOps).

One run per invocation, however many models were scanned. tool.driver.rules is the whole
catalog in catalog order, so a result's ruleIndex is stable across runs. The model file is
the artifact; ONNX node / tensor names go in logicalLocations (they are not source lines).
Errors and skipped models become toolExecutionNotifications, so a dashboard shows that a
model was not checked instead of showing nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import __version__
from ..findings import Finding, ScanResult, Severity
from ..policy import Catalog, Rule
from .json_report import json_safe

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"

_LEVEL = {Severity.CRITICAL: "error", Severity.HIGH: "error", Severity.MEDIUM: "warning",
          Severity.LOW: "note", Severity.INFO: "note"}
# GitHub code scanning ranks security alerts by this CVSS-like score (a string, 0.0-10.0).
_SECURITY_SEVERITY = {Severity.CRITICAL: "9.5", Severity.HIGH: "8.0", Severity.MEDIUM: "5.5",
                      Severity.LOW: "3.0", Severity.INFO: "0.0"}


def sarif_level(severity: Severity) -> str:
    return _LEVEL[severity]


def artifact_uri(path: str) -> str:
    """A URI reference for a model path: file:// for absolute paths, relative otherwise."""
    p = Path(path)
    if p.is_absolute():
        return p.as_uri()
    return quote(p.as_posix(), safe="/")


def _rule(rule: Rule) -> dict[str, Any]:
    return {
        "id": rule.id,
        "name": rule.name,
        "shortDescription": {"text": rule.name.replace("-", " ")},
        "fullDescription": {"text": rule.description},
        "help": {"text": rule.remediation},
        "defaultConfiguration": {"level": sarif_level(rule.severity)},
        "properties": {"tags": ["security", "onnx", "backdoor"],
                       "security-severity": _SECURITY_SEVERITY[rule.severity],
                       "severity": rule.severity.name.lower()},
    }


def _fingerprint(result: ScanResult, finding: Finding) -> str:
    # Identifies "this rule at this place in this model" across runs, for deduplication.
    model_id = result.model.sha256 if result.model else result.model_path
    key = "\x1f".join((finding.rule_id, model_id, finding.location or ""))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _result(result: ScanResult, finding: Finding, artifact_index: int,
            catalog: Catalog) -> dict[str, Any]:
    location: dict[str, Any] = {"physicalLocation": {"artifactLocation": {
        "uri": artifact_uri(result.model_path), "index": artifact_index}}}
    if finding.location:
        location["logicalLocations"] = [{"name": finding.location,
                                         "fullyQualifiedName": finding.location}]
    out: dict[str, Any] = {"ruleId": finding.rule_id}
    if finding.rule_id in catalog:
        out["ruleIndex"] = catalog.index(finding.rule_id)
    out.update({
        "level": sarif_level(finding.severity),
        "message": {"text": finding.message},
        "locations": [location],
        "partialFingerprints": {"shapscanFinding/v1": _fingerprint(result, finding)},
        "properties": {"severity": finding.severity.name.lower(),
                       "verdict": result.verdict.value, "details": json_safe(finding.details)},
    })
    return out


def _artifact(result: ScanResult) -> dict[str, Any]:
    artifact: dict[str, Any] = {"location": {"uri": artifact_uri(result.model_path)},
                                "roles": ["analysisTarget"]}
    if result.model is not None:
        artifact["length"] = result.model.size_bytes
        artifact["hashes"] = {"sha-256": result.model.sha256}
    return artifact


def _notifications(result: ScanResult, artifact_index: int) -> list[dict[str, Any]]:
    where = [{"physicalLocation": {"artifactLocation": {
        "uri": artifact_uri(result.model_path), "index": artifact_index}}}]
    notes = [{"level": "error", "message": {"text": text}, "locations": where}
             for text in result.errors]
    notes += [{"level": "warning", "message": {"text": f"skipped: {text}"}, "locations": where}
              for text in result.skipped]
    return notes


def sarif_dict(results: Sequence[ScanResult], catalog: Catalog,
               not_scanned: Sequence[str] | None = None) -> dict[str, Any]:
    """`not_scanned` (an interrupted run, see json_report.report_dict) makes the log
    partial: the invocation failed with exit code 130 and a notification names the models
    that were not scanned."""
    artifacts = [_artifact(r) for r in results]
    sarif_results = [_result(r, f, i, catalog)
                     for i, r in enumerate(results) for f in r.findings]
    notifications = [n for i, r in enumerate(results) for n in _notifications(r, i)]
    invocation: dict[str, Any] = {
        "executionSuccessful": not_scanned is None and not any(r.errors for r in results),
        "toolExecutionNotifications": notifications}
    if not_scanned is not None:
        invocation.update(exitCode=130, exitSignalName="SIGINT")
        notifications.append({"level": "error", "message": {"text": (
            f"interrupted: {len(results)} of {len(results) + len(not_scanned)} models "
            f"scanned; not scanned: {', '.join(not_scanned)}")}})
    run = {
        "tool": {"driver": {"name": "shapscan", "version": __version__,
                            "semanticVersion": __version__,
                            "rules": [_rule(rule) for rule in catalog]}},
        "invocations": [invocation],
        "artifacts": artifacts,
        "results": sarif_results,
        "columnKind": "unicodeCodePoints",
        "properties": {"models": [{"path": r.model_path, "verdict": r.verdict.value}
                                  for r in results], "partial": not_scanned is not None},
    }
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def render_sarif(results: Sequence[ScanResult], catalog: Catalog,
                 not_scanned: Sequence[str] | None = None) -> str:
    return json.dumps(sarif_dict(results, catalog, not_scanned), indent=2,
                      allow_nan=False) + "\n"
