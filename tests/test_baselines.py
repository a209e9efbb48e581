"""Baselines: CLP on hand-built graphs with a planted high-Lipschitz channel, Fine-Pruning and
CLP end to end on a zoo model (the sanitized model must load and run in onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FEWSHOT, zoo_model
from graph_builders import head, model, save
from onnx import helper, numpy_helper

from scanner.api import model_preprocess
from scanner.baselines import (
    BaselineConfig,
    channel_lipschitz,
    layer_lipschitz,
    run_baseline,
)
from scanner.baselines.fine_pruning import last_conv_layer
from scanner.data import ImageSet, Preprocess, load_images
from scanner.errors import DataError
from scanner.graph.activations import discover_activations
from scanner.graph.export import PRUNED_KEY, sanitize, verify_sanitized
from scanner.graph.load import load_model
from scanner.policy import Policy
from scanner.runtime import resolve_device

CHANNELS = 16
PLANTED = 5
CPU = resolve_device("cpu")


def conv_bn_relu(kernel_boost: float = 1.0, gamma_boost: float = 1.0,
                 channel: int = PLANTED, dead: int | None = None) -> onnx.ModelProto:
    """image -> Conv(3->16) -> BatchNormalization -> Relu -> Gemm -> Relu -> head.

    `kernel_boost` scales one channel's kernel, `gamma_boost` its BN γ; channel `dead` gets
    a BN shift of -100 (its Relu never fires); the Gemm-fed Relu is a layer CLP must skip."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((CHANNELS, 3, 3, 3)).astype(np.float32) * 0.3
    w[channel] *= kernel_boost
    gamma = rng.uniform(0.8, 1.2, CHANNELS).astype(np.float32)
    gamma[channel] *= gamma_boost
    beta = rng.standard_normal(CHANNELS).astype(np.float32) * 0.1
    if dead is not None:
        beta[dead] = -100.0
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w", w), ("b", np.zeros(CHANNELS, np.float32)), ("gamma", gamma),
        ("beta", beta),
        ("mean", rng.standard_normal(CHANNELS).astype(np.float32) * 0.1),
        ("var", rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32)),
        ("fc1_w", rng.standard_normal((8, CHANNELS)).astype(np.float32)),
        ("fc1_b", np.zeros(8, np.float32))]]
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1] * 4,
                              kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                              ["bn"], name="bn", epsilon=1e-5),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap0"], name="gap0"),
             helper.make_node("Flatten", ["gap0"], ["flat0"], name="flat0"),
             helper.make_node("Gemm", ["flat0", "fc1_w", "fc1_b"], ["fc1"], name="fc1",
                              transB=1),
             helper.make_node("Relu", ["fc1"], ["r2"], name="relu2"),
             helper.make_node("Unsqueeze", ["r2", "axes"], ["r2u"], name="unsq")]
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    hn, hi = head("r2u", 8)
    return model(nodes + hn, inits + hi)


def loaded(tmp_path: Path, proto: onnx.ModelProto):
    return load_model(save(proto, tmp_path / "m.onnx"))


def test_channel_lipschitz_is_the_largest_singular_value_times_bn_scale():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((4, 3, 3, 3))
    scale = np.array([1.0, -2.0, 0.5, 3.0])
    got = channel_lipschitz(kernel, scale)
    for k in range(4):
        expected = np.linalg.norm(kernel[k].reshape(3, 9), ord=2) * abs(scale[k])
        assert got[k] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kernel_boost, gamma_boost", [(50.0, 1.0), (1.0, 50.0)])
def test_clp_prunes_exactly_the_planted_channel(tmp_path, kernel_boost, gamma_boost):
    m = loaded(tmp_path, conv_bn_relu(kernel_boost, gamma_boost))
    layers = discover_activations(m.proto)
    repair = run_baseline("clp", m, layers, Preprocess("NCHW", 3, 8, 8), None, Policy(), CPU)
    assert [(c.layer, c.channel) for c in repair.pruned] == [("r", PLANTED)]
    assert repair.estimator == "clp" and repair.target == -1 and repair.permutations == 0
    assert repair.forward_passes == 0  # data-free: no image was evaluated
    assert repair.channels_total == CHANNELS + 8
    assert repair.top_channels[0].channel == PLANTED


def test_clp_reads_kernels_routed_through_constant_and_identity_nodes(tmp_path):
    proto = conv_bn_relu(kernel_boost=50.0)
    w = next(t for t in proto.graph.initializer if t.name == "w")
    proto.graph.initializer.remove(w)
    conv = next(n for n in proto.graph.node if n.name == "conv")
    conv.input[1] = "w_copy"
    proto.graph.node.insert(0, helper.make_node("Identity", ["w_const"], ["w_copy"], name="id"))
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["w_const"], name="k", value=w))
    m = loaded(tmp_path, proto)
    scored = layer_lipschitz(m.proto, discover_activations(m.proto))
    assert [s.layer.name for s in scored] == ["r"]
    assert scored[0].pruned.tolist() == [PLANTED]


def test_clp_prunes_nothing_without_an_outlier_and_skips_gemm_layers(tmp_path):
    m = loaded(tmp_path, conv_bn_relu())
    layers = discover_activations(m.proto)
    scored = layer_lipschitz(m.proto, layers)
    assert [s.layer.name for s in scored] == ["r"]  # r2 is fed by a Gemm
    assert scored[0].batchnorm == "bn" and scored[0].conv == "conv"
    assert len(scored[0].pruned) == 0


def test_clp_threshold_u_is_an_option(tmp_path):
    m = loaded(tmp_path, conv_bn_relu(kernel_boost=2.5))
    layers = discover_activations(m.proto)
    prep = Preprocess("NCHW", 3, 8, 8)
    strict = run_baseline("clp", m, layers, prep, None, Policy(), CPU, BaselineConfig(clp_u=3))
    loose = run_baseline("clp", m, layers, prep, None, Policy(), CPU, BaselineConfig(clp_u=1))
    assert len(loose.pruned) >= len(strict.pruned)
    assert PLANTED in [c.channel for c in loose.pruned]


def test_clp_sanitized_model_equals_masked_evaluation(tmp_path):
    m = loaded(tmp_path, conv_bn_relu(kernel_boost=50.0))
    layers = discover_activations(m.proto)
    repair = run_baseline("clp", m, layers, Preprocess("NCHW", 3, 8, 8), None, Policy(), CPU)
    zeroed = {"r": [c.channel for c in repair.pruned]}
    clean = sanitize(m.proto, zeroed)
    images = np.random.default_rng(2).random((4, 3, 8, 8)).astype(np.float32)
    assert verify_sanitized(m.proto, clean, zeroed, images) <= 1e-5


def test_fp_needs_images(tmp_path):
    m = loaded(tmp_path, conv_bn_relu())
    with pytest.raises(DataError):
        run_baseline("fp", m, discover_activations(m.proto), Preprocess("NCHW", 3, 8, 8), None,
                     Policy(), CPU)


def test_fp_prunes_a_dead_channel_first_and_respects_the_budget(tmp_path):
    m = loaded(tmp_path, conv_bn_relu(dead=3))
    layers = discover_activations(m.proto)
    prep = Preprocess("NCHW", 3, 8, 8)
    pixels = np.random.default_rng(3).random((10, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(m.proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    labels = session.run(None, {"image": prep.to_model(pixels)})[0].argmax(1)
    policy = Policy()
    repair = run_baseline("fp", m, layers, prep, ImageSet(pixels, labels), policy, CPU)
    assert repair.pruned[0].channel == 3 and repair.pruned[0].shapley == 0.0
    assert all(c.layer == "r" for c in repair.pruned)  # the last feature-map layer
    assert repair.fewshot_acc_before == 1.0
    assert repair.fewshot_acc_before - repair.fewshot_acc_after \
        <= policy.repair.max_clean_drop + 1e-9
    assert len(repair.pruned) <= int(0.8 * CHANNELS)


# ---------------------------------------------------------------- zoo model end to end

@pytest.fixture(scope="module")
def badnets():
    m = load_model(zoo_model("cnn_badnets"))
    prep = model_preprocess(m)
    return m, discover_activations(m.proto), prep, load_images(FEWSHOT, prep)


def test_fp_prunes_dormant_last_conv_channels_within_budget(badnets):
    m, layers, prep, images = badnets
    policy = Policy()
    repair = run_baseline("fp", m, layers, prep, images, policy, CPU)
    last = last_conv_layer(layers)
    assert repair.estimator == "fine-pruning" and repair.target == -1
    assert {c.layer for c in repair.pruned} == {last.name}
    assert 0 < len(repair.pruned) <= int(0.8 * last.channels)
    assert repair.fewshot_acc_before - repair.fewshot_acc_after \
        <= policy.repair.max_clean_drop + 1e-9
    # least active first: every pruned channel is at most as active as any kept one
    acts = [c.shapley for c in repair.pruned]
    assert acts == sorted(acts)
    assert repair.forward_passes > len(images)


@pytest.mark.parametrize("method", ["clp", "fp"])
def test_baseline_repair_exports_a_model_onnxruntime_runs(badnets, tmp_path, method):
    m, layers, prep, images = badnets
    repair = run_baseline(method, m, layers, prep, images, Policy(), CPU)
    zeroed: dict[str, list[int]] = {}
    for c in repair.pruned:
        zeroed.setdefault(c.layer, []).append(c.channel)
    clean = sanitize(m.proto, zeroed)
    path = save(clean, tmp_path / "sanitized.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: prep.to_model(images.pixels)})[0]
    acc = float((logits.argmax(1) == images.labels).mean())
    assert acc == pytest.approx(repair.fewshot_acc_after, abs=1e-9)
    if zeroed:
        assert verify_sanitized(m.proto, clean, zeroed, prep.to_model(images.pixels)) <= 1e-5


def test_scan_cli_fp_writes_a_sanitized_model_onnxruntime_loads(run_cli, tmp_path):
    out, report = tmp_path / "sanitized.onnx", tmp_path / "r.json"
    result = run_cli("scan", zoo_model("cnn_badnets"), "--method", "fp", "--data", FEWSHOT,
                     "--out", out, "--report", report)
    # baselines detect nothing: no SS201, and a verdict that claims neither clean nor backdoor
    assert result.code == 0, result.err
    assert json.loads(report.read_text())["results"][0]["verdict"] == "repair-only"
    assert "REPAIR-ONLY" in result.out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (2, 10)
    pruned = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}[PRUNED_KEY])
    assert len(pruned) == 1 and len(next(iter(pruned.values()))) > 0


def test_scan_cli_clp_runs_without_data(run_cli, tmp_path):
    path = zoo_model("cnn_blended")
    m = load_model(path)
    expected = run_baseline("clp", m, discover_activations(m.proto), model_preprocess(m), None,
                            Policy(), CPU)
    out = tmp_path / "sanitized.onnx"
    result = run_cli("scan", path, "--method", "clp", "--out", out, "--quiet")
    assert result.code in (0, 1), result.err
    assert out.exists() == bool(expected.pruned)  # written only when CLP prunes something
    if out.exists():
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        x = np.zeros((2, 1, 28, 28), np.float32)
        assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (2, 10)


def test_scan_cli_ft_fine_tunes_every_weight_and_zeroes_nothing(run_cli, tmp_path):
    policy = tmp_path / "short.toml"  # a short run: what is checked is the plumbing
    policy.write_text('extends = "default"\n[repair.recover]\nsteps = 8\nlr = 1e-3\n')
    path = zoo_model("cnn_badnets")
    out, report = tmp_path / "ft.onnx", tmp_path / "r.json"
    result = run_cli("scan", path, "--method", "ft", "--data", FEWSHOT, "--policy", policy,
                     "--out", out, "--report", report)
    assert result.code == 0, result.err
    rep = json.loads(report.read_text())["results"][0]
    assert rep["verdict"] == "repair-only" and rep["repair"]["pruned"] == []
    assert "fine-tuned: 8 steps" in result.out
    original, tuned = onnx.load(path), onnx.load(out)
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in original.graph.node]
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    changed = [t.name for t in tuned.graph.initializer
               if not np.array_equal(numpy_helper.to_array(t), before[t.name])]
    assert changed, "fine-tuning wrote the original weights back"
    assert "shapscan.recover" in {p.key for p in tuned.metadata_props}
    prep = model_preprocess(load_model(path))
    images = load_images(FEWSHOT, prep)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: prep.to_model(images.pixels)})[0]
    assert float((logits.argmax(1) == images.labels).mean()) == pytest.approx(
        rep["repair"]["after"]["fewshot_acc"], abs=1e-9)


def test_scan_cli_ft_needs_clean_images(run_cli):
    result = run_cli("scan", zoo_model("cnn_badnets"), "--method", "ft")
    assert result.code == 4
    assert "--method ft trains on clean images" in result.err
