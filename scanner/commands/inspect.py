"""`shapscan inspect`: what the scanner sees in a model, and whether it would load it."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import cli, echo_json
from ..errors import Inconclusive
from ..graph.activations import discover, discovery_findings
from ..graph.load import load_model
from ..graph.quantized import QUANTIZED_HINT, quantized
from .common import require_path


def _axis(rank: int, axis: int) -> str:
    """Where the channels sit, e.g. `3 of [N,H,W,C]`."""
    dims = {2: ["N", "C"], 3: ["N", "T", "C"], 4: ["N", "H", "W", "C"]}.get(rank)
    if dims is None or axis not in (1, rank - 1):
        return f"{axis} of rank {rank}"
    if axis == 1 and rank == 4:
        dims = ["N", "C", "H", "W"]
    if axis == 1 and rank == 3:
        dims = ["N", "C", "L"]
    return f"{axis} of [{','.join(dims)}]"


def _shape(shape: list[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--allow-domain", "allowed", multiple=True, metavar="DOMAIN",
              help="Accept ops from this custom domain (repeatable).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None,
              help="Refuse models (with external data) larger than this.")
def inspect_cmd(model: Path, as_json: bool, allowed: tuple[str, ...],
                max_bytes: int | None) -> int:
    """Activation layers, inputs/outputs, opset, size, SHA-256 and load findings of MODEL.

    Exit 2 when the model is refused, 3 when it has no activation layers to scan, 4 when
    MODEL does not exist.
    """
    require_path(model)
    loaded = load_model(model, allowed_domains=allowed, max_bytes=max_bytes)
    found = discover(loaded.analysed)
    layers = found.layers
    findings = [*loaded.findings, *discovery_findings(found)]
    summary = loaded.summary(layers)
    if as_json:
        echo_json({
            "model": summary.path, "sha256": summary.sha256, "size_bytes": summary.size_bytes,
            "opset": summary.opset,
            "inputs": [{"name": n, "shape": s} for n, s in summary.inputs],
            "outputs": [{"name": n, "shape": s} for n, s in summary.outputs],
            "layers": [{"name": la.name, "op": la.op, "node": la.node, "channels": la.channels,
                        "rank": la.rank, "axis": la.axis} for la in layers],
            "gates": [{"name": g.name, "op": g.op, "gates": g.reason.removeprefix("gate of ")}
                      for g in found.gates],
            "channels_total": summary.channels_total,
            "findings": [{"rule_id": f.rule_id, "severity": f.severity.name.lower(),
                          "message": f.message, "location": f.location}
                         for f in findings],
        })
    else:
        rows = [("model", summary.path), ("size", f"{summary.size_bytes:,} bytes"),
                ("sha256", summary.sha256), ("opset", str(summary.opset))]
        rows += [("input", f"{n} {_shape(s)}") for n, s in summary.inputs]
        rows += [("output", f"{n} {_shape(s)}") for n, s in summary.outputs]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            click.echo(f"{key:<{width}}  {value}")
        click.echo("")
        if layers:
            name_w = max(len("layer"), *(len(la.name) for la in layers))
            op_w = max(len("op"), *(len(la.op) for la in layers))
            click.echo(f"{'#':>3}  {'layer':<{name_w}}  {'op':<{op_w}}  {'channels':>8}  "
                       "axis")
            for i, la in enumerate(layers):
                click.echo(f"{i:>3}  {la.name:<{name_w}}  {la.op:<{op_w}}  {la.channels:>8}  "
                           f"{_axis(la.rank, la.axis)}")
        click.echo(f"\n{len(layers)} activation layers, {summary.channels_total:,} channels")
        for g in found.gates:
            click.echo(f"gate {g.name} ({g.op}): squeeze-excitation gate of a layer above, "
                       "not scored (zeroing the layer's channel zeroes the gated channel)")
        if findings:
            click.echo("findings:")
            for f in findings:
                click.echo(f"  {f.rule_id} {f.severity.name.lower()}: {f.message}")
        else:
            click.echo("findings: none")
    if not layers:
        raise Inconclusive("SS204: no activation layers with a known channel count to scan"
                           + (f" ({QUANTIZED_HINT})" if quantized(loaded.proto) else ""),
                           rule_id="SS204")
    return 0
