"""The gradient program on the nine classic ONNX Model Zoo graphs that ship inside the onnx
wheel (onnx/backend/test/data/light: opset 9, converted to 17 on load; 1,000 classes,
224x224, batch 1).

Their weights are ConstantOfShape fills of one value, so every class gets the same logit
and the input gradient of the CE loss is exactly zero. For the finite-difference check
the fills are replaced by seeded random tensors of the same shapes (LeCun-scaled weights,
positive BN variances and scales, small biases): the graph, and so the
backward program, is the zoo's own. Same tolerance as test_autodiff_zoo (float64 central
differences, relative error <= 1e-3), on 2 directions at eps 1e-8 (as there: millions of
ReLUs, and a larger step crosses their kinks): one direction perturbs all 150,528
coordinates.
Skipped when the onnx wheel has no light models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from scanner.autodiff import check_gradients
from scanner.autodiff.program import GRAD_OUTPUT, build_program
from scanner.graph.load import load_model
from scanner.graph.logits import flat_logits

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
          "shufflenet", "squeezenet", "vgg19", "zfnet512"]
FD_TOL = 1e-3
# DenseNet's input gradient is ~5e-6 here: at eps 1e-8 the float64 loss's round-off is as
# large as the difference (relative error 1.3e-2); at 1e-6, 5.7e-4
EPS = {"densenet121": 1e-6}


def _light(name: str) -> onnx.ModelProto:
    path = LIGHT / f"light_{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path.name} is not in this onnx wheel")
    # what every stage runs: converted on load, [N, K] logits (DenseNet, SqueezeNet)
    return flat_logits(load_model(path).proto)


def randomized(proto: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy whose ConstantOfShape weight fills are seeded random initializers."""
    rng = np.random.default_rng(seed)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    scales, variances = {n.input[1] for n in bn}, {n.input[4] for n in bn}
    # caffe2's per-channel scale layers (DenseNet: Mul by an Unsqueezed [C] fill) are scales
    # too: small random ones would make the signal vanish over 120 layers
    producer = {o: n for n in model.graph.node for o in n.output}
    for mul in (n for n in model.graph.node if n.op_type == "Mul"):
        for name in mul.input:
            while name in producer and producer[name].op_type in ("Unsqueeze", "Reshape"):
                name = producer[name].input[0]
            scales.add(name)
    kept = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            kept.append(node)
            continue
        shape = [int(d) for d in shapes[node.input[0]]]
        name = node.output[0]
        if len(shape) >= 2:  # LeCun-scaled: logits stay O(1) through 50 layers
            value = rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[1:])), shape)
        elif name in variances:
            value = rng.uniform(0.5, 1.5, shape)
        elif name in scales:
            value = rng.uniform(0.5, 1.0, shape)
        else:  # biases, BN shifts and means
            value = rng.normal(0.0, 0.05, shape)
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32),
                                                               node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    # IR 3 (these files' version) only sees initializers that are also graph inputs; the
    # new ones are not, and shape inference would lose every shape after them
    model.ir_version = max(model.ir_version, 8)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_light_zoo_gradient_program_builds(name: str) -> None:
    """Sum (ResNet-50, ShuffleNet), LRN (AlexNet, ZFNet, Inception-v1), [N, K, 1, 1]
    outputs (DenseNet, SqueezeNet) all have a backward pass now."""
    proto = _light(name)
    program = build_program(proto)
    producer = {o: n for n in program.model.graph.node for o in n.output}
    grad = producer[producer[GRAD_OUTPUT].input[0]]
    assert grad.op_type != "ConstantOfShape"  # not the zeros of an input the loss ignores
    # all but DenseNet end in a Softmax (SqueezeNet's behind a Reshape): the CE head must
    # read the logits under it
    ends_in_softmax = name != "densenet121"
    assert (program.logits_name != proto.graph.output[0].name) == ends_in_softmax


# Inception-v2's randomised copy: the error is float64 round-off over a tiny gradient (it
# scales as 1/eps: 8.8e-2 at 1e-8, 9.4e-3 at 1e-7, 1.0e-3 at 1e-6) until larger steps cross
# ReLU kinks (2.4e-3 at 3e-6, 2.2e-3 at 1e-5): no step reaches 1e-3 with a margin. The
# op it alone has, AveragePool with pads and count_include_pad 0 (3x3 pad 1; 7x7 end pads),
# checks to 1e-9 on a small graph; weights that keep its gradient larger are the open fix.
_ROUND_OFF = pytest.mark.xfail(reason="float64 round-off vs ReLU kinks: no eps gets "
                               "Inception-v2 under 1e-3 with a margin", strict=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(m, marks=_ROUND_OFF) if m == "inception_v2"
                                  else m for m in MODELS])
def test_light_zoo_gradient_matches_finite_differences(name: str) -> None:
    proto = randomized(_light(name))
    x = np.random.default_rng(0).random((1, 3, 224, 224)).astype(np.float32)
    targets = np.eye(1000, dtype=np.float32)[[3]]
    err = check_gradients(proto, x, target_weights=targets, eps=EPS.get(name, 1e-8),
                          directions=2)
    assert err <= FD_TOL, f"{name}: relative error {err:.2e}"
