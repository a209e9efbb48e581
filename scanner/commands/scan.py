"""`shapscan scan`: the gate. Detect a backdoor, repair it, write reports, set the exit code."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..api import ScanOptions, scan
from ..cli import cli
from ..errors import UsageError
from ..findings import ScanResult, Severity, Verdict
from ..gate import exit_code
from ..policy import load_catalog, load_policy
from ..progress import Progress
from ..report import write_report
from .common import device_option, preprocess_options, preprocess_overrides

SEVERITIES = [s.name.lower() for s in Severity]


def model_paths(targets: tuple[Path, ...]) -> list[Path]:
    paths: list[Path] = []
    for target in targets:
        if target.is_dir():
            found = sorted(target.glob("*.onnx"))
            if not found:
                raise UsageError(f"{target}: folder holds no .onnx models")
            paths += found
        else:
            paths.append(target)  # a missing file is reported per model (exit 2)
    return paths


def per_model_path(base: Path | None, model: Path, several: bool, suffix: str) -> Path | None:
    """With several models, an output option names a folder and files take the model's stem."""
    if base is None:
        return None
    return base / f"{model.stem}{suffix}" if several else base


def check_outputs(several: bool, **outputs: Path | None) -> None:
    """Fail before any work when an output cannot be written (no half-done gate runs)."""
    for flag, path in outputs.items():
        if path is None:
            continue
        folder = path if several and flag in ("out", "html") else path.parent
        if not folder.is_dir():
            what = "folder" if folder == path else "folder of"
            raise UsageError(f"--{flag}: {what} {folder} does not exist")


@cli.command("scan")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Clean images, 1 per class is enough: a .npz (x, y) or a folder.")
@click.option("--data-free", is_flag=True, help="No data: synthesise inputs from the model.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the repaired model here (a folder when scanning several).")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="JSON report.")
@click.option("--sarif", type=click.Path(path_type=Path), default=None, help="SARIF 2.1.0 report.")
@click.option("--html", type=click.Path(path_type=Path), default=None,
              help="Single-file HTML report (a folder when scanning several).")
@click.option("--policy", default="default", show_default=True,
              help="default | strict | permissive | path to a policy .toml")
@click.option("--method", type=click.Choice(["shapley", "clp", "fp"]), default="shapley",
              show_default=True, help="Repair method (clp/fp: baselines for comparison).")
@click.option("--fail-on", type=click.Choice(SEVERITIES, case_sensitive=False), default=None,
              help="Fail the gate (exit 1) on findings at or above this severity "
                   "(default: the policy's).")
@click.option("--layers", default=None,
              help="Comma-separated activation tensors to score (default: all).")
@click.option("--permutations", type=click.IntRange(1), default=None,
              help="Shapley permutations (default: the policy's).")
@click.option("--epsilon", type=click.FloatRange(0, 1), default=None,
              help="Share of fully random Shapley permutations (1 = plain truncated MC).")
@click.option("--stable-rounds", type=click.IntRange(0), default=0, show_default=True,
              help="Stop Shapley sampling once the top-k channels are unchanged this many "
                   "rounds of 8 permutations (0: use the whole budget).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress, no summary.")
@preprocess_options
@device_option
def scan_cmd(models: tuple[Path, ...], data: Path | None, data_free: bool, out: Path | None,
             report: Path | None, sarif: Path | None, html: Path | None, policy: str,
             method: str, fail_on: str | None, layers: str | None, permutations: int | None,
             epsilon: float | None, stable_rounds: int, seed: int, as_json: bool, quiet: bool,
             device: str, **prep: str | None) -> int:
    """Scan MODELS (files or folders of .onnx) for backdoors and repair them.

    Exit codes: 0 clean, 1 findings at or above --fail-on, 2 error or refused model,
    3 inconclusive, 4 usage error.
    """
    if data is None and not data_free and method != "clp":
        raise UsageError("give --data DIR|FILE.npz (1 clean image per class) or --data-free")
    if data is not None and data_free:
        raise UsageError("--data and --data-free exclude each other")
    gate_policy = load_policy(policy)
    threshold = Severity.parse(fail_on) if fail_on else gate_policy.fail_on
    paths = model_paths(models)
    several = len(paths) > 1
    check_outputs(several, out=out, html=html, report=report, sarif=sarif)
    results: list[ScanResult] = []
    for path in paths:
        options = ScanOptions(
            data=data, data_free=data_free, policy=policy, method=method, device=device,
            seed=seed, out=per_model_path(out, path, several, ".sanitized.onnx"),
            layers=tuple(v.strip() for v in layers.split(",")) if layers else None,
            overrides=preprocess_overrides(**prep), permutations=permutations,
            epsilon=epsilon, stable_rounds=stable_rounds, quiet=quiet)
        start = time.perf_counter()
        result = scan(path, options, Progress(enabled=not quiet))
        result.timings["total"] = time.perf_counter() - start
        results.append(result)
        if not quiet and not as_json:
            print_summary(result)
        else:  # a gate that fails must still say why, on stderr, one line each
            for problem in result.errors + result.skipped:
                click.echo(f"shapscan: {path}: {problem}", err=True)
        if html is not None:
            from ..report.html import render_html
            write_report(per_model_path(html, path, several, ".html"), render_html(result))
    from ..report.json_report import render_json
    json_text = render_json(results, fail_on=threshold)
    if report is not None:
        write_report(report, json_text)
    if sarif is not None:
        from ..report.sarif import render_sarif
        write_report(sarif, render_sarif(results, load_catalog()))
    if as_json:
        click.echo(json_text)
    elif several and not quiet:
        print_table(results)
    return exit_code(results, threshold)


VERDICT_STYLE = {Verdict.CLEAN: "green", Verdict.BACKDOOR: "red", Verdict.ERROR: "red",
                 Verdict.INCONCLUSIVE: "yellow", Verdict.REPAIR_ONLY: "blue"}


def print_summary(result: ScanResult) -> None:
    from ..cli import use_color

    verdict = result.verdict.value.upper()
    label = click.style(verdict, fg=VERDICT_STYLE[result.verdict], bold=True) \
        if use_color() else verdict
    lines = [f"{result.model_path}: {label}"]
    det = result.detection
    if det is not None and det.flagged_targets:
        lines.append(f"  backdoor target class: {', '.join(map(str, det.flagged_targets))}")
    rep = result.repair
    if rep is not None:
        lines.append(f"  channels zeroed: {len(rep.pruned)} of {rep.channels_total} "
                     f"({100 * rep.pruned_fraction:.2f}%)")
        probability = ("" if rep.target_probability_after is None else
                       f" (mean target probability {rep.target_probability_before:.3f} -> "
                       f"{rep.target_probability_after:.3f})")
        lines.append(f"  reversed trigger success: {100 * rep.reversed_asr_before:.0f}% -> "
                     f"{100 * rep.reversed_asr_after:.0f}%{probability}; few-shot clean accuracy "
                     f"{100 * rep.fewshot_acc_before:.0f}% -> {100 * rep.fewshot_acc_after:.0f}%")
        if rep.output_path:
            lines.append(f"  repaired model: {rep.output_path}")
    said = set()
    for f in result.findings:
        lines.append(f"  [{f.severity.name}] {f.rule_id} {f.message}")
        said.add(f"{f.rule_id}: {f.message}")
    lines += [f"  error: {e}" for e in result.errors if e not in said]
    lines += [f"  skipped: {s}" for s in result.skipped if s not in said]
    lines.append(f"  {result.timings.get('total', 0.0):.1f} s on {result.device}")
    click.echo("\n".join(lines))


def print_table(results: list[ScanResult]) -> None:
    header = ("model", "verdict", "target", "zeroed", "rev. ASR after", "seconds")
    rows = []
    for r in results:
        det, rep = r.detection, r.repair
        rows.append((Path(r.model_path).name, r.verdict.value,
                     ",".join(map(str, det.flagged_targets)) if det and det.flagged_targets
                     else "-",
                     str(len(rep.pruned)) if rep else "-",
                     f"{100 * rep.reversed_asr_after:.0f}%" if rep else "-",
                     f"{r.timings.get('total', 0):.1f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    click.echo("")
    for row in (header, *rows):
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
