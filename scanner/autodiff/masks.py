"""Gradients of a logit margin with respect to the channel masks: a first-order estimate of
what zeroing each channel would do, for every channel in one backward pass.

The model gets a mask input after each scored layer (`graph.mask.insert_masks`, as the
Shapley stage uses); the head is the weighted logit sum m_n = sum_k W_nk · logits_nk (with
W = e_target − e_label it is the margin of the target over the true class), and the program
returns d m_n / d mask_i for every row. All masks are fed as ones: the gradient is then
sum over positions of activation × d m / d activation, what zeroing the channel would take
away to first order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from ..budget import row_bytes, rows_per_run
from ..findings import LayerInfo
from ..graph.mask import insert_masks, mask_inputs
from ..runtime import Device, make_session
from .backward import attach, backprop_many, float_type
from .context import VJPContext
from .program import (
    MAX_RUN_VALUES,
    TARGET_INPUT,
    _with_scatter_add,
    classifier_logits,
    image_input,
)

MASK_GRAD_SUFFIX = "__mask_grad"


class MaskGradientProgram:
    """Logits and d (sum_k W_k logits_k) / d mask for rows of images, one session."""

    def __init__(self, proto: onnx.ModelProto, layers: Sequence[LayerInfo],
                 device: Device | None = None, threads: int | None = None,
                 max_bytes: int | None = None) -> None:
        specs = mask_inputs(proto, layers)
        self.max_rows = rows_per_run(row_bytes(proto), max_bytes)
        model = _with_scatter_add(insert_masks(proto, layers))
        self.input_name = image_input(model)
        self._masks = [(s.input_name, s.shape, s.layer.channels) for s in specs]
        self._dtype = float_type(model, self.input_name)
        elem = helper.np_dtype_to_tensor_dtype(self._dtype)
        ctx = VJPContext(model, self._dtype)
        logits = classifier_logits(model, ctx)
        model.graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, elem, ["N", "K"]))
        grads = backprop_many(model, ctx, [name for name, _, _ in self._masks],
                              {logits: TARGET_INPUT})
        outputs = [name + MASK_GRAD_SUFFIX for name, _, _ in self._masks]
        for g, out in zip(grads, outputs, strict=True):
            ctx.nodes.append(helper.make_node("Identity", [g], [out], name=out))
        attach(model, ctx)
        del model.graph.output[:]
        model.graph.output.extend([helper.make_tensor_value_info(logits, elem, None)] + [
            helper.make_tensor_value_info(out, elem, None) for out in outputs])
        self._outputs = [logits, *outputs]
        self._session = make_session(model, device, threads)
        self.n_channels = sum(c for _, _, c in self._masks)

    def run(self, x: np.ndarray, weights: np.ndarray, coalition: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """(logits [N, K], d (W · logits) / d channel [N, channels]), channels in `layers`
        order (the Shapley stage's flat index); every mask 1, or `coalition` [channels]
        (0 = zeroed) on every row."""
        x = np.ascontiguousarray(x, self._dtype)
        weights = np.ascontiguousarray(weights, self._dtype)
        on = np.ones(self.n_channels, self._dtype) if coalition is None else coalition
        bounds = np.cumsum([0] + [c for _, _, c in self._masks])
        rows = max(1, MAX_RUN_VALUES // max(1, int(np.prod(x.shape[1:]))))
        rows = min(rows, self.max_rows or rows)
        logits, grads = [], []
        for s in range(0, len(x), rows):
            n = len(x[s:s + rows])
            feeds = {self.input_name: x[s:s + rows], TARGET_INPUT: weights[s:s + rows]}
            feeds.update({name: np.broadcast_to(on[a:b].astype(self._dtype), (n, b - a))
                          .reshape(shape(n)) for (name, shape, _), a, b
                          in zip(self._masks, bounds[:-1], bounds[1:], strict=True)})
            out, *per_layer = self._session.run(self._outputs, feeds)
            logits.append(out)
            grads.append(np.concatenate([g.reshape(n, c) for g, (_, _, c)
                                         in zip(per_layer, self._masks, strict=True)], axis=1))
        return np.concatenate(logits), np.concatenate(grads)
