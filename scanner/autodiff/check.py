"""Central finite-difference checks of the emitted backward graphs.

onnxruntime's CPU kernels have no float64 Conv/Pool/Erf, so the float64 check runs the
program graph (forward, heads and backward, cast to double) in onnx's reference
evaluator: finite differences in double precision with small eps (default 1e-7) have
truncation error ~eps^2 and round-off ~1e-16/eps, so a correct rule agrees to ~1e-8 except
where a direction crosses a kink (ReLU, max) within eps. The float32 mode checks the graph
onnxruntime will really run, with a looser expectation (~1e-4 on smooth graphs at
eps=1e-2); on ReLU/MaxPool networks kinks within a float32-sized eps dominate (zoo CNN:
0.6 at eps=1e-2, 0.04 at 1e-4), so check those in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_max_pool import MaxPool as ReferenceMaxPool

from ..graph.precision import retype
from ..runtime import session_options
from .backward import COTANGENT_SUFFIX, GRAD_SUFFIX, build_vjp
from .params import CE_OUTPUT as PARAM_CE_OUTPUT
from .params import INV_TEMPERATURE_INPUT, PARAM_GRAD_SUFFIX, build_parameter_program
from .program import (
    BN_LOSS_OUTPUT,
    BN_WEIGHT_INPUT,
    CE_OUTPUT,
    GRAD_OUTPUT,
    TARGET_INPUT,
    build_program,
)

FLOAT, DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
# Inputs that the spec types as float32 whatever the data type (Resize scales).
_FLOAT_ONLY_SLOTS = {"Resize": (2,), "Upsample": (1,)}


def to_double(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy computing in float64: float initializers, constants, casts and I/O types."""
    keep_float = {n.input[i] for n in proto.graph.node
                  for i in _FLOAT_ONLY_SLOTS.get(n.op_type, ()) if i < len(n.input)}
    model = retype(proto, {FLOAT}, DOUBLE, keep=keep_float)
    del model.graph.value_info[:]
    return model


class ConvTranspose(OpRun):
    """ConvTranspose for the reference evaluator: one einsum per kernel tap instead of the
    reference's per-element col2im (100x faster). Covers the attributes the backward rules
    emit (explicit pads, output_padding; no auto_pad/output_shape). Its correctness is
    checked by the same finite differences, through the Conv it is the adjoint of."""

    op_domain = ""  # the class name is the op type it replaces

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None,  # noqa: N803
             kernel_shape=None, output_padding=None, output_shape=None, pads=None,
             strides=None):
        if output_shape is not None or auto_pad not in (None, "NOTSET"):
            raise NotImplementedError("ConvTranspose override: auto_pad/output_shape")
        r = X.ndim - 2
        k = W.shape[2:]
        dil = dilations or [1] * r
        st = strides or [1] * r
        pads = pads or [0] * (2 * r)
        extra = output_padding or [0] * r
        group = group or 1
        n, cin = X.shape[:2]
        cout_g = W.shape[1]
        full = [(X.shape[2 + i] - 1) * st[i] + (k[i] - 1) * dil[i] + 1 + extra[i]
                for i in range(r)]
        out = np.zeros((n, cout_g * group, *full), X.dtype)
        cin_g = cin // group
        for gi in range(group):
            xg = X[:, gi * cin_g:(gi + 1) * cin_g]
            for tap in np.ndindex(*k):
                wt = W[(slice(gi * cin_g, (gi + 1) * cin_g), slice(None), *tap)]  # [cin_g, cout_g]
                contrib = np.tensordot(xg, wt, axes=([1], [0]))  # [n, *in, cout_g]
                contrib = np.moveaxis(contrib, -1, 1)
                where = tuple(slice(tap[i] * dil[i], tap[i] * dil[i]
                                    + (X.shape[2 + i] - 1) * st[i] + 1, st[i]) for i in range(r))
                out[(slice(None), slice(gi * cout_g, (gi + 1) * cout_g), *where)] += contrib
        crop = tuple(slice(pads[i], full[i] - pads[i + r]) for i in range(r))
        out = out[(slice(None), slice(None), *crop)]
        if B is not None:
            out = out + B.reshape((1, -1) + (1,) * r)
        return (out,)


class Erf(OpRun):
    """The reference Erf rounds through float32 (np.vectorize(otypes="f")), which would
    swamp float64 finite differences."""

    op_domain = ""

    def _run(self, x):
        return (_erf64(x).astype(x.dtype),)


_erf64 = np.vectorize(math.erf, otypes=[np.float64])


class LRN(OpRun):
    """The reference LRN loops over the batch axis instead of the channels (onnx 1.x), so
    it is wrong whenever the two sizes differ; this one follows the spec, any rank."""

    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        alpha = 1e-4 if alpha is None else alpha
        beta = 0.75 if beta is None else beta
        bias = 1.0 if bias is None else bias
        lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
        square = x * x
        total = np.zeros_like(x)
        for c in range(x.shape[1]):
            total[:, c] = square[:, max(0, c - lo):c + hi + 1].sum(axis=1)
        return ((x / (bias + (alpha / size) * total) ** beta).astype(x.dtype),)


class MaxPool(ReferenceMaxPool):
    """The reference MaxPool's shortcut for stride 1 (onnx 1.x) returns Indices counted in
    the padded tensor, so the backward scatter lands on the wrong pixels (Inception's 3x3
    stride-1 pad-1 pools); its general path counts them in the input, as the spec and
    onnxruntime do."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None,
             pads=None, storage_order=None, strides=None):
        return self._max_pool(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                              kernel_shape=kernel_shape, pads=pads,
                              storage_order=storage_order, strides=strides)


REFERENCE_OVERRIDES = [ConvTranspose, Erf, LRN, MaxPool]


def prune(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy keeping only the nodes `outputs` need (the reference evaluator runs all)."""
    need = set(outputs)
    keep = []
    for node in reversed(model.graph.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    del pruned.graph.node[:]
    pruned.graph.node.extend(reversed(keep))
    kept_out = [o for o in model.graph.output if o.name in outputs]
    del pruned.graph.output[:]
    pruned.graph.output.extend(kept_out)
    return pruned


@dataclass(frozen=True)
class Evaluator:
    """Runs a model by name/feeds in float64 (reference) or float32 (onnxruntime)."""

    model: onnx.ModelProto
    precision: str

    def __post_init__(self) -> None:
        if self.precision == "float64":
            object.__setattr__(self, "_run", ReferenceEvaluator(
                self.model, new_ops=REFERENCE_OVERRIDES).run)
        else:
            sess = ort.InferenceSession(self.model.SerializeToString(), session_options(2),
                                        providers=["CPUExecutionProvider"])
            object.__setattr__(self, "_run", sess.run)

    @property
    def dtype(self) -> type:
        return np.float64 if self.precision == "float64" else np.float32

    def __call__(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cast = {k: (v.astype(self.dtype) if v.dtype.kind == "f" else v) for k, v in feeds.items()}
        return self._run(outputs, cast)  # type: ignore[attr-defined]


def _prepare(proto: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be float64 or float32, not {precision!r}")
    return to_double(proto) if precision == "float64" else proto


def _directions(x: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """Gaussian directions, scaled up to the input's RMS when that exceeds 1 (a 0..255
    input needs proportionally larger steps to stay clear of round-off)."""
    rng = np.random.default_rng(seed)
    scale = max(float(np.sqrt(np.mean(np.square(x)))), 1.0)
    return [rng.standard_normal(x.shape) * scale for _ in range(count)]


def relative_error(numeric: np.ndarray, analytic: np.ndarray) -> float:
    """||numeric - analytic|| / max(||numeric||, ||analytic||) over the directions."""
    scale = max(float(np.linalg.norm(numeric)), float(np.linalg.norm(analytic)), 1e-30)
    return float(np.linalg.norm(numeric - analytic)) / scale


def check_gradients(proto: onnx.ModelProto, x: np.ndarray, *,
                    target_weights: np.ndarray | None = None, bn_stats: bool = False,
                    bn_weight: float = 0.0, eps: float | None = None, directions: int = 3,
                    precision: str = "float64", seed: int = 0) -> float:
    """Relative error of the GradientProgram gradient against central differences of
    its loss along `directions` random Gaussian directions (see `relative_error`).

    Default eps: 1e-7 in float64, 1e-2 in float32 (round-off). In float64 the error of a
    ReLU/MaxPool network is dominated by directions crossing a kink within eps, so it
    shrinks with eps: on the zoo CNN, 4e-2 at eps=1e-3, 1e-2 at 1e-6, 1e-4 at 1e-7,
    5e-8 at 1e-8 (where round-off takes over)."""
    eps = _default_eps(precision) if eps is None else eps
    x = np.asarray(x, np.float64)
    prog = build_program(_prepare(proto, precision), bn_stats)
    run = Evaluator(prog.model, precision)
    forward = Evaluator(prune(prog.model, [prog.logits_name, CE_OUTPUT, BN_LOSS_OUTPUT]), precision)
    if target_weights is None:
        k = int(forward([prog.logits_name], _feeds(prog.input_name, x, None, 0.0))[0].shape[1])
        rng = np.random.default_rng(seed + 1)
        target_weights = np.eye(k)[rng.integers(0, k, len(x))]
    t = np.asarray(target_weights, np.float64)

    def loss(at: np.ndarray) -> float:
        ce, bn = forward([CE_OUTPUT, BN_LOSS_OUTPUT], _feeds(prog.input_name, at, t, bn_weight))
        return float(np.sum(ce, dtype=np.float64) + bn_weight * float(bn))

    grad = run([GRAD_OUTPUT], _feeds(prog.input_name, x, t, bn_weight))[0].astype(np.float64)
    dirs = _directions(x, directions, seed)
    numeric = np.array([(loss(x + eps * d) - loss(x - eps * d)) / (2 * eps) for d in dirs])
    analytic = np.array([float(np.sum(grad * d)) for d in dirs])
    return relative_error(numeric, analytic)


def reference_gradient(proto: onnx.ModelProto, x: np.ndarray, target_weights: np.ndarray, *,
                       bn_stats: bool = False, bn_weight: float = 0.0) -> np.ndarray:
    """The GradientProgram gradient computed in float64 by the reference evaluator: what
    the float32 onnxruntime gradient should equal up to round-off."""
    prog = build_program(to_double(proto), bn_stats)
    feeds = _feeds(prog.input_name, np.asarray(x, np.float64),
                   np.asarray(target_weights, np.float64), bn_weight)
    return Evaluator(prog.model, "float64")([GRAD_OUTPUT], feeds)[0]


def _feeds(name: str, x: np.ndarray, t: np.ndarray | None, w: float) -> dict[str, np.ndarray]:
    k = 1 if t is None else t.shape[1]
    t = np.zeros((len(x), k)) if t is None else t
    return {name: x, TARGET_INPUT: t, BN_WEIGHT_INPUT: np.array(w)}


def _default_eps(precision: str) -> float:
    return 1e-7 if precision == "float64" else 1e-2


def check_vjp(proto: onnx.ModelProto, inputs: dict[str, np.ndarray], wrt: str, *,
              eps: float | None = None, directions: int = 3, precision: str = "float64",
              seed: int = 0) -> float:
    """The same check for `build_vjp` on every graph output, with random cotangents:
    loss = sum_outputs <output, cotangent>. For testing single rules."""
    eps = _default_eps(precision) if eps is None else eps
    model = _prepare(proto, precision)
    outputs = [o.name for o in model.graph.output]
    vjp = build_vjp(model, wrt, outputs)
    run, forward = Evaluator(vjp, precision), Evaluator(model, precision)
    base = forward(outputs, inputs)
    rng = np.random.default_rng(seed + 7)
    cots = {o + COTANGENT_SUFFIX: rng.standard_normal(np.shape(v))
            for o, v in zip(outputs, base, strict=True)}

    def loss(at: np.ndarray) -> float:
        vals = forward(outputs, {**inputs, wrt: at})
        return float(sum(np.sum(np.asarray(v, np.float64) * cots[o + COTANGENT_SUFFIX])
                         for o, v in zip(outputs, vals, strict=True)))

    grad = run([wrt + GRAD_SUFFIX], {**inputs, **cots})[0].astype(np.float64)
    x = np.asarray(inputs[wrt], np.float64)
    dirs = _directions(x, directions, seed)
    numeric = np.array([(loss(x + eps * d) - loss(x - eps * d)) / (2 * eps) for d in dirs])
    analytic = np.array([float(np.sum(grad * d)) for d in dirs])
    return relative_error(numeric, analytic)


def check_parameter_gradients(proto: onnx.ModelProto, x: np.ndarray, target_weights: np.ndarray,
                              params: list[str], *, inv_temperature: float = 1.0,
                              eps: float | None = None, directions: int = 3,
                              precision: str = "float64", seed: int = 0) -> float:
    """Relative error of the ParameterProgram gradients against central differences of its
    loss (sum of soft-target CE) along random directions that move every parameter in
    `params` at once (a wrong parameter gradient shows unless its share is negligible;
    tests/test_autodiff_params.py checks each rule alone)."""
    eps = _default_eps(precision) if eps is None else eps
    model = _prepare(proto, precision)
    prog = build_parameter_program(model, params)
    run = Evaluator(prog.model, precision)
    forward = Evaluator(prune(prog.model, [PARAM_CE_OUTPUT]), precision)
    values = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64)
              for t in model.graph.initializer if t.name in set(params)}
    base = {prog.input_name: np.asarray(x, np.float64),
            TARGET_INPUT: np.asarray(target_weights, np.float64),
            INV_TEMPERATURE_INPUT: np.array(inv_temperature)}

    def loss(at: dict[str, np.ndarray]) -> float:
        return float(np.sum(forward([PARAM_CE_OUTPUT], {**base, **at})[0], dtype=np.float64))

    grads = run([p + PARAM_GRAD_SUFFIX for p in params], {**base, **values})
    rng = np.random.default_rng(seed)
    numeric, analytic = [], []
    for _ in range(directions):
        d = {p: rng.standard_normal(values[p].shape) for p in params}
        plus = {p: values[p] + eps * d[p] for p in params}
        minus = {p: values[p] - eps * d[p] for p in params}
        numeric.append((loss(plus) - loss(minus)) / (2 * eps))
        analytic.append(sum(float(np.sum(np.asarray(g, np.float64) * d[p]))
                            for p, g in zip(params, grads, strict=True)))
    return relative_error(np.array(numeric), np.array(analytic))
