"""The CI/CD gate: one pure function from scan results to the process exit code."""

from __future__ import annotations

import enum
from collections.abc import Sequence

from .findings import ScanResult, Severity, Verdict


class ExitCode(enum.IntEnum):
    CLEAN = 0  # every model scanned, no finding at or above --fail-on
    FINDINGS = 1  # a finding at or above --fail-on (e.g. SS201 backdoor-detected)
    ERROR = 2  # an error or a refused model (SS1xx refusal, unreadable data, a crash)
    INCONCLUSIVE = 3  # a model could not be scanned behaviourally, or nothing was scanned
    USAGE = 4  # bad flag or policy file: raised as UsageError before any scan, never here
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): the CLI's, never computed here


# Higher rank wins when several models disagree.
_PRECEDENCE = {ExitCode.CLEAN: 0, ExitCode.INCONCLUSIVE: 1, ExitCode.FINDINGS: 2,
               ExitCode.ERROR: 3}


def result_code(result: ScanResult, fail_on: Severity) -> ExitCode:
    """The exit code of one model's result (see `exit_code` for the rules)."""
    if result.errors or result.verdict is Verdict.ERROR:
        return ExitCode.ERROR
    if any(f.severity >= fail_on for f in result.findings):
        return ExitCode.FINDINGS
    if result.verdict is Verdict.INCONCLUSIVE:
        return ExitCode.INCONCLUSIVE
    return ExitCode.CLEAN


def exit_code(results: Sequence[ScanResult], fail_on: Severity) -> int:
    """Exit code of a scan run over one or several models.

    Per model:
      2  the result has errors or its verdict is ERROR (refused model, bad data, crash).
         An error wins over findings: a model that could not be fully checked must never
         pass, and its findings are still in the report.
      1  a finding with severity >= fail_on. Findings are taken as given: the caller has
         already applied the policy (overrides, suppressions), so a suppressed or
         downgraded rule does not fail the gate — that is the policy author's decision.
      3  verdict INCONCLUSIVE with no finding at or above fail_on (no activations,
         operator without a gradient rule).
      0  otherwise (CLEAN, or BACKDOOR whose findings are all below fail_on).

    Several models: the most severe code wins with precedence 2 > 1 > 3 > 0, so one
    refused model fails the run even when another has a backdoor, and a backdoor is not
    hidden behind another model's inconclusive result. An empty `results` (nothing was
    scanned, e.g. an empty folder) is 3: a gate that scanned nothing must not report clean.

    Exit code 4 (usage error: bad flag, bad policy) never comes from here: it is raised
    as UsageError while parsing arguments, before any model is scanned.
    """
    if not results:
        return ExitCode.INCONCLUSIVE
    codes = (result_code(r, fail_on) for r in results)
    return max(codes, key=_PRECEDENCE.__getitem__)
