"""What `shapscan scan --out` delivers for each model.

A pipeline deploys one artifact path whatever the verdict, so `--out` always says what it
got: the repaired model (written by the repair stage), an unchanged copy of a model the
scan found clean, or nothing (the model was refused, the scan was inconclusive, or a
backdoor could not be repaired), with the reason on stdout and in the reports.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import external_data_helper

from ..errors import OutputError
from ..files import write_atomic
from ..findings import ModelOutput, ScanResult, Verdict
from ..graph.load import _all_tensors


def deliver_model(result: ScanResult, source: Path, out: Path) -> ModelOutput:
    """`--out` for one scanned model; a copy that cannot be written is an error of this
    model's result (exit 2), never a silent gap."""
    repair = result.repair
    if repair is not None and repair.output_path:
        return ModelOutput(repair.output_path, "repaired")
    if result.verdict is Verdict.CLEAN and not result.errors and result.model is not None:
        try:
            write_unchanged_copy(source, out, result.model.sha256)
        except OutputError as exc:
            result.errors.append(str(exc))
            return ModelOutput(str(out), None, str(exc))
        return ModelOutput(str(out), "unchanged-copy")
    return ModelOutput(str(out), None, nothing_written(result))


def nothing_written(result: ScanResult) -> str:
    """Why a model's `--out` stays unwritten, in the words the summary prints."""
    repair = result.repair
    if result.verdict is Verdict.ERROR or result.errors:
        return "the model was refused or could not be scanned"
    if result.verdict is Verdict.INCONCLUSIVE:
        return "the scan was inconclusive"
    if result.verdict is Verdict.BACKDOOR and repair is None:
        return "a backdoor was found and the policy does not repair (repair.enabled = false)"
    if result.verdict is Verdict.BACKDOOR:  # no channel set within budget, or withheld
        return "a backdoor was found and the repair did not complete (see the findings)"
    return f"--method {result.method} zeroed no channel"


def write_unchanged_copy(source: Path, out: Path, sha256: str) -> None:
    """The bytes that were scanned, atomically at `out`. A model that keeps its weights in
    external files becomes one self-contained file with the same graph and weights (as a
    repaired model does), since its relative data paths would not resolve beside `out`."""
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise OutputError(f"cannot copy {source}: {exc.strerror or exc}") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise OutputError(f"{source} changed on disk during the scan; no copy written to {out}")
    proto = onnx.load_model_from_string(raw)  # parsed once already: the scan loaded it
    external = [t for _, t in _all_tensors(proto) if external_data_helper.uses_external_data(t)]
    if external:
        # the locations were vetted (inside the model's folder) when the scan loaded it
        external_data_helper.load_external_data_for_model(proto, str(source.parent))
        for tensor in external:  # stored inline, as an exporter writes a one-file model
            tensor.ClearField("data_location")
        raw = proto.SerializeToString()
    write_atomic(out, raw)
