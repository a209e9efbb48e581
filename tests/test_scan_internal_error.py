"""A bug while scanning one model is that model's error: one line, and the gate goes on."""

from __future__ import annotations

import json

from graph_builders import conv_relu_model, save

import scanner.api as api
from scanner.findings import Verdict


def test_an_internal_error_is_the_model_verdict_and_the_next_model_still_runs(
        run_cli, tmp_path, monkeypatch):
    broken, fine = (save(conv_relu_model(), tmp_path / f"{n}.onnx") for n in ("a", "b"))
    real = api.discover_activations

    def buggy(proto):
        if proto.graph.name == "broken":
            raise RuntimeError("boom\nsecond line")
        return real(proto)

    proto = conv_relu_model()
    proto.graph.name = "broken"
    save(proto, broken)
    monkeypatch.setattr(api, "discover_activations", buggy)
    result = api.scan(broken, api.ScanOptions(method="clp", quiet=True))
    assert result.verdict is Verdict.ERROR
    assert result.errors == ["internal error: RuntimeError: boom (rerun with --debug for a "
                             "traceback)"]

    report = tmp_path / "scan.json"
    cli = run_cli("scan", broken, fine, "--method", "clp", "-q", "--report", report)
    assert cli.code == 2
    assert "a.onnx: internal error: RuntimeError: boom" in cli.err
    verdicts = [r["verdict"] for r in json.loads(report.read_text())["results"]]
    assert verdicts[0] == "error" and verdicts[1] != "error"
