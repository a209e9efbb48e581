"""ONNX graph engine: safe loading, activation discovery, mask insertion, export."""
