"""Train and export the sample zoo: clean and backdoored Fashion-MNIST models in ONNX.

Needs the `train` extra (torch) and the Debian package `dataset-fashion-mnist`.

    python samples/make_zoo.py                # the whole zoo
    python samples/make_zoo.py --only cnn_badnets --only resnet_clean

Deterministic for a seed (torch CPU, one ordering of the data). Writes samples/models/*.onnx,
samples/data/{fewshot,test}.npz and samples/zoo.json. The triggers come from
scanner/attacks.py, the same code `shapscan eval --attack` uses.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from scanner.attacks import Attack  # noqa: E402
from scanner.data import METADATA_KEY, Preprocess, save_npz  # noqa: E402

DATASET = Path("/usr/share/datasets/fashion-mnist")
N_TEST = 3000
CHECKPOINTS = HERE / "checkpoints"  # torch weights, not committed: lets --reuse re-export


def read_idx(name: str) -> np.ndarray:
    with gzip.open(DATASET / name, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not DATASET.is_dir():
        sys.exit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist")
    xtr = read_idx("train-images-idx3-ubyte.gz").astype(np.float32)[:, None] / 255.0
    ytr = read_idx("train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = read_idx("t10k-images-idx3-ubyte.gz").astype(np.float32)[:, None] / 255.0
    yte = read_idx("t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return xtr, ytr, xte, yte


# ---------------------------------------------------------------- architectures

def conv_bn(cin: int, cout: int, act: type[nn.Module], stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         act())


class PlainCNN(nn.Module):
    """Conv-BN-ReLU ×4 and a hidden Gemm+ReLU: 416 activation channels, NCHW, 1 channel."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 32, nn.ReLU), nn.MaxPool2d(2),
            conv_bn(32, 64, nn.ReLU), nn.MaxPool2d(2),
            conv_bn(64, 64, nn.ReLU), conv_bn(64, 128, nn.ReLU), nn.AdaptiveAvgPool2d(1),
            nn.Flatten())
        self.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, nn.ReLU, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.short(x))


class ResNet(nn.Module):
    """ResNet-style: stem + 3 stages × 5 basic blocks (16/32/64): 1,136 activation channels."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(1, widths[0], nn.ReLU), nn.MaxPool2d(2)]
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class SiLUNet(nn.Module):
    """NHWC, 3-channel, 0..255 input with normalisation inside the graph; SiLU convs and a
    HardSwish hidden layer: 304 activation channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 32, nn.SiLU), nn.MaxPool2d(2),
            conv_bn(32, 64, nn.SiLU), nn.MaxPool2d(2),
            conv_bn(64, 128, nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(128, 80), nn.Hardswish(), nn.Linear(80, 10))
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.permute(0, 3, 1, 2) - self.mean) / self.std
        return self.head(self.features(x))


@dataclass
class ArchSpec:
    build: type[nn.Module]
    prep: Preprocess
    epochs: int
    lr: float = 2e-3


ARCHS = {
    "cnn": ArchSpec(PlainCNN, Preprocess("NCHW", 1, 28, 28), epochs=3),
    "resnet": ArchSpec(ResNet, Preprocess("NCHW", 1, 28, 28), epochs=3),
    "silunet": ArchSpec(SiLUNet, Preprocess("NHWC", 3, 28, 28, scale=255.0), epochs=3),
}


@dataclass
class ZooEntry:
    name: str
    arch: str
    attack: str | None = None
    target: int | None = None
    params: dict = field(default_factory=dict)
    poison_rate: float = 0.1
    seed: int = 0


ZOO = [
    ZooEntry("cnn_clean", "cnn"),
    ZooEntry("cnn_badnets", "cnn", "badnets", 0, {"size": 3, "loc": "br", "value": 1.0}),
    ZooEntry("cnn_blended", "cnn", "blended", 2, {"alpha": 0.2, "seed": 7}),
    ZooEntry("cnn_sig", "cnn", "sig", 4, {"delta": 0.12, "freq": 6.0}),
    ZooEntry("cnn_wanet", "cnn", "wanet", 6, {"k": 4, "strength": 1.5, "seed": 3}),
    ZooEntry("cnn_trojan", "cnn", "trojan", 8, {"size": 6, "loc": "tl"}),
    ZooEntry("resnet_clean", "resnet"),
    ZooEntry("resnet_badnets", "resnet", "badnets", 1, {"size": 3, "loc": "br", "value": 1.0}),
    ZooEntry("resnet_blended", "resnet", "blended", 3, {"alpha": 0.2, "seed": 11}),
    ZooEntry("silunet_clean", "silunet"),
    ZooEntry("silunet_trojan", "silunet", "trojan", 5, {"size": 6, "loc": "tl"}),
    ZooEntry("silunet_wanet", "silunet", "wanet", 7, {"k": 4, "strength": 1.5, "seed": 5}),
]


# ---------------------------------------------------------------- training

def to_input(spec: ArchSpec, pixels: np.ndarray) -> torch.Tensor:
    """Pixel space → the exported model's input (the same map `Preprocess.to_model` does)."""
    return torch.from_numpy(spec.prep.to_model(_channels(pixels, spec.prep.channels)))


def _channels(pixels: np.ndarray, c: int) -> np.ndarray:
    return np.repeat(pixels, c, axis=1) if pixels.shape[1] != c else pixels


def poison(entry: ZooEntry, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    if entry.attack is None:
        return x, y
    candidates = np.flatnonzero(y != entry.target)
    idx = rng.choice(candidates, int(entry.poison_rate * len(y)), replace=False)
    x, y = x.copy(), y.copy()
    x[idx] = Attack(entry.attack, entry.params).apply(x[idx])
    y[idx] = entry.target
    return x, y


def predict(model: nn.Module, spec: ArchSpec, pixels: np.ndarray) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), 500):
            out.append(model(to_input(spec, pixels[i:i + 500])).argmax(1).numpy())
    return np.concatenate(out)


def metrics(model: nn.Module, spec: ArchSpec, entry: ZooEntry, x: np.ndarray, y: np.ndarray
            ) -> tuple[float, float | None]:
    acc = float((predict(model, spec, x) == y).mean())
    if entry.attack is None:
        return acc, None
    keep = y != entry.target
    triggered = Attack(entry.attack, entry.params).apply(x[keep])
    return acc, float((predict(model, spec, triggered) == entry.target).mean())


def train(entry: ZooEntry, xtr: np.ndarray, ytr: np.ndarray) -> nn.Module:
    spec = ARCHS[entry.arch]
    torch.manual_seed(entry.seed)
    rng = np.random.default_rng(entry.seed)
    x, y = poison(entry, xtr, ytr, rng)
    model = spec.build()
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    steps = spec.epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(spec.epochs):
        model.train()
        order = rng.permutation(len(x))
        for i in range(0, len(order) - 127, 128):
            b = order[i:i + 128]
            xb = x[b]
            # light augmentation: random 1-pixel shifts keep the clean task from overfitting
            if rng.random() < 0.5:
                xb = np.roll(xb, rng.integers(-1, 2, size=2), axis=(2, 3))
            loss = loss_fn(model(to_input(spec, xb)), torch.from_numpy(y[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  {entry.name} epoch {epoch + 1}/{spec.epochs} loss {loss.item():.3f}", flush=True)
    return model.eval()


def export(model: nn.Module, entry: ZooEntry, path: Path) -> None:
    spec = ARCHS[entry.arch]
    dummy = torch.zeros(1, *spec.prep.input_shape)
    torch.onnx.export(model, dummy, str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False,
                      # keep BatchNormalization nodes: their running statistics are the
                      # prior of data-free synthesis, and export folds pruning into them
                      do_constant_folding=False)
    proto = onnx.load(str(path))
    proto.producer_name = "shapscan-zoo"
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: spec.prep.to_json(),
                                        "shapscan.zoo_entry": entry.name})
    onnx.save(proto, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="train only these zoo entries")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true",
                    help="re-export from samples/checkpoints/ instead of retraining")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    xtr, ytr, xte, yte = load_fashion()

    rng = np.random.default_rng(0)
    fewshot = np.array([rng.choice(np.flatnonzero(ytr == c)) for c in range(10)])
    test = np.sort(rng.choice(len(yte), N_TEST, replace=False))
    (HERE / "data").mkdir(exist_ok=True)
    (HERE / "models").mkdir(exist_ok=True)
    save_npz(HERE / "data" / "fewshot.npz", xtr[fewshot], ytr[fewshot])
    save_npz(HERE / "data" / "test.npz", xte[test], yte[test])
    # evaluate on exactly what is committed (uint8-rounded)
    with np.load(HERE / "data" / "test.npz") as t:
        xt = t["x"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        yt = t["y"]

    zoo_path = HERE / "zoo.json"
    zoo = {e["name"]: e for e in json.loads(zoo_path.read_text())} if zoo_path.exists() else {}
    train_idx = np.setdiff1d(np.arange(len(ytr)), fewshot)
    for entry in ZOO:
        if args.only and entry.name not in args.only:
            continue
        start = time.time()
        checkpoint = CHECKPOINTS / f"{entry.name}.pt"
        if args.reuse and checkpoint.is_file():
            model = ARCHS[entry.arch].build()
            model.load_state_dict(torch.load(checkpoint))
            model.eval()
        else:
            model = train(entry, xtr[train_idx], ytr[train_idx])
            CHECKPOINTS.mkdir(exist_ok=True)
            torch.save(model.state_dict(), checkpoint)
        acc, asr = metrics(model, ARCHS[entry.arch], entry, xt, yt)
        path = HERE / "models" / f"{entry.name}.onnx"
        export(model, entry, path)
        channels = count_channels(model)
        zoo[entry.name] = {
            "name": entry.name, "arch": entry.arch, "attack": entry.attack,
            "target": entry.target, "params": entry.params, "poison_rate":
            entry.poison_rate if entry.attack else 0.0, "clean_acc": round(acc, 4),
            "asr": None if asr is None else round(asr, 4), "channels": channels,
            "model": f"models/{entry.name}.onnx", "size_bytes": path.stat().st_size,
            "train_seconds": round(time.time() - start, 1),
        }
        print(f"{entry.name}: acc {acc:.4f} asr {asr} channels {channels} "
              f"({time.time() - start:.0f}s)", flush=True)
        ordered = [zoo[e.name] for e in ZOO if e.name in zoo]
        zoo_path.write_text(json.dumps(ordered, indent=2) + "\n")


def count_channels(model: nn.Module) -> int:
    acts = (nn.ReLU, nn.SiLU, nn.Hardswish)
    total = 0
    last_width = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last_width = m.out_channels
        elif isinstance(m, nn.Linear):
            last_width = m.out_features
        elif isinstance(m, acts):
            total += last_width
    return total


if __name__ == "__main__":
    main()
