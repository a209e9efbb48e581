"""Provider selection, CPU fallback, threads, batched runs; the CUDA path's tests (named
test_cuda_*) run only with onnxruntime-gpu and an NVIDIA device: benchmarks/gpu_check.sh."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from graph_builders import conv_relu_model

from scanner import runtime
from scanner.runtime import (
    CPU,
    CUDA,
    Device,
    Runner,
    choose_providers,
    make_runner,
    make_session,
    resolve_device,
    run_batched,
    session_options,
)


@pytest.mark.parametrize("requested,available,usable,providers,warns", [
    ("cpu", [CUDA, CPU], True, (CPU,), False),
    ("auto", [CUDA, CPU], True, (CUDA, CPU), False),
    ("cuda", [CUDA, CPU], True, (CUDA, CPU), False),
    ("auto", [CPU], False, (CPU,), False),
    ("auto", [CUDA, CPU], False, (CPU,), False),
    ("cuda", [CPU], False, (CPU,), True),
    ("cuda", [CUDA, CPU], False, (CPU,), True),
])
def test_choose_providers_matrix(requested, available, usable, providers, warns):
    choice = choose_providers(requested, available, usable)
    assert choice.providers == providers
    assert (choice.warning is not None) is warns


def test_choose_providers_says_why_cuda_is_missing():
    assert "gpu" in choose_providers("cuda", [CPU], True).warning
    assert "device" in choose_providers("cuda", [CUDA, CPU], False).warning
    with pytest.raises(ValueError):
        choose_providers("tpu", [CPU], False)


def test_cuda_request_on_a_cpu_build_warns_exactly_once(monkeypatch):
    monkeypatch.setattr(runtime, "_warned_cuda", False)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CPU])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = resolve_device("cuda"), resolve_device("cuda")
    assert first.providers == second.providers == (CPU,)
    assert first.name == "cpu"
    assert len([w for w in caught if "CUDA" in str(w.message)]) == 1


def test_auto_on_cpu_is_silent(monkeypatch):
    monkeypatch.setattr(runtime, "_warned_cuda", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_device("auto").name in ("cpu", "cuda")


def test_session_options_threads_and_quiet_logs(monkeypatch):
    opts = session_options(3)
    assert opts.intra_op_num_threads == 3 and opts.log_severity_level == 4
    monkeypatch.setenv(runtime.THREADS_ENV, "2")
    assert session_options().intra_op_num_threads == 2


def test_the_predictor_keeps_no_memory_arena_and_gives_the_same_logits():
    """The scan holds its Predictor to the end and runs it a few times: without an arena its
    session does not keep its largest run's memory (1.5 GB on the 1,000-class 224x224 pair),
    and its logits are the arena session's, bit for bit."""
    from conftest import FEWSHOT, zoo_model

    from scanner import api
    from scanner.data import load_images
    from scanner.graph.load import load_model

    assert session_options().enable_cpu_mem_arena and not session_options(
        arena=False).enable_cpu_mem_arena
    model = load_model(zoo_model("cnn_badnets"))
    prep = api.model_preprocess(model)
    predict = api.Predictor(model, prep)
    assert not predict.session.get_session_options().enable_cpu_mem_arena
    pixels = load_images(FEWSHOT, prep).pixels
    with_arena = make_session(model.runnable)
    name, _ = model.image_input()
    np.testing.assert_array_equal(predict(pixels),
                                  with_arena.run(None, {name: prep.to_model(pixels)})[0])


def test_a_kernel_failure_raises_without_printing_a_second_copy(capfd):
    # the failure reaches the user as the exception's one line; ORT used to log it as well
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([7], np.int64), "shape")])
    session = make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(Exception, match="Reshape"):
        session.run(None, {"x": np.zeros(8, np.float32)})
    assert capfd.readouterr().err == ""


def test_runner_and_run_batched_on_cpu():
    proto = conv_relu_model()
    x = np.random.default_rng(0).random((7, 3, 8, 8), dtype=np.float32)
    session = make_session(proto, Device("cpu", (CPU,)), threads=1)
    whole = session.run(None, {"image": x})[0]
    np.testing.assert_array_equal(run_batched(session, {"image": x}, batch_size=3), whole)
    runner = make_runner(proto)
    assert isinstance(runner, Runner) and runner.device == "cpu" and not runner.on_cuda
    np.testing.assert_array_equal(runner.run(["logits"], {"image": x})[0], whole)


@pytest.mark.skipif(CUDA in runtime.ort.get_available_providers(),
                    reason="needs an onnxruntime build without the CUDA provider")
def test_cuda_device_without_the_provider_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(runtime, "_warned_cuda", False)
    proto = conv_relu_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = make_session(proto, Device("cuda", (CUDA, CPU)))
        make_session(proto, Device("cuda", (CUDA, CPU)))
    assert session.get_providers() == [CPU]
    assert len(caught) == 1 and "CUDA" in str(caught[0].message)


def test_resident_feeds_on_cpu_are_plain_arrays():
    proto = conv_relu_model()
    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    runner = make_runner(proto)
    kept = runner.resident(x)
    assert isinstance(kept, np.ndarray)
    np.testing.assert_array_equal(runner.run(["logits"], {}, {"image": kept})[0],
                                  runner.run(["logits"], {"image": x})[0])


def test_cli_says_the_cuda_fallback_in_one_line(run_cli, monkeypatch):
    monkeypatch.setattr(runtime, "_warned_cuda", False)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CPU])
    result = run_cli("eval", "samples/models/cnn_badnets.onnx", "--data",
                     "samples/data/fewshot.npz", "--device", "cuda")
    assert result.code == 0
    assert result.err == ("shapscan: warning: CUDA requested but unavailable: onnxruntime has "
                          "no CUDA execution provider (install onnxruntime-gpu in place of "
                          "onnxruntime: README, GPU); running on "
                          "CPU\n")


needs_cuda = pytest.mark.skipif(
    not (CUDA in runtime.ort.get_available_providers() and runtime._cuda_usable()),
    reason="needs onnxruntime-gpu and an NVIDIA device (benchmarks/gpu_check.sh)")
# ORT's CUDA provider may run float32 convolutions and GEMMs as TF32 (10-bit mantissa)
CUDA_TOLERANCE = {"rtol": 2e-3, "atol": 2e-3}


@needs_cuda
def test_cuda_session_runs_on_the_gpu_and_agrees_with_cpu():
    proto = conv_relu_model()
    x = np.random.default_rng(2).random((300, 3, 8, 8), dtype=np.float32)
    device = resolve_device("cuda")
    assert device.name == "cuda"
    runner = make_runner(proto, device)
    assert runner.on_cuda and runner.session.get_providers()[0] == CUDA
    on_cpu = make_session(proto, Device("cpu", (CPU,))).run(None, {"image": x})[0]
    np.testing.assert_allclose(runner.run(["logits"], {"image": x})[0], on_cpu,
                               **CUDA_TOLERANCE)
    # batched runs go through the same IOBinding path, a batch at a time
    np.testing.assert_allclose(run_batched(runner.session, {"image": x}, batch_size=128),
                               on_cpu, **CUDA_TOLERANCE)


@needs_cuda
def test_cuda_resident_feeds_stay_on_the_device_and_give_the_same_outputs():
    proto = conv_relu_model()
    x = np.random.default_rng(3).random((16, 3, 8, 8), dtype=np.float32)
    runner = make_runner(proto, resolve_device("cuda"))
    kept = runner.resident(x)
    assert isinstance(kept, runtime.ort.OrtValue) and kept.device_name().lower() == "cuda"
    np.testing.assert_array_equal(runner.run(["logits"], {}, {"image": kept})[0],
                                  runner.run(["logits"], {"image": x})[0])


@needs_cuda
def test_cuda_gradient_program_agrees_with_cpu():
    from scanner.autodiff import GradientProgram

    proto = conv_relu_model()
    rng = np.random.default_rng(4)
    x = rng.random((8, 3, 8, 8), dtype=np.float32)
    weights = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 8)]
    on_gpu = GradientProgram(proto, device=resolve_device("cuda")).run(x, weights)
    on_cpu = GradientProgram(proto, device=Device("cpu", (CPU,))).run(x, weights)
    np.testing.assert_allclose(on_gpu.grad, on_cpu.grad, **CUDA_TOLERANCE)
    np.testing.assert_allclose(on_gpu.logits, on_cpu.logits, **CUDA_TOLERANCE)
