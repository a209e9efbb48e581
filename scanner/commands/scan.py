"""`shapscan scan`: the gate. Detect a backdoor, repair it, write reports, set the exit code."""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from contextlib import closing
from pathlib import Path

import click

from ..api import ScanOptions
from ..cli import cli
from ..errors import Interrupted, UsageError
from ..findings import ScanResult, Severity, Verdict
from ..gate import exit_code
from ..policy import load_catalog, load_policy
from ..report import write_report
from .common import (
    device_option,
    preprocess_options,
    preprocess_overrides,
    require_path,
    resize_option,
)
from .executor import executor_options, ray_options_from, scanned
from .outputs import deliver_model

SEVERITIES = [s.name.lower() for s in Severity]
SEPARATORS = tuple(s for s in (os.sep, os.altsep) if s)


REPAIRED_SUFFIX = ".sanitized.onnx"


def model_paths(targets: tuple[Path, ...]) -> list[Path]:
    """Files as given and each folder's .onnx files (any case: a gate must not pass over
    VENDOR.ONNX), each model once even when named twice."""
    paths: list[Path] = []
    for target in targets:
        require_path(target)  # one that is there but no model is refused per model (exit 2)
        if target.is_dir():
            found = sorted(p for p in target.iterdir() if p.suffix.lower() == ".onnx")
            if not found:
                raise UsageError(f"{target}: folder holds no .onnx models")
            paths += found
        else:
            paths.append(target)
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def names_folder(option: str) -> bool:
    return option.endswith(SEPARATORS) or Path(option).is_dir()


def output_files(option: str | None, paths: list[Path], per_model: bool, suffix: str
                 ) -> tuple[Path | None, list[Path | None]]:
    """The folder an output option names (None: it names a file) and each model's file.

    It names a folder when several models or a folder of models are scanned, when it
    names an existing folder, or when it ends with a path separator. A model's file in it
    is the model's stem + suffix; stems that repeat get -1, -2, ... in the order scanned."""
    if option is None:
        return None, [None] * len(paths)
    if not (per_model or names_folder(option)):
        return None, [Path(option)]
    folder = Path(option)
    repeats = Counter(p.stem for p in paths)
    seen: Counter[str] = Counter()
    files: list[Path | None] = []
    for path in paths:
        seen[path.stem] += 1
        tag = f"-{seen[path.stem]}" if repeats[path.stem] > 1 else ""
        files.append(folder / f"{path.stem}{tag}{suffix}")
    return folder, files


def check_folder(flag: str, folder: Path) -> None:
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"--{flag}: {folder} {state}")
    try:  # a real probe: root passes every permission check, /proc takes no new file
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise UsageError(f"--{flag}: cannot write in {folder}: {exc.strerror}") from None


def check_outputs(inputs: dict[Path, str], folders: dict[str, Path | None],
                  files: dict[str, list[Path | None]]) -> None:
    """Fail before any work when an output cannot be written or would overwrite an input
    (a model, the data, the policy) or another output: a gate never destroys its input nor
    leaves half its outputs. `inputs` maps resolved input paths to what they are."""
    for flag, folder in folders.items():
        if folder is not None:  # a missing output folder is created in an existing one
            check_folder(flag, folder if folder.exists() else folder.parent)
    taken: dict[Path, str] = {}
    for flag, paths in files.items():
        for path in filter(None, paths):
            key = path.resolve()
            if key in inputs:
                hint = ("; a folder's models are all scanned, an earlier run's repairs too: "
                        "write repairs to another folder" if path.name.endswith(REPAIRED_SUFFIX)
                        and inputs[key].startswith("the input model") else "")
                raise UsageError(f"--{flag}: {path} is {inputs[key]}; refusing to overwrite "
                                 f"it{hint}")
            if key in taken:
                raise UsageError(f"--{taken[key]} and --{flag} name the same file {path}")
            if path.is_dir():
                raise UsageError(f"--{flag}: {path} is a folder, not a file")
            taken[key] = flag
            if folders[flag] is None:
                check_folder(flag, path.parent)


@cli.command("scan")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Clean images, 1 per class is enough: a .npz (x, y) or a folder.")
@click.option("--data-free", is_flag=True, help="No data: synthesise inputs from the model.")
@click.option("--out", type=click.Path(), default=None,
              help="Write the repaired model to this file, or to STEM.sanitized.onnx in this "
                   "folder (see Outputs).")
@click.option("--report", type=click.Path(), default=None,
              help="JSON report (one file for all models).")
@click.option("--sarif", type=click.Path(), default=None,
              help="SARIF 2.1.0 report (one file for all models).")
@click.option("--html", type=click.Path(), default=None,
              help="Single-file HTML report: this file, or STEM.html in this folder "
                   "(see Outputs).")
@click.option("--policy", default="default", show_default=True,
              help="default | strict | permissive | path to a policy .toml")
@click.option("--method", type=click.Choice(["shapley", "clp", "fp", "ft"]),
              default="shapley", show_default=True,
              help="Repair method (clp, fp, ft = fine-tuning alone: baselines for comparison).")
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
@click.option("--keep-incomplete", is_flag=True,
              help="Write a repair that missed its target or that the re-scan still flags "
                   "to --out anyway, marked shapscan.repair = incomplete in its metadata.")
@resize_option
@preprocess_options
@device_option
@executor_options
def scan_cmd(models: tuple[Path, ...], data: Path | None, data_free: bool, out: str | None,
             report: str | None, sarif: str | None, html: str | None, policy: str,
             method: str, fail_on: str | None, layers: str | None, permutations: int | None,
             epsilon: float | None, stable_rounds: int, seed: int, as_json: bool, quiet: bool,
             keep_incomplete: bool,
             resize: bool, device: str, executor: str, ray_address: str | None,
             ray_cpus: float | None, ray_gpus: float | None, ray_retries: int | None,
             **prep: object) -> int:
    """Scan MODELS (files or folders of .onnx, any case) for backdoors and repair them.

    A repair that misses its target, or that the re-scan of the repaired model still flags,
    is incomplete (SS305): --out does not get it unless --keep-incomplete, which writes it
    marked shapscan.repair = incomplete (a complete repair is marked complete).

    Exit codes: 0 clean, 1 findings at or above --fail-on, 2 error or refused model,
    3 inconclusive, 4 usage error, 130 interrupted (Ctrl-C).

    Outputs: --out and --html name a folder when it exists, when it ends with a path
    separator, or when several models or a folder of models are scanned. Each model then
    writes STEM.sanitized.onnx or STEM.html in it (STEM-1, STEM-2, ... when models share a
    file name), and a missing folder is created inside an existing one. An output that
    cannot be written, or that names an input model or another output, is a usage error
    before anything is scanned. --out gets the repaired model, or an unchanged copy of a
    model found clean; nothing when the model is refused, inconclusive or not repaired.
    Ctrl-C writes --report and --sarif with the models that finished, marked partial.

    --executor ray scans each model as a Ray task (a local cluster, or --ray-address's):
    the same outputs, reports and exit code; a task whose worker is lost is re-run.
    """
    if method == "ft" and data is None:
        raise UsageError("--method ft trains on clean images: give --data")
    if data is None and not data_free and method != "clp":
        raise UsageError("give --data DIR|FILE.npz (1 clean image per class) or --data-free")
    if data is not None and data_free:
        raise UsageError("--data and --data-free exclude each other")
    if method == "fp" and data is None:
        raise UsageError("--method fp ranks channels on clean images: give --data")
    if resize and data is None:
        raise UsageError("--resize resizes the --data images: give --data")
    if data is not None:
        require_path(data, "data")
    ray_options = ray_options_from(executor, device, ray_address, ray_cpus, ray_gpus,
                                   ray_retries)
    gate_policy = load_policy(policy)
    threshold = Severity.parse(fail_on) if fail_on else gate_policy.fail_on
    paths = model_paths(models)
    several = len(paths) > 1
    per_model = several or any(m.is_dir() for m in models)
    folders: dict[str, Path | None] = {}
    files: dict[str, list[Path | None]] = {}
    for flag, option, suffix in (("out", out, REPAIRED_SUFFIX), ("html", html, ".html")):
        folders[flag], files[flag] = output_files(option, paths, per_model, suffix)
    for flag, option in (("report", report), ("sarif", sarif)):
        if option is not None and names_folder(option):
            raise UsageError(f"--{flag}: {option} names a folder, not a file")
        folders[flag], files[flag] = None, [None if option is None else Path(option)]
    inputs = {m.resolve(): f"the input model {m}" for m in paths}
    for flag, given in (("data", data), ("policy", Path(policy))):
        if given is not None and given.is_file():
            inputs[given.resolve()] = f"the --{flag} file {given}"
    check_outputs(inputs, folders, files)
    for folder in filter(None, folders.values()):
        folder.mkdir(exist_ok=True)
    jobs = [(path, ScanOptions(
        data=data, data_free=data_free, policy=policy, method=method, device=device,
        seed=seed, out=out_file, resize=resize,
        layers=tuple(v.strip() for v in layers.split(",")) if layers else None,
        overrides=preprocess_overrides(**prep), permutations=permutations,
        epsilon=epsilon, stable_rounds=stable_rounds, quiet=quiet,
        keep_incomplete=keep_incomplete))
        for path, out_file in zip(paths, files["out"], strict=True)]
    results: list[ScanResult] = []
    try:
        with closing(scanned(jobs, several, quiet, ray_options)) as in_order:
            for (path, options), html_file, result in zip(jobs, files["html"], in_order,
                                                          strict=True):
                # a model counts as finished once all of its own outputs are written
                results.append(scan_one(path, options, html_file, result,
                                        summarised=not quiet and not as_json))
    except KeyboardInterrupt:
        not_scanned = [str(p) for p in paths[len(results):]]
        write_reports(results, threshold, report, sarif, as_json, not_scanned)
        kept = " and ".join(f"--{flag} {name}" for flag, name in
                            (("report", report), ("sarif", sarif)) if name is not None)
        done = f"{len(results)} model{'s' * (len(results) != 1)} that finished"
        raise Interrupted(
            f"interrupted while scanning {not_scanned[0]} (model {len(results) + 1} of "
            f"{len(paths)})" + (f"; {kept} hold{'s' * (' and ' not in kept)} the {done}, "
                                "marked partial" if kept else "")) from None
    write_reports(results, threshold, report, sarif, as_json)
    if several and not quiet and not as_json:
        print_table(results)
    return exit_code(results, threshold)


def scan_one(path: Path, options: ScanOptions, html_file: Path | None, result: ScanResult,
             summarised: bool) -> ScanResult:
    """Deliver one scanned model's --out and --html, and say how it went."""
    if options.out is not None:
        result.output = deliver_model(result, path, options.out)
    if summarised:
        print_summary(result)
    # a gate that fails must say why on stderr, one line each, whatever stdout shows;
    # on a terminal showing both streams the summary has just said it
    if not (summarised and both_on_terminal()):
        for problem in result.errors + result.skipped:
            click.echo(problem_line(path, problem), err=True)
    if html_file is not None:
        from ..report.html import render_html
        write_report(html_file, render_html(result))
    return result


def write_reports(results: list[ScanResult], threshold: Severity, report: str | None,
                  sarif: str | None, as_json: bool, not_scanned: list[str] | None = None
                  ) -> None:
    """--report, --sarif and --json for every model scanned; `not_scanned` (an interrupted
    run) marks them partial."""
    from ..report.json_report import render_json
    json_text = render_json(results, fail_on=threshold, not_scanned=not_scanned)
    if report is not None:
        write_report(report, json_text)
    if sarif is not None:
        from ..report.sarif import render_sarif
        write_report(sarif, render_sarif(results, load_catalog(), not_scanned))
    if as_json:
        click.echo(json_text)


def both_on_terminal() -> bool:
    return all(stream.isatty() for stream in (click.get_text_stream("stdout"),
                                              click.get_text_stream("stderr")))


def problem_line(path: Path, problem: str) -> str:
    """`shapscan: PATH: problem`, without naming the path twice when the problem already
    names it as its subject (`PATH: ...`, also after a rule id)."""
    named = re.search(rf"(^|\s){re.escape(str(path))}:\s", problem) is not None
    return f"shapscan: {problem}" if named else f"shapscan: {path}: {problem}"


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
        # say which rows each figure is on: the scan's own images and shifted copies, with
        # the trigger at its gain, not a test set (a reader compares them with test figures)
        if rep.target >= 0:  # a baseline has no target and no reversed trigger
            lines.append(f"  reversed trigger success: {100 * rep.reversed_asr_before:.0f}% "
                         f"-> {100 * rep.reversed_asr_after:.0f}%{probability}")
            lines.append(f"    on {rep.stamped_rows()}")
        if rep.recovery_note:
            lines.append(f"  {rep.recovery_note}")
        lines.append(f"  clean accuracy: {100 * rep.fewshot_acc_before:.0f}% -> "
                     f"{100 * rep.fewshot_acc_after:.0f}% on {rep.clean_rows()} (not a test set)")
        if rep.output_path:
            lines.append(f"  repaired model: {rep.output_path}"
                         + (" (INCOMPLETE: still flagged, marked shapscan.repair = incomplete)"
                            if rep.status == "incomplete" else ""))
        if rep.rescan is not None:
            lines.append(f"  re-scan of the repaired model ({', '.join(rep.rescan.views)}): "
                         + ("no class flagged" if rep.rescan.clean else "still flags class "
                            + ", ".join(map(str, rep.rescan.flagged_targets))))
    out = result.output
    if out is not None and out.kind == "unchanged-copy":
        lines.append(f"  model copied unchanged to {out.path} (found clean: nothing to repair)")
    elif out is not None and not out.written:
        lines.append(f"  nothing written to {out.path}: {out.reason}")
    said = set()
    for f in result.findings:
        lines.append(f"  [{f.severity.name}] {f.rule_id} {f.message}")
        said.add(f"{f.rule_id}: {f.message}")
    lines += [f"  error: {e}" for e in result.errors if e not in said]
    lines += [f"  skipped: {s}" for s in result.skipped if s not in said]
    lines.append(f"  {result.timings.get('total', 0.0):.1f} s on {result.device}")
    if result.attempts > 1:
        lines.append(f"  scanned on try {result.attempts}: Ray re-ran the task after its "
                     "worker was lost")
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
