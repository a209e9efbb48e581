"""ONNX graph engine: safe loading, activation discovery, mask insertion, export.

load.py         load_model(path, allowed_domains=, max_bytes=) -> LoadedModel (SS101-SS114)
precision.py    widen(proto): a float16 / bfloat16 model's float32 copy; retype(...)
quantized.py    dequantize(proto): an int8 QDQ model's float copy, folded ReLUs restored
batch.py        any_batch(proto, sample_shape): a fixed-batch model as a free-batch copy
activations.py  discover(proto) -> Discovery (layers, skipped: SS209, SE gates);
                discover_activations(proto) -> [LayerInfo]; activation_maps_zero(op)
axis.py         AxisVotes: each activation's channel axis, read from the ops around it
scores.py       scores_copy(proto): skl2onnx's label/ZipMap outputs -> probability tensor
mask.py         insert_masks(proto, layers), mask_inputs(...), MaskedModel
prefix.py       split_at_masks(...), CoalitionEvaluator (prefix-cached coalition batches)
export.py       sanitize(proto, zeroed, metadata, layer_graph=), verify_sanitized, save_atomic
compare.py      compare_models(a, b, feeds, atol) -> max abs difference; probe_input
walk.py         graphs(graph): the graph and every subgraph; first_input(proto)
"""
