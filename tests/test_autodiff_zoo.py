"""GradientProgram on every sample-zoo model against float64 finite differences.

Per model, on 2 few-shot images with "classify as another class" targets. The images get
a little noise: Fashion-MNIST backgrounds are exactly 0, so conv outputs there are equal
and MaxPool windows tie; at a tie max is not differentiable and central differences
measure the larger one-sided slope, not the (valid) subgradient the backward graph picks.
- the float64 gradient (graph cast to double, onnx reference evaluator) agrees with
  central differences (eps=1e-8, 3 random directions; a larger eps crosses ReLU kinks)
  to relative error <= 1e-3;
- the float32 gradient onnxruntime computes agrees with that float64 gradient to 1e-3
  (relative L2).
Skipped when samples/zoo.json (or a model file) is absent.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, SAMPLES, zoo_entries

from scanner.autodiff import GradientProgram, check_gradients, reference_gradient
from scanner.autodiff.check import check_parameter_gradients
from scanner.autodiff.params import trainable_parameters
from scanner.data import load_images, resolve_preprocess
from scanner.graph.load import load_model

ZOO = zoo_entries()
FD_TOL = 1e-3
F32_TOL = 1e-3


def _inputs(entry: dict) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    loaded = load_model(SAMPLES / entry["model"])
    _, shape = loaded.image_input()
    prep = resolve_preprocess(loaded.path, loaded.metadata, shape)
    images = load_images(FEWSHOT, prep).subset(np.array([0, 1]))
    noise = np.random.default_rng(0).uniform(0.0, 0.02, images.pixels.shape)
    x = prep.to_model((images.pixels * 0.96 + 0.02 + noise).astype(np.float32))
    targets = np.eye(10, dtype=np.float32)[(images.labels + 3) % 10]
    return loaded.proto, x, targets


@pytest.mark.skipif(not ZOO, reason="samples/zoo.json not built")
@pytest.mark.parametrize("entry", ZOO, ids=[e["name"] for e in ZOO])
def test_zoo_gradient_matches_finite_differences(entry: dict) -> None:
    proto, x, targets = _inputs(entry)
    err = check_gradients(proto, x, target_weights=targets, directions=3, eps=1e-8)
    assert err <= FD_TOL, f"{entry['name']}: relative error {err:.2e}"
    g32 = GradientProgram(proto).run(x, targets).grad
    g64 = reference_gradient(proto, x, targets)
    gap = float(np.linalg.norm(g32 - g64) / np.linalg.norm(g64))
    assert gap <= F32_TOL, f"{entry['name']}: float32 vs float64 gradient {gap:.2e}"


@pytest.mark.skipif(not ZOO, reason="samples/zoo.json not built")
@pytest.mark.parametrize("entry", ZOO, ids=[e["name"] for e in ZOO])
def test_zoo_parameter_gradients_match_finite_differences(entry: dict) -> None:
    """Every trainable parameter of the model (Conv/Gemm/MatMul weights and biases, BN
    scale and bias) moved at once along 3 random directions, soft targets as recovery
    uses them."""
    proto, x, targets = _inputs(entry)
    soft = 0.8 * targets + 0.02
    params = trainable_parameters(proto)
    assert params
    err = check_parameter_gradients(proto, x, soft, params, directions=3, eps=1e-8)
    assert err <= FD_TOL, f"{entry['name']}: relative error {err:.2e}"
