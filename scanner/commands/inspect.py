"""`shapscan inspect`: what the scanner sees in a model, and whether it would load it."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import cli, echo_json
from ..errors import Inconclusive
from ..graph.activations import discover_activations
from ..graph.load import load_model
from ..graph.quantized import QUANTIZED_HINT, quantized


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

    Exit 2 when the model is refused, 3 when it has no activation layers to scan.
    """
    loaded = load_model(model, allowed_domains=allowed, max_bytes=max_bytes)
    layers = discover_activations(loaded.analysed)
    summary = loaded.summary(layers)
    if as_json:
        echo_json({
            "model": summary.path, "sha256": summary.sha256, "size_bytes": summary.size_bytes,
            "opset": summary.opset,
            "inputs": [{"name": n, "shape": s} for n, s in summary.inputs],
            "outputs": [{"name": n, "shape": s} for n, s in summary.outputs],
            "layers": [{"name": la.name, "op": la.op, "node": la.node, "channels": la.channels,
                        "rank": la.rank} for la in layers],
            "channels_total": summary.channels_total,
            "findings": [{"rule_id": f.rule_id, "severity": f.severity.name.lower(),
                          "message": f.message, "location": f.location}
                         for f in loaded.findings],
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
            click.echo(f"{'#':>3}  {'layer':<{name_w}}  {'op':<{op_w}}  {'channels':>8}")
            for i, la in enumerate(layers):
                click.echo(f"{i:>3}  {la.name:<{name_w}}  {la.op:<{op_w}}  {la.channels:>8}")
        click.echo(f"\n{len(layers)} activation layers, {summary.channels_total:,} channels")
        if loaded.findings:
            click.echo("findings:")
            for f in loaded.findings:
                click.echo(f"  {f.rule_id} {f.severity.name.lower()}: {f.message}")
        else:
            click.echo("findings: none")
    if not layers:
        raise Inconclusive("SS204: no activation layers with a known channel count to scan"
                           + (f" ({QUANTIZED_HINT})" if quantized(loaded.proto) else ""),
                           rule_id="SS204")
    return 0
