"""`shapscan rules RULE_ID`: one rule explained, through the real entry point."""

from __future__ import annotations

import json

import pytest

from scanner.cli import main


def test_one_rule_is_explained_with_its_severity_description_and_remediation(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "SS302"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "SS302 repair-target-not-reached"
    assert lines[1] == "severity: high (default)"
    assert lines[2] == "description:" and "remediation:" in lines
    description = " ".join(lines[3:lines.index("remediation:")])
    assert "reversed trigger" in description
    assert all(len(line) <= 88 for line in lines)
    # any case; under a policy the effective severity is shown too
    assert main(["rules", "ss203", "--policy", "strict"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == \
        "severity: info (default), medium under policy strict"


def test_one_rule_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "SS201", "--json"]) == 0
    rule = json.loads(capsys.readouterr().out)
    assert rule["id"] == "SS201" and rule["severity"] == "critical"
    assert rule["description"] and rule["remediation"]


def test_an_unknown_rule_id_is_a_usage_error_in_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "SS999"]) == 4
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "unknown rule id 'SS999'" in captured.err
