"""`shapscan rules`: list the rule catalog; with --policy, validate a policy file and show
each rule's effective severity under it (a quick check for CI authors)."""

from __future__ import annotations

import click

from ..cli import cli, echo_json
from ..policy import Catalog, Policy, load_catalog, load_policy


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


@cli.command("rules")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
@click.option("--policy", "policy_name", default=None, metavar="NAME|FILE",
              help="Validate a policy (default, strict, permissive or a .toml file) and show "
                   "each rule's severity under it. A bad policy exits with code 4.")
def rules_cmd(as_json: bool, policy_name: str | None) -> int:
    """List the rule ids shapscan findings carry, with default severities."""
    catalog = load_catalog()
    policy = load_policy(policy_name) if policy_name is not None else None
    if as_json:
        items = []
        for rule in catalog:
            item: dict[str, object] = {"id": rule.id, "name": rule.name,
                                       "severity": rule.severity.name.lower(),
                                       "description": rule.description,
                                       "remediation": rule.remediation}
            if policy is not None:
                effective = policy.severity_of(rule)
                item["effective_severity"] = (effective.name.lower() if effective is not None
                                              else None)
                item["suppressed"] = effective is None
            items.append(item)
        payload: dict[str, object] = {"rules": items}
        if policy is not None:
            payload["policy"] = policy.to_dict()
        echo_json(payload)
        return 0
    if policy is not None:
        click.echo(_summary(policy))
    click.echo(_table(catalog, policy))
    return 0
