"""`shapscan rules`: list the rule catalog, or explain one rule (`shapscan rules SS302`);
with --policy, validate a policy file and show each rule's effective severity under it (a
quick check for CI authors)."""

from __future__ import annotations

import textwrap

import click

from ..cli import cli, echo_json
from ..errors import UsageError
from ..policy import Catalog, Policy, Rule, load_catalog, load_policy


def _table(catalog: Catalog, policy: Policy | None) -> str:
    header = ["ID", "NAME", "DEFAULT"]
    if policy is not None:
        header.append(policy.name.upper())
    rows = [header]
    for rule in catalog:
        row = [rule.id, rule.name, rule.severity.name.lower()]
        if policy is not None:
            effective = policy.severity_of(rule)
            row.append("suppressed" if effective is None else effective.name.lower())
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _summary(policy: Policy) -> str:
    d, r, s = policy.detection, policy.repair, policy.shapley
    return (f"policy {policy.name}: fail_on={policy.fail_on.name.lower()} "
            f"anomaly_threshold={d.anomaly_threshold:g} warn_threshold={d.warn_threshold:g} "
            f"repair={'on' if r.enabled else 'off'} target_asr={r.target_asr:g} "
            f"target_probability={r.target_probability:g} "
            f"max_channel_fraction={r.max_channel_fraction:g} "
            f"max_clean_drop={r.max_clean_drop:g} permutations={s.permutations}")


def _explain(rule: Rule, policy: Policy | None) -> str:
    """One rule as a reviewer reads it: id and name, severity, what it means, what to do."""
    def para(text: str) -> str:
        return textwrap.fill(" ".join(text.split()), width=88, initial_indent="  ",
                             subsequent_indent="  ")

    severity = f"severity: {rule.severity.name.lower()} (default)"
    if policy is not None:
        effective = policy.severity_of(rule)
        severity += (f", {'suppressed' if effective is None else effective.name.lower()} "
                     f"under policy {policy.name}")
    return "\n".join([f"{rule.id} {rule.name}", severity, "description:",
                      para(rule.description), "remediation:", para(rule.remediation)])


def _item(rule: Rule, policy: Policy | None) -> dict[str, object]:
    item: dict[str, object] = {"id": rule.id, "name": rule.name,
                               "severity": rule.severity.name.lower(),
                               "description": rule.description,
                               "remediation": rule.remediation}
    if policy is not None:
        effective = policy.severity_of(rule)
        item["effective_severity"] = effective.name.lower() if effective is not None else None
        item["suppressed"] = effective is None
    return item


@cli.command("rules")
@click.argument("rule_id", required=False, metavar="[RULE_ID]")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog (or the rule) as JSON.")
@click.option("--policy", "policy_name", default=None, metavar="NAME|FILE",
              help="Validate a policy (default, strict, permissive or a .toml file) and show "
                   "each rule's severity under it. A bad policy exits with code 4.")
def rules_cmd(rule_id: str | None, as_json: bool, policy_name: str | None) -> int:
    """List the rule ids shapscan findings carry, with default severities; with RULE_ID
    (e.g. SS302), explain that rule: name, severity, description, remediation."""
    catalog = load_catalog()
    policy = load_policy(policy_name) if policy_name is not None else None
    if rule_id is not None:
        wanted = rule_id.strip().upper()
        if wanted not in catalog:
            raise UsageError(f"unknown rule id {rule_id!r}: `shapscan rules` lists them "
                             f"({catalog.ids[0]}..{catalog.ids[-1]})")
        rule = catalog.get(wanted)
        if as_json:
            echo_json(_item(rule, policy))
        else:
            click.echo(_explain(rule, policy))
        return 0
    if as_json:
        payload: dict[str, object] = {"rules": [_item(rule, policy) for rule in catalog]}
        if policy is not None:
            payload["policy"] = policy.to_dict()
        echo_json(payload)
        return 0
    if policy is not None:
        click.echo(_summary(policy))
    click.echo(_table(catalog, policy))
    return 0
