"""What one batched run may hold in memory, from the graph's tensor sizes.

A gradient program keeps every forward activation for the backward pass and adds a
cotangent of the same size, so what one image row costs is about GRADIENT_FACTOR times the
sum of the forward tensors that carry the batch dimension. Shape inference gives those
sizes before anything runs: a 224x224 VGG-19 keeps about 0.1 GB per row forward, so the
1,000 rows of a data-free synthesis step in one run asked for 22.8 GB and were killed by
the kernel (issue #25). Runs are cut to fit `[load] max_batch_bytes` instead.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph.walk import first_input

GRADIENT_FACTOR = 3  # forward activations kept + their cotangents + temporaries
UNKNOWN_ROW_BYTES = 0  # no shape information: nothing to bound by


def row_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of every float tensor of one forward pass per image row: the tensors whose
    first dimension is the image input's batch dimension, as shape inference sees them
    (0 when inference gives nothing)."""
    image = first_input(proto)
    if image is None:
        return UNKNOWN_ROW_BYTES
    dims = image.type.tensor_type.shape.dim
    if not dims:
        return UNKNOWN_ROW_BYTES
    batch = dims[0].dim_param or None
    fixed = dims[0].dim_value if dims[0].HasField("dim_value") else None
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - inference is advisory here; no bound without it
        return UNKNOWN_ROW_BYTES
    total = 0
    seen: set[str] = set()
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if vi.name in seen or not tt.HasField("shape") or not tt.shape.dim:
            continue
        seen.add(vi.name)
        first = tt.shape.dim[0]
        per_row = (batch is not None and first.dim_param == batch) or (
            fixed is not None and first.HasField("dim_value") and first.dim_value == fixed)
        rest = tt.shape.dim[1:]
        if not per_row or not all(d.HasField("dim_value") for d in rest):
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize \
            if tt.elem_type else 4
        total += int(np.prod([d.dim_value for d in rest], dtype=np.int64)) * itemsize
    return total


def forward_rows(proto: onnx.ModelProto, max_bytes: int | None, cap: int = 1024) -> int:
    """Rows of one forward-only run (no gradient): at most `cap`, fewer under the budget."""
    rows = rows_per_run(row_bytes(proto), max_bytes, factor=1)
    return cap if rows is None else min(cap, rows)


def rows_per_run(per_row_bytes: int, max_bytes: int | None, factor: int = GRADIENT_FACTOR
                 ) -> int | None:
    """How many rows one run may take under `max_bytes` (None: no bound known or set)."""
    if not max_bytes or per_row_bytes <= 0:
        return None
    return max(1, int(max_bytes // (factor * per_row_bytes)))
