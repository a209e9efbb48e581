"""What a scan may spend (budget.py, estimate.check_time): rows per batched run under the
memory budget, and a scan forecast to take too long stopped as inconclusive (SS210)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, zoo_model
from graph_builders import conv_relu_model

from scanner.api import model_preprocess
from scanner.autodiff import GradientProgram
from scanner.budget import GRADIENT_FACTOR, forward_rows, row_bytes, rows_per_run
from scanner.data import load_images
from scanner.graph.load import load_model


def test_row_bytes_sums_every_per_row_float_tensor():
    """conv_relu_model: image [N, 3, 8, 8] -> conv [N, 4, 8, 8] -> relu -> GAP [N, 4, 1, 1]
    -> flatten [N, 4] -> Gemm logits [N, 5]: 4 bytes per value."""
    values = 3 * 64 + 4 * 64 + 4 * 64 + 4 + 4 + 5
    assert row_bytes(conv_relu_model()) == 4 * values


@pytest.mark.parametrize(("per_row", "budget", "factor", "rows"), [
    (100, 10_000, 1, 100), (100, 10_000, GRADIENT_FACTOR, 33), (100, 50, 1, 1),
    (0, 10_000, 1, None), (100, None, 1, None)])
def test_rows_per_run(per_row, budget, factor, rows):
    assert rows_per_run(per_row, budget, factor) == rows


def test_forward_rows_is_capped():
    proto = conv_relu_model()
    assert forward_rows(proto, None) == 1024
    assert forward_rows(proto, 10 * row_bytes(proto)) == 10


@pytest.mark.parametrize("bn_stats", [False, True])
def test_a_budget_of_one_row_per_run_gives_the_same_gradients(bn_stats):
    """cnn_badnets, 20 images: one run, or twenty runs of one row each (the budget set to
    what one row costs); without the BN head the rows are independent, so the results are
    equal. With it each run matches the statistics on its own rows, so only the logits are."""
    model = load_model(zoo_model("cnn_badnets"))
    prep = model_preprocess(model)
    images = load_images(FEWSHOT, prep)
    x = prep.to_model(images.pixels[:20])
    weights = np.eye(10, dtype=np.float32)[images.labels[:20]]
    whole = GradientProgram(model.runnable, bn_stats=bn_stats).run(x, weights, 1.0)
    budget = GRADIENT_FACTOR * row_bytes(model.runnable)
    tight = GradientProgram(model.runnable, bn_stats=bn_stats, max_bytes=budget)
    assert tight.max_rows == 1
    cut = tight.run(x, weights, 1.0)
    np.testing.assert_allclose(cut.logits, whole.logits, rtol=1e-5, atol=1e-5)
    if not bn_stats:
        np.testing.assert_allclose(cut.grad, whole.grad, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(cut.ce, whole.ce, rtol=1e-5, atol=1e-6)


def test_a_scan_forecast_over_the_time_limit_is_inconclusive(run_cli, tmp_path):
    policy = tmp_path / "hurry.toml"
    policy.write_text("[detection]\nmax_minutes = 0.001\n")
    for extra in ((), ("--data-free",)):
        data = () if extra else ("--data", FEWSHOT)
        result = run_cli("scan", zoo_model("cnn_badnets"), *data, *extra, "--policy", policy)
        assert result.code == 3
        assert "SS210" in result.err and "detection.max_minutes = 0.001" in result.err
        assert "Traceback" not in result.err
        assert ("data-free synthesis about" in result.err) == bool(extra)


def test_a_repair_still_running_at_the_time_limit_is_stopped_and_not_written(
        run_cli, tmp_path, monkeypatch):
    """detection.max_minutes bounds the repair too: the forecast (priced here at a
    nanosecond a row, so that it lets the scan start) covers the detection, and a repair
    still running when the scan reaches the limit (3 s: cnn_badnets' detection alone
    takes longer) is stopped at its next progress report. The verdict stays BACKDOOR
    (exit 1), the report has no repair and SS306 (HIGH) names the stage, --out gets
    nothing."""
    import json

    import scanner.estimate

    monkeypatch.setattr(scanner.estimate, "row_seconds", lambda *a: 1e-9)
    policy = tmp_path / "hurry.toml"
    policy.write_text("[detection]\nmax_minutes = 0.05\nmargin_steps = 0\n")
    report, out = tmp_path / "r.json", tmp_path / "safe.onnx"
    result = run_cli("scan", zoo_model("cnn_badnets"), "--data", FEWSHOT, "--policy", policy,
                     "--report", report, "--out", out)
    assert result.code == 1 and "Traceback" not in result.err
    res = json.loads(report.read_text())["results"][0]
    assert res["verdict"] == "backdoor" and res["repair"] is None
    findings = {f["rule_id"]: f for f in res["findings"]}
    assert findings["SS306"]["severity"] == "high"
    assert "the model was not repaired" in findings["SS306"]["message"]
    assert "Shapley values" in findings["SS306"]["message"]  # the first repair stage
    assert not out.exists()


@pytest.mark.slow
def test_a_classic_1000_class_zoo_model_stops_at_the_time_limit_not_in_memory(run_cli, tmp_path):
    """SqueezeNet from the onnx wheel (1,000 classes, 224x224): data-free synthesis alone
    would take hours on a CPU, and the fast plan still most of an hour, so a 5-minute
    limit stops it before it starts (SS210, naming both forecasts), instead of the
    10-23 GB synthesis that used to end out of memory."""
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    policy = tmp_path / "five.toml"
    policy.write_text("[detection]\nmax_minutes = 5\n")
    result = run_cli("scan", light / "light_squeezenet.onnx", "--data-free", "--policy", policy)
    assert result.code == 3
    assert "SS210" in result.err and "1000 classes" in result.err
    assert "; the fast plan: data-free synthesis about" in result.err
    assert "Traceback" not in result.err
