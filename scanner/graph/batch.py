"""Models exported with a fixed batch size (often 1): a copy that runs any batch.

Every stage runs many rows per ONNX Runtime call (trigger reverse: 270; Shapley: thousands),
so a model whose image input is pinned to [1, C, H, W] is relaxed before it is run: the
input's and outputs' batch dim become a symbol, intermediate shapes are dropped, and
Reshape targets that spell the batch size ([1, -1]) copy it instead ([0, -1]). The copy
is only used when it gives the original's outputs row for row; the sanitized export keeps
the original's interface.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import Inconclusive, first_line
from ..runtime import make_session

BATCH = "shapscan_batch"
TOLERANCE = 1e-4  # relative, on the outputs: the same kernels run on more rows


def fixed_batch(proto: onnx.ModelProto, input_name: str) -> int | None:
    """The image input's batch size when it is a number, else None."""
    value = next(v for v in proto.graph.input if v.name == input_name)
    dims = value.type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def any_batch(proto: onnx.ModelProto, input_name: str, sample_shape: tuple[int, ...]
              ) -> onnx.ModelProto:
    """`proto` itself when its batch dim is free; else the relaxed copy, checked on random
    rows of `sample_shape` (one image). Inconclusive when no copy runs like the original."""
    fixed = fixed_batch(proto, input_name)
    if fixed is None:
        return proto
    relaxed = _relax(proto, input_name, fixed)
    rng = np.random.default_rng(0)
    x = rng.random((2 * fixed, *sample_shape)).astype(_input_dtype(proto, input_name))
    try:
        original = make_session(proto)
        wanted = [np.concatenate([original.run(None, {input_name: x[i:i + fixed]})[k]
                                  for i in (0, fixed)]) for k in range(len(proto.graph.output))]
        got = make_session(relaxed).run(None, {input_name: x})
        same = all(w.shape == g.shape and np.allclose(g, w, rtol=TOLERANCE, atol=TOLERANCE)
                   for w, g in zip(wanted, got, strict=True))
        why = "its outputs change with the batch size"
    except Exception as exc:  # noqa: BLE001  ORT's errors have no common type
        same, why = False, first_line(exc, 160)
    if not same:
        raise Inconclusive(f"inconclusive: the model's batch size is fixed at {fixed} and a "
                           f"copy with a free batch dim does not run like it ({why}); "
                           "re-export it with a dynamic batch axis")
    return relaxed


def _relax(proto: onnx.ModelProto, input_name: str, fixed: int) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name == input_name or (dims and dims[0].HasField("dim_value")
                                        and dims[0].dim_value == fixed):
            dims[0].Clear()
            dims[0].dim_param = BATCH
    del graph.value_info[:]
    inits = {t.name: t for t in graph.initializer}
    per_row = {input_name}  # tensors computed from the image (graph.node is toposorted)
    for node in graph.node:
        if any(i in per_row for i in node.input):
            per_row.update(o for o in node.output if o)
    for node in graph.node:
        if (node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in inits
                or node.input[0] not in per_row):
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        shape = numpy_helper.to_array(inits[node.input[1]])
        if shape.ndim == 1 and len(shape) and shape[0] == fixed:
            shape = shape.copy()
            shape[0] = 0  # copy the input's batch dim
            name = f"{node.input[1]}__{BATCH}"
            if name not in inits:
                inits[name] = numpy_helper.from_array(shape, name)
                graph.initializer.append(inits[name])
            node.input[1] = name
    return model


def _input_dtype(proto: onnx.ModelProto, input_name: str) -> np.dtype:
    value = next(v for v in proto.graph.input if v.name == input_name)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
