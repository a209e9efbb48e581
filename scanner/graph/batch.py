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
from .walk import first_input

BATCH = "shapscan_batch"
TOLERANCE = 1e-4  # relative, on the outputs: the same kernels run on more rows


def any_batch(proto: onnx.ModelProto, sample_shape: tuple[int, ...]) -> onnx.ModelProto:
    """`proto` itself when its image input's batch dim is free; else the relaxed copy,
    checked on random rows of `sample_shape` (one image). Inconclusive when no copy runs
    like the original."""
    image = first_input(proto)
    dims = image.type.tensor_type.shape.dim if image is not None else []
    if not dims or not dims[0].HasField("dim_value"):
        return proto
    fixed, name = dims[0].dim_value, image.name
    relaxed = _relax(proto, name, fixed)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(image.type.tensor_type.elem_type)
    x = np.random.default_rng(0).random((2 * fixed, *sample_shape)).astype(dtype)
    try:
        original = make_session(proto)
        chunks = [original.run(None, {name: x[i:i + fixed]}) for i in (0, fixed)]
        wanted = [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
        got = make_session(relaxed).run(None, {name: x})
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
