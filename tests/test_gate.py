"""The exit-code gate as a matrix: outcome x fail_on level, then multi-model mixes."""

from __future__ import annotations

import itertools

import pytest

from scanner.findings import Finding, ScanResult, Severity, Verdict
from scanner.gate import ExitCode, exit_code
from scanner.policy import Policy


def clean() -> ScanResult:
    return ScanResult("clean.onnx", Verdict.CLEAN,
                      findings=[Finding("SS108", Severity.INFO, "opset 11 converted to 17")])


def backdoor() -> ScanResult:
    return ScanResult("bd.onnx", Verdict.BACKDOOR, findings=[
        Finding("SS201", Severity.CRITICAL, "class 3 flagged", "logits"),
        Finding("SS301", Severity.INFO, "repaired")])


def suspicious() -> ScanResult:
    return ScanResult("weak.onnx", Verdict.CLEAN,
                      findings=[Finding("SS202", Severity.MEDIUM, "class 6 suspicious")])


def error() -> ScanResult:
    return ScanResult("evil.onnx", Verdict.ERROR,
                      findings=[Finding("SS102", Severity.CRITICAL, "domain com.evil")],
                      errors=["model refused: custom op domain com.evil"])


def inconclusive() -> ScanResult:
    return ScanResult("linear.onnx", Verdict.INCONCLUSIVE,
                      findings=[Finding("SS204", Severity.LOW, "no activations")])


OUTCOMES = {"clean": clean, "backdoor": backdoor, "suspicious": suspicious, "error": error,
            "inconclusive": inconclusive}

# Expected single-model code for every outcome and fail_on level.
SINGLE = {
    # fail_on:       INFO LOW MEDIUM HIGH CRITICAL
    "clean":        (1,   0,  0,     0,   0),  # its INFO finding fails only fail_on=info
    "backdoor":     (1,   1,  1,     1,   1),
    "suspicious":   (1,   1,  1,     0,   0),
    "error":        (2,   2,  2,     2,   2),
    "inconclusive": (1,   1,  3,     3,   3),  # its LOW SS204 finding counts at info/low
}


@pytest.mark.parametrize(("outcome", "fail_on"),
                         list(itertools.product(OUTCOMES, list(Severity))))
def test_single_model_matrix(outcome: str, fail_on: Severity) -> None:
    assert exit_code([OUTCOMES[outcome]()], fail_on) == SINGLE[outcome][fail_on]


def precedence(code: int) -> int:
    return {0: 0, 3: 1, 1: 2, 2: 3}[code]


@pytest.mark.parametrize("fail_on", list(Severity))
@pytest.mark.parametrize("mix", list(itertools.combinations_with_replacement(OUTCOMES, 2))
                         + list(itertools.permutations(OUTCOMES, 3)))
def test_multi_model_most_severe_code_wins(mix: tuple[str, ...], fail_on: Severity) -> None:
    codes = [SINGLE[o][fail_on] for o in mix]
    expected = max(codes, key=precedence)
    assert exit_code([OUTCOMES[o]() for o in mix], fail_on) == expected


def test_precedence_examples() -> None:
    high = Severity.HIGH
    assert exit_code([backdoor(), error()], high) == ExitCode.ERROR  # 2 > 1
    assert exit_code([inconclusive(), backdoor()], high) == ExitCode.FINDINGS  # 1 > 3
    assert exit_code([clean(), inconclusive()], high) == ExitCode.INCONCLUSIVE  # 3 > 0
    assert exit_code([clean(), clean()], high) == ExitCode.CLEAN


def test_nothing_scanned_is_inconclusive() -> None:
    assert exit_code([], Severity.HIGH) == 3


def test_errors_fail_even_with_a_clean_verdict() -> None:
    # A partial failure (e.g. the repaired model could not be written) must not pass.
    result = ScanResult("m.onnx", Verdict.CLEAN, errors=["export failed: disk full"])
    assert exit_code([result], Severity.CRITICAL) == 2


def test_policy_applied_findings_decide_the_gate() -> None:
    # Downgrading SS201 under a policy is the policy author's choice; the gate follows it.
    result = backdoor()
    result.findings = Policy(overrides={"SS201": Severity.MEDIUM}).apply(result.findings)
    assert exit_code([result], Severity.HIGH) == 0
    assert exit_code([result], Severity.MEDIUM) == 1


def test_exit_codes_are_plain_ints() -> None:
    code = exit_code([backdoor()], Severity.HIGH)
    assert isinstance(code, int) and code == 1 and int(ExitCode.USAGE) == 4
