"""Write the tiny timm ConvNeXt and ViT graphs the autodiff tests differentiate.

    python samples/make_autodiff_fixtures.py   (needs torch and timm: not in CI)

Random weights (every parameter perturbed so LayerNorm scales, layer scales and biases are
not at their 1 / 0 / 1e-6 initial values), 32x32 RGB, 10 classes, exported with the
TorchScript exporter (dynamo=False) and a dynamic batch axis:
- convnext_tiny32.onnx: ConvNeXt, depths (1, 1, 1, 1), dims (8, 8, 16, 16), opset 17: channels-last
  blocks (Permute, LayerNormalization, MatMul, Erf GELU, layer scale), LayerNorm2d stem;
- vit_tiny32.onnx: VisionTransformer, patch 8, dim 16, depth 2, 2 heads, opset 17: class
  token (Expand, Concat), position embedding, attention (MatMul, Softmax), Gather of the
  class token;
- vit_tiny32_opset14.onnx: the same ViT at opset 14, where LayerNorm is exported as
  ReduceMean / Sub / Pow / Sqrt / Div.
The files are committed under tests/fixtures (a few tens of KB each); the tests skip when
they are missing.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _export(model: torch.nn.Module, name: str, opset: int) -> None:
    path = OUT / name
    torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(path), dynamo=False,
                      opset_version=opset, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    print(f"{path}: {path.stat().st_size} bytes")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    convnext = timm.models.convnext.ConvNeXt(num_classes=10, depths=(1, 1, 1, 1),
                                             dims=(8, 8, 16, 16),
                                             ls_init_value=0.5)
    _export(_perturb(convnext, 0), "convnext_tiny32.onnx", 17)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, num_classes=10, embed_dim=16, depth=2, num_heads=2)
    vit = _perturb(vit, 1)
    _export(vit, "vit_tiny32.onnx", 17)
    _export(vit, "vit_tiny32_opset14.onnx", 14)


if __name__ == "__main__":
    main()
