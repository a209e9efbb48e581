"""Graph-engine throughput on the sample zoo, measured in one run.

    python benchmarks/engine.py                      # every model in samples/zoo.json
    python benchmarks/engine.py --models samples/models/cnn_clean.onnx --threads 2

Columns: plain ORT images/s; the masked engine (all-ones masks, every activation layer
masked, CoalitionEvaluator without prefix cache) images/s and its ratio to plain; and, for
the first layer in the last third of the network, full masked vs prefix-cached suffix
evaluation (coalition-image rows/s) and their ratio. Goals: masked >= 0.8x plain,
prefix >= 2x full.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scanner.data import load_images, resolve_preprocess  # noqa: E402
from scanner.graph.activations import discover_activations  # noqa: E402
from scanner.graph.load import load_model  # noqa: E402
from scanner.graph.prefix import CoalitionEvaluator  # noqa: E402
from scanner.runtime import make_session  # noqa: E402


@dataclass(frozen=True)
class Row:
    model: str
    channels: int
    plain: float
    masked: float
    layer: str
    full: float
    prefix: float


def rate(fn: Callable[[], object], items: int, min_seconds: float) -> float:
    """Items per second of `fn`: one warm-up call, then repeat for at least min_seconds."""
    fn()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and runs >= 3:
            return runs * items / elapsed


def measure(path: Path, batch: int, images: int, threads: int | None, seconds: float) -> Row:
    loaded = load_model(path)
    name, shape = loaded.image_input()
    prep = resolve_preprocess(loaded.path, loaded.metadata, shape)
    pixels = load_images(ROOT / "samples" / "data" / "test.npz", prep).pixels
    x = prep.to_model(pixels[:batch])
    layers = discover_activations(loaded.proto)
    channels = sum(la.channels for la in layers)

    session = make_session(loaded.proto, threads=threads)
    plain = rate(lambda: session.run(None, {name: x}), batch, seconds)

    # the masked engine on the same rows: one all-ones coalition over the `batch` images
    engine = CoalitionEvaluator(loaded.proto, layers, x, max_batch_rows=batch,
                                prefix_cache=False, threads=threads)
    ones = np.ones((1, engine.n_channels), np.float32)
    masked = rate(lambda: engine.logits(ones), batch, seconds)

    late = layers[(2 * len(layers)) // 3]
    k = images
    coalitions = (np.random.default_rng(0).random((batch // k, late.channels)) > 0.5)
    rows = len(coalitions) * k
    full_ev = CoalitionEvaluator(loaded.proto, [late], x[:k], max_batch_rows=batch,
                                 prefix_cache=False, threads=threads)
    prefix_ev = CoalitionEvaluator(loaded.proto, [late], x[:k], max_batch_rows=batch,
                                   threads=threads)
    full = rate(lambda: full_ev.logits(coalitions), rows, seconds)
    prefix = rate(lambda: prefix_ev.logits(coalitions), rows, seconds)
    return Row(path.stem, channels, plain, masked, f"{late.op} {late.channels}ch "
               f"({layers.index(late) + 1}/{len(layers)})", full, prefix)


def zoo_models() -> list[Path]:
    zoo = ROOT / "samples" / "zoo.json"
    if not zoo.is_file():
        return []
    entries = json.loads(zoo.read_text())
    return [ROOT / "samples" / e["model"] for e in entries
            if (ROOT / "samples" / e["model"]).is_file()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", type=Path, help="ONNX files (default: the zoo)")
    ap.add_argument("--batch", type=int, default=256, help="rows per session run")
    ap.add_argument("--images", type=int, default=10, help="K images for the prefix test")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum time per cell")
    args = ap.parse_args()
    models = args.models or zoo_models()
    if not models:
        sys.exit("no models: build the zoo (python samples/make_zoo.py) or pass --models")
    header = (f"{'model':<16} {'channels':>8} {'plain img/s':>11} {'masked img/s':>12} "
              f"{'ratio':>6}  {'late layer':<24} {'full rows/s':>11} {'prefix rows/s':>13} "
              f"{'ratio':>6}")
    print(header)
    print("-" * len(header))
    for path in models:
        r = measure(path, args.batch, args.images, args.threads, args.seconds)
        print(f"{r.model:<16} {r.channels:>8} {r.plain:>11.0f} {r.masked:>12.0f} "
              f"{r.masked / r.plain:>5.2f}x  {r.layer:<24} {r.full:>11.0f} {r.prefix:>13.0f} "
              f"{r.prefix / r.full:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
