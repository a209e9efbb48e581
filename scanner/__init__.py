"""shapscan: vet ONNX models for backdoors and repair them (Shapley pruning on ONNX Runtime)."""

__version__ = "0.1.0"
