"""Rule catalog and gate policies: built-ins, apply(), and every way a policy file is wrong."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from scanner.cli import main
from scanner.errors import UsageError
from scanner.findings import Finding, Severity
from scanner.policy import BUILTIN_POLICIES, Policy, load_catalog, load_policy

RULE_IDS = [f"SS1{n:02d}" for n in range(1, 17)] + [f"SS2{n:02d}" for n in range(1, 14)] + [
    "SS301", "SS302", "SS303", "SS304", "SS305", "SS306"]


def test_catalog_lists_every_stable_rule_id_in_order() -> None:
    catalog = load_catalog()
    assert list(catalog.ids) == RULE_IDS
    for rule in catalog:
        assert rule.name and len(rule.description) > 40 and len(rule.remediation) > 40
        assert "\n" not in rule.description  # TOML line continuations were folded
    assert catalog.index("SS201") == RULE_IDS.index("SS201")


@pytest.mark.parametrize(("rule_id", "severity"), [
    ("SS101", Severity.HIGH), ("SS102", Severity.CRITICAL), ("SS103", Severity.CRITICAL),
    ("SS104", Severity.CRITICAL), ("SS108", Severity.INFO), ("SS112", Severity.HIGH),
    ("SS201", Severity.CRITICAL), ("SS202", Severity.MEDIUM), ("SS203", Severity.INFO),
    ("SS204", Severity.LOW), ("SS205", Severity.LOW), ("SS208", Severity.LOW),
    ("SS301", Severity.INFO), ("SS302", Severity.HIGH), ("SS303", Severity.MEDIUM),
    ("SS304", Severity.HIGH)])
def test_catalog_default_severities(rule_id: str, severity: Severity) -> None:
    assert load_catalog().get(rule_id).severity is severity


def test_catalog_make_uses_default_severity_and_keeps_details() -> None:
    finding = load_catalog().make("SS201", "class 3 flagged", "logits", target=3)
    assert finding == Finding("SS201", Severity.CRITICAL, "class 3 flagged", "logits")
    assert finding.details == {"target": 3}
    with pytest.raises(KeyError, match="SS999"):
        load_catalog().make("SS999", "nope")


def test_builtin_policies_order_from_strict_to_permissive() -> None:
    strict, default, permissive = (load_policy(n) for n in ("strict", "default", "permissive"))
    assert default == Policy()  # default.toml spells out the dataclass defaults
    assert (strict.fail_on, default.fail_on, permissive.fail_on) == (
        Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL)
    assert (strict.detection.anomaly_threshold < default.detection.anomaly_threshold
            < permissive.detection.anomaly_threshold)
    assert strict.repair.target_asr < default.repair.target_asr < permissive.repair.target_asr
    assert (strict.repair.target_probability < default.repair.target_probability
            < permissive.repair.target_probability)
    assert (strict.repair.max_channel_fraction < default.repair.max_channel_fraction
            < permissive.repair.max_channel_fraction)
    assert (strict.repair.recover.max_channel_fraction
            < default.repair.recover.max_channel_fraction
            < permissive.repair.recover.max_channel_fraction)
    assert (strict.repair.max_clean_drop < default.repair.max_clean_drop
            < permissive.repair.max_clean_drop)
    assert {p.name for p in (strict, default, permissive)} == set(BUILTIN_POLICIES)
    # only fast triage skips the second look on synthesised inputs
    assert (strict.detection.synthesised_view, default.detection.synthesised_view,
            permissive.detection.synthesised_view) == (True, True, False)


def test_policy_is_frozen_and_hashable() -> None:
    policy = load_policy("strict")
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.fail_on = Severity.LOW  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.overrides["SS201"] = Severity.LOW  # type: ignore[index]
    assert hash(policy) == hash(load_policy("strict"))


def test_apply_overrides_and_suppresses_keeping_order() -> None:
    policy = Policy(overrides={"SS202": Severity.HIGH}, suppress=frozenset({"SS203"}))
    findings = [Finding("SS202", Severity.MEDIUM, "weak class 6"),
                Finding("SS203", Severity.INFO, "no BN prior"),
                Finding("SS201", Severity.CRITICAL, "class 3")]
    out = policy.apply(findings)
    assert [(f.rule_id, f.severity) for f in out] == [("SS202", Severity.HIGH),
                                                       ("SS201", Severity.CRITICAL)]
    assert findings[0].severity is Severity.MEDIUM  # input untouched


def test_user_policy_extends_a_builtin_and_adds_overrides(tmp_path: Path) -> None:
    path = tmp_path / "ci.toml"
    path.write_text('extends = "strict"\nsuppress = ["SS108"]\n[repair]\ntarget_asr = 0.01\n'
                    '[overrides]\nSS202 = "critical"\n')
    policy = load_policy(path)
    strict = load_policy("strict")
    assert policy.name == "ci"
    assert policy.fail_on is Severity.MEDIUM and policy.detection == strict.detection
    assert policy.repair == dataclasses.replace(strict.repair, target_asr=0.01)
    assert dict(policy.overrides) == {**strict.overrides, "SS202": Severity.CRITICAL}
    assert policy.suppress == frozenset({"SS108"})
    assert policy.severity_of(load_catalog().get("SS108")) is None


def test_repair_recover_sub_table_overrides_only_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('extends = "strict"\n[repair]\ntarget_asr = 0.01\n[repair.recover]\n'
                    'enabled = true\nsteps = 50\nparameters = ["BatchNormalization"]\n')
    policy = load_policy(path)
    base = load_policy("strict").repair.recover
    assert policy.repair.target_asr == 0.01
    assert policy.repair.recover == dataclasses.replace(
        base, enabled=True, steps=50, parameters=("BatchNormalization",))


def test_the_fast_plan_sub_table_and_what_taking_it_changes(tmp_path: Path) -> None:
    """[detection.fast] overrides only its keys; DetectionPolicy.fast_plan() is the policy
    the scan switches to (the sweep; the fast shortlist, reference, rows and synthesis;
    shortlisted above shortlist + reference classes), everything else kept."""
    path = tmp_path / "p.toml"
    path.write_text('[detection]\nscreen = "sweep"\nanomaly_threshold = 3.0\n'
                    "[detection.fast]\nreference_classes = 20\n")
    det = load_policy(path).detection
    assert det.screen == "sweep" and det.fast.reference_classes == 20
    assert det.fast == dataclasses.replace(load_policy("default").detection.fast,
                                           reference_classes=20)
    fast = det.fast_plan()
    assert (fast.screen, fast.shortlist, fast.reference_classes, fast.shortlist_over) == (
        "sweep", det.fast.shortlist, 20, det.fast.shortlist + 20)
    assert fast.reverse_rows == det.fast.reverse_rows
    assert fast.synthesised_classes == det.fast.synthesised_classes
    assert fast.anomaly_threshold == 3.0 and fast.reverse_steps == det.reverse_steps
    # the evidence beside the norms is gathered by the fast plan only for a decision that
    # uses it
    assert det.evidence and not fast.evidence
    floor = dataclasses.replace(det, selectivity_floor=-0.5)
    assert floor.evidence_decides and floor.fast_plan().evidence


def test_integers_are_accepted_for_float_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[detection]\nanomaly_threshold = 3\n")
    assert load_policy(str(path)).detection.anomaly_threshold == 3.0


BAD_POLICIES = [
    ("unknown-top", 'fial_on = "high"\n', "fial_on", "unknown key"),
    ("unknown-key", "[detection]\nanomaly_treshold = 2.0\n", "detection.anomaly_treshold",
     "unknown key"),
    ("unknown-section-type", 'detection = "strict"\n', "detection", "expected a table"),
    ("unknown-rule-override", '[overrides]\nSS999 = "high"\n', "overrides.SS999",
     "unknown rule id"),
    ("unknown-rule-suppress", 'suppress = ["SS201", "SS2O1"]\n', "suppress",
     "unknown rule id"),
    ("bad-severity", 'fail_on = "severe"\n', "fail_on", "unknown severity"),
    ("bad-screen", '[detection]\nscreen = "bandit"\n', "detection.screen",
     "expected one of classes, sweep"),
    ("screen-not-a-string", "[detection]\nscreen = 1\n", "detection.screen",
     "expected one of classes, sweep"),
    ("fast-reference-too-small", "[detection.fast]\nreference_classes = 2\n",
     "detection.fast.reference_classes", "out of range"),
    ("bad-override-severity", '[overrides]\nSS202 = 3\n', "overrides.SS202",
     "expected a severity name"),
    ("bad-type-int", '[shapley]\npermutations = "40"\n', "shapley.permutations",
     "expected an integer"),
    ("float-for-int", "[shapley]\npermutations = 40.5\n", "shapley.permutations",
     "expected an integer"),
    ("bad-type-bool", "[repair]\nenabled = 1\n", "repair.enabled", "expected true or false"),
    ("bad-type-float", "[repair]\ntarget_asr = true\n", "repair.target_asr",
     "expected a number"),
    ("bad-type-list", "[load]\nallowed_domains = [1]\n", "load.allowed_domains",
     "expected a list of strings"),
    ("range-asr", "[repair]\ntarget_asr = 1.5\n", "repair.target_asr", "out of range"),
    ("range-fraction", "[repair]\nmax_channel_fraction = 0.0\n",
     "repair.max_channel_fraction", "out of range"),
    ("range-permutations", "[shapley]\npermutations = 0\n", "shapley.permutations",
     "out of range"),
    ("range-steps", "[detection]\nsecond_view_steps = 0\n", "detection.second_view_steps",
     "out of range"),
    ("float-steps", "[detection]\nreverse_steps = 99.5\n", "detection.reverse_steps",
     "expected an integer"),
    ("range-truncation", "[shapley]\ntruncation = 1.0\n", "shapley.truncation",
     "out of range"),
    ("range-nan", "[detection]\nanomaly_threshold = nan\n", "detection.anomaly_threshold",
     "nan"),
    ("warn-above-flag", "[detection]\nwarn_threshold = 3.5\n", "detection.warn_threshold",
     "above detection.anomaly_threshold"),
    ("recover-unknown-key", "[repair.recover]\nstep = 3\n", "repair.recover.step",
     "unknown key"),
    ("recover-not-table", "[repair]\nrecover = 3\n", "repair.recover", "expected a table"),
    ("recover-bad-op", '[repair.recover]\nparameters = ["Conv", "Relu"]\n',
     "repair.recover.parameters", "unknown Relu"),
    ("recover-range-lr", "[repair.recover]\nlr = 0\n", "repair.recover.lr", "out of range"),
    ("bad-extends", 'extends = "paranoid"\n', "extends", "expected one of"),
    ("bad-name", "name = 3\n", "name", "non-empty string"),
    ("not-toml", "fail_on = \n", None, "not valid TOML"),
]


@pytest.mark.parametrize(("text", "key", "problem"), [b[1:] for b in BAD_POLICIES],
                         ids=[b[0] for b in BAD_POLICIES])
def test_bad_policy_is_usage_error_naming_file_and_key(
        tmp_path: Path, text: str, key: str | None, problem: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_policy(str(path))
    message = str(info.value)
    assert message.startswith(f"policy {path}: ")
    assert "\n" not in message and problem in message
    if key is not None:
        assert f": {key}: " in message


@pytest.mark.parametrize(("text", "key"), [(b[1], b[2]) for b in BAD_POLICIES[:3]] + [
    ("[repair]\ntarget_asr = 2\n", "repair.target_asr")])
def test_cli_rules_policy_rejects_bad_file_with_exit_4(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["rules", "--policy", str(path)]) == 4
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and key in err


def test_cli_rules_policy_missing_file_exit_4(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["rules", "--policy", str(missing)]) == 4
    err = capsys.readouterr().err
    assert f"policy {missing}: no such file" in err


def test_cli_rules_lists_catalog_and_effective_severities(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "DEFAULT"]
    assert [line.split()[0] for line in lines[1:]] == RULE_IDS
    assert main(["rules", "--policy", "strict"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("policy strict: fail_on=medium")
    ss203 = next(line for line in out.splitlines() if line.startswith("SS203"))
    assert ss203.split()[2:] == ["info", "medium"]


def test_cli_rules_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["rules", "--json", "--policy", "permissive"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in payload["rules"]] == RULE_IDS
    assert payload["policy"]["fail_on"] == "critical"
    assert all(r["effective_severity"] == r["severity"] for r in payload["rules"])
