"""A bug while scanning one model is that model's error: one line, and the gate goes on."""

from __future__ import annotations

import json

from graph_builders import conv_relu_model, save

import scanner.api as api
from scanner.findings import Verdict


def test_an_internal_error_is_the_model_verdict_and_the_next_model_still_runs(
        run_cli, tmp_path, monkeypatch):
    broken, fine = (save(conv_relu_model(), tmp_path / f"{n}.onnx") for n in ("a", "b"))
    real = api.discover

    def buggy(proto):
        if proto.graph.name == "broken":
            raise RuntimeError("boom\nsecond line")
        return real(proto)

    proto = conv_relu_model()
    proto.graph.name = "broken"
    save(proto, broken)
    monkeypatch.setattr(api, "discover", buggy)
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


def test_running_out_of_memory_is_inconclusive_not_a_bug(run_cli, tmp_path, monkeypatch):
    path = save(conv_relu_model(), tmp_path / "m.onnx")

    def too_big(proto):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned "
                           "while running Conv node. Status Message: bfc_arena.cc:360 Failed "
                           "to allocate memory for requested buffer of size 3892838400\nmore")

    monkeypatch.setattr(api, "discover", too_big)
    result = api.scan(path, api.ScanOptions(method="clp", quiet=True))
    assert result.verdict is Verdict.INCONCLUSIVE and not result.errors
    assert result.skipped == ["inconclusive: ran out of memory; the model, its input size or "
                              "its class count is too large for this machine"]
    cli = run_cli("scan", path, "--method", "clp", "-q")
    assert cli.code == 3 and "ran out of memory" in cli.err and "internal error" not in cli.err
    assert cli.err.count("\n") == 1


def test_eval_out_of_memory_is_one_line_exit_3(run_cli, tmp_path, monkeypatch):
    import scanner.commands.evaluate as evaluate_command

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 21.4 GiB for an array")

    monkeypatch.setattr(evaluate_command, "evaluate", too_big)
    cli = run_cli("eval", save(conv_relu_model(), tmp_path / "m.onnx"), "--data",
                  "samples/data/fewshot.npz")
    assert cli.code == 3 and cli.err.count("\n") == 1 and "ran out of memory" in cli.err
