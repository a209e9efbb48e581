"""Rebuild the small library-architecture fixtures in this folder (random weights, seed 0).

    python tests/models/make_models.py            # all three
    python tests/models/make_models.py --only sklearn_mlp

Needs torch + timm (convnext_tiny10, vit_tiny10) and scikit-learn + skl2onnx
(sklearn_mlp); none of them is needed to run the tests, which read the .onnx files.
The weights are random (the tests check graph structure, axes, masks and export, not
accuracy), so a rebuild with other library versions may give other bytes.

- convnext_tiny10.onnx: timm ConvNeXt, depths (1, 1, 1, 1), dims (8, 8, 16, 16), 10
  classes, 1x32x32. Its blocks run channels-last: Transpose -> LayerNormalization ->
  MatMul -> GELU (Erf) -> MatMul -> Transpose.
- vit_tiny10.onnx: timm VisionTransformer, patch 4, dim 16, depth 2, 2 heads, MLP ratio 2,
  10 classes, 1x32x32: the GELU runs over [N, tokens, 32].
- sklearn_mlp.onnx: scikit-learn MLPClassifier (one hidden layer of 16 ReLU units) on flat
  [N, 784] inputs, exported by skl2onnx with its default ZipMap output (output_label int64,
  output_probability a sequence of maps) and the probability tensor kept beside it
  (sklearn_mlp_nozipmap.onnx is the same model converted with zipmap=False).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _export_torch(net, path: Path, size: int = 32) -> None:
    import torch
    net.eval()
    torch.onnx.export(net, torch.zeros(1, 1, size, size), str(path), dynamo=False,
                      opset_version=17, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})


def convnext() -> None:
    import timm.models.convnext as cx
    import torch
    torch.manual_seed(0)
    net = cx.ConvNeXt(in_chans=1, num_classes=10, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16),
                      ls_init_value=1.0, patch_size=4)
    _export_torch(net, HERE / "convnext_tiny10.onnx")


def vit() -> None:
    import timm.models.vision_transformer as vt
    import torch
    torch.manual_seed(0)
    net = vt.VisionTransformer(img_size=32, patch_size=4, in_chans=1, num_classes=10,
                               embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
    _export_torch(net, HERE / "vit_tiny10.onnx")


def sklearn_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat 28x28 images in [0, 1]: noise, and a bright 4x4 block whose place is the class."""
    y = np.arange(n) % 10
    x = rng.random((n, 28, 28), dtype=np.float32) * 0.5
    for i, label in enumerate(y):
        r, c = divmod(int(label), 5)
        x[i, 4 + 10 * r:8 + 10 * r, 2 + 5 * c:6 + 5 * c] += 0.5
    return x.reshape(n, 784), y


def sklearn_mlp() -> None:
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier
    rng = np.random.default_rng(0)
    x, y = sklearn_images(rng, 200)
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0).fit(x, y)
    for name, options in (("sklearn_mlp", None),
                          ("sklearn_mlp_nozipmap", {id(clf): {"zipmap": False}})):
        onx = to_onnx(clf, x[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3})
        (HERE / f"{name}.onnx").write_bytes(onx.SerializeToString())


BUILDERS = {"convnext_tiny10": convnext, "vit_tiny10": vit, "sklearn_mlp": sklearn_mlp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), action="append")
    for name in parser.parse_args().only or list(BUILDERS):
        BUILDERS[name]()
        print("wrote", name)


if __name__ == "__main__":
    main()
