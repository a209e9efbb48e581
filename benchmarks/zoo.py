"""End-to-end benchmark over the sample zoo: every model x repair method.

    python benchmarks/zoo.py [--quick] [--models a,b] [--methods none,shapscan,...]

For each zoo model (samples/zoo.json) and method it runs `scanner.api.scan`, then measures
the written (sanitized) model on the test subset with `scanner.api.evaluate`: clean
accuracy and the attack success rate (ASR) of the *true* trigger from zoo.json. A scan that
writes no model (verdict clean, nothing to repair) leaves the original model deployed, so
its row measures the original. An incomplete repair (SS305: target missed, or the re-scan
still flags) is written all the same (`keep_incomplete`) and measured, its verdict cell
marked "(incomplete)": the table shows what the plan achieved, not what a gate would ship.
DER (defense effectiveness rating, BackdoorBench) is
[max(0, ΔASR) − max(0, ΔACC) + 1] / 2 with Δ = before − after; 0.5 means "no change".
The markdown table goes to benchmarks/results.md and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
FEWSHOT = SAMPLES / "data" / "fewshot.npz"
TEST_SET = SAMPLES / "data" / "test.npz"
RESULTS = Path(__file__).resolve().parent / "results.md"


@dataclass(frozen=True)
class Method:
    name: str  # the row label
    method: str | None  # ScanOptions.method; None = no scan (the model as shipped)
    data_free: bool  # scan without images (data-free synthesis / CLP)
    note: str


METHODS = {m.name: m for m in (
    Method("none", None, False, "the model as shipped"),
    Method("shapscan", "shapley", False, "Shapley pruning, 1 clean image per class"),
    Method("shapscan-df", "shapley", True, "Shapley pruning, data-free (synthesised inputs)"),
    Method("clp", "clp", False, "CLP, u = 3 (its pruning uses no data; the images only "
           "feed detection and the reported few-shot accuracy)"),
    Method("fp", "fp", False, "Fine-Pruning of the last conv layer, 1 image per class, "
           "no fine-tuning"),
)}
QUICK_METHODS = ("none", "shapscan", "clp")
QUICK_MODELS = 2


@dataclass(frozen=True)
class ZooModel:
    name: str
    path: Path
    attack: str | None
    target: int | None
    params: dict


@dataclass(frozen=True)
class Row:
    model: str
    method: str
    verdict: str
    acc: float
    asr: float | None
    channels: int
    channels_total: int
    seconds: float
    forward_passes: int
    der: float | None
    error: str | None = None


def zoo_models() -> list[ZooModel]:
    path = SAMPLES / "zoo.json"
    if not path.is_file():
        sys.exit(f"{path} not found: build the zoo with `python samples/make_zoo.py`")
    entries = json.loads(path.read_text())
    return [ZooModel(e["name"], SAMPLES / e["model"], e.get("attack"), e.get("target"),
                     e.get("params") or {})
            for e in entries if (SAMPLES / e["model"]).is_file()]


def der(acc_before: float, acc_after: float, asr_before: float | None,
        asr_after: float | None) -> float:
    """BackdoorBench's defense effectiveness rating (a clean model has ΔASR = 0)."""
    d_asr = (asr_before or 0.0) - (asr_after or 0.0)
    d_acc = acc_before - acc_after
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0


def measure(path: Path, zm: ZooModel) -> tuple[float, float | None]:
    from scanner.api import evaluate
    from scanner.attacks import Attack

    attack = Attack(zm.attack, dict(zm.params)) if zm.attack else None
    result = evaluate(path, TEST_SET, attack, zm.target if attack else None)
    return result.clean_acc, result.asr


def run_method(zm: ZooModel, method: Method, workdir: Path, baseline: Row) -> Row:
    from scanner.api import ScanOptions, scan

    out = workdir / f"{zm.name}.{method.name}.onnx"
    options = ScanOptions(data=None if method.data_free else FEWSHOT,
                          data_free=method.data_free, method=method.method, out=out,
                          quiet=True, keep_incomplete=True)
    start = time.perf_counter()
    result = scan(zm.path, options)
    seconds = time.perf_counter() - start
    repair, detection = result.repair, result.detection
    passes = (detection.forward_passes if detection else 0) + \
        (repair.forward_passes if repair else 0)
    deployed = out if out.is_file() else zm.path  # nothing written: the original ships
    acc, asr = measure(deployed, zm)
    # an incomplete repair is written (keep_incomplete) and measured like any other, so
    # the table shows what the plan achieved; its verdict cell says it was incomplete
    verdict = result.verdict.value + (f" ({repair.status})" if repair and
                                      repair.status == "incomplete" else "")
    return Row(zm.name, method.name, verdict, acc, asr,
               len(repair.pruned) if repair and out.is_file() else 0,
               baseline.channels_total, seconds, passes,
               der(baseline.acc, acc, baseline.asr, asr),
               "; ".join(result.errors) or None)


def channels_total(path: Path) -> int:
    from scanner.graph.activations import discover_activations
    from scanner.graph.load import load_model

    return sum(layer.channels for layer in discover_activations(load_model(path).proto))


def benchmark(models: list[ZooModel], methods: list[Method], log=print) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="shapscan-zoo-") as tmp:
        for zm in models:
            acc, asr = measure(zm.path, zm)
            base = Row(zm.name, "none", "-", acc, asr, 0, channels_total(zm.path), 0.0, 0,
                       None)
            for method in methods:
                if method.method is None:
                    row = base
                else:
                    try:
                        row = run_method(zm, method, Path(tmp), base)
                    except Exception as exc:  # one failing scan must not lose the table
                        row = Row(zm.name, method.name, "error", float("nan"), None, 0,
                                  base.channels_total, 0.0, 0, None,
                                  f"{type(exc).__name__}: {exc}")
                rows.append(row)
                log(format_row(row), flush=True)
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def format_row(row: Row) -> str:
    der_text = "-" if row.der is None else f"{row.der:.3f}"
    share = 100 * row.channels / max(1, row.channels_total)
    cells = [row.model, row.method, row.verdict, _pct(row.acc), _pct(row.asr),
             f"{row.channels} ({share:.2f}%)", f"{row.seconds:.1f}", str(row.forward_passes),
             der_text]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | method | verdict | clean acc % | ASR % | channels zeroed | seconds | "
          "forward passes | DER |\n|---|---|---|---:|---:|---:|---:|---:|---:|")


def summary(rows: list[Row], methods: list[Method]) -> list[str]:
    """Mean over the backdoored models of each method's accuracy drop, ASR after and DER."""
    before = {r.model: r for r in rows if r.method == "none"}
    lines = ["| method | models | mean Δacc (points) | mean ASR after % | mean DER | "
             "mean seconds |", "|---|---:|---:|---:|---:|---:|"]
    for method in methods:
        mine = [r for r in rows if r.method == method.name and r.asr is not None
                and r.model in before and r.acc == r.acc]
        if not mine:
            continue
        d_acc = sum(100 * (before[r.model].acc - r.acc) for r in mine) / len(mine)
        asr = sum(100 * (r.asr or 0.0) for r in mine) / len(mine)
        der_values = [r.der for r in mine if r.der is not None]
        der_text = f"{sum(der_values) / len(der_values):.3f}" if der_values else "-"
        secs = sum(r.seconds for r in mine) / len(mine)
        lines.append(f"| {method.name} | {len(mine)} | {d_acc:.2f} | {asr:.1f} | {der_text} "
                     f"| {secs:.1f} |")
    return lines


def render(rows: list[Row], methods: list[Method], argv: list[str], seconds: float) -> str:
    import onnxruntime

    lines = ["# Zoo benchmark", "",
             f"Generated by `{' '.join(['python benchmarks/zoo.py', *argv])}` in "
             f"{seconds / 60:.1f} min on {os.cpu_count()} CPU cores ({platform.machine()}, "
             f"onnxruntime {onnxruntime.__version__}, device cpu). Test subset: "
             f"`samples/data/test.npz`; ASR uses the true trigger from `samples/zoo.json` "
             "on test images whose label is not the target; seconds are the wall time of "
             "`scanner.api.scan` (detection + repair); forward passes are image evaluations "
             "(detection + repair). DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 against the "
             "`none` row (0.5 = unchanged, 1 = ASR removed at no accuracy cost).", "",
             "Methods: " + "; ".join(f"`{m.name}` {m.note}" for m in methods) + ".", "",
             HEADER, *(format_row(r) for r in rows), "",
             "Backdoored models only, means per method:", "", *summary(rows, methods)]
    errors = [r for r in rows if r.error]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r.model} / {r.method}: {r.error}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_MODELS} models, methods {','.join(QUICK_METHODS)}")
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown output")
    args = parser.parse_args(argv)
    models = zoo_models()
    if args.models:
        wanted = [m.strip() for m in args.models.split(",")]
        unknown = sorted(set(wanted) - {m.name for m in models})
        if unknown:
            parser.error(f"not in the zoo (or not built yet): {', '.join(unknown)}")
        models = [m for m in models if m.name in wanted]
    elif args.quick:
        # one backdoored and one clean model: both verdicts get exercised
        bad = [m for m in models if m.attack][:1]
        clean = [m for m in models if not m.attack][:1]
        models = (bad + clean) or models[:QUICK_MODELS]
    names = ([n.strip() for n in args.methods.split(",")] if args.methods
             else list(QUICK_METHODS if args.quick else METHODS))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    methods = [METHODS[n] for n in names]
    if "none" not in names:
        methods = [METHODS["none"], *methods]  # DER needs the before row
    start = time.perf_counter()
    print(HEADER, flush=True)
    rows = benchmark(models, methods)
    text = render(rows, methods, argv, time.perf_counter() - start)
    args.out.write_text(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
