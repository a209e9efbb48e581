"""Safe model loading. Every refusal raises ModelRefused with a stable rule id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import ModelRefused
from ..findings import Finding


@dataclass
class LoadedModel:
    proto: onnx.ModelProto
    path: Path
    sha256: str
    size_bytes: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}

    def image_input(self) -> tuple[str, list[int | str]]:
        """The (name, shape) of the model's image input (the first non-initializer input)."""
        inits = {i.name for i in self.proto.graph.initializer}
        for inp in self.proto.graph.input:
            if inp.name not in inits:
                dims = inp.type.tensor_type.shape.dim
                return inp.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                  for d in dims]
        raise ModelRefused("model has no graph input", rule_id="SS107")


def load_model(path: str | Path) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise ModelRefused(f"{path}: no such file", rule_id="SS101")
    raw = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(raw)
    except Exception:
        raise ModelRefused(f"{path}: not an ONNX model (protobuf parse failed)",
                           rule_id="SS101") from None
    if not proto.graph.node:
        raise ModelRefused(f"{path}: not an ONNX model (no graph nodes)", rule_id="SS101")
    return LoadedModel(proto, path, hashlib.sha256(raw).hexdigest(), len(raw))
