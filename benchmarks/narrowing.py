"""Shapley on every channel against Shapley on the top of a first-order ranking
(`shapley.max_players`, scanner/repair.narrow_players), the same scans in one run.

    SHAPSCAN_THREADS=1 python benchmarks/narrowing.py                       # zoo ResNets
    SHAPSCAN_THREADS=1 python benchmarks/narrowing.py --models resnet_badnets,cnn_trojan \\
        --players 128,512
    SHAPSCAN_THREADS=1 python benchmarks/narrowing.py --corpus shapes_mobilenetv2_03 \\
        --players 512 --no-full                          # too big for the full estimate

Each model is scanned few-shot with --out (repair on, the default policy otherwise) once
with every channel as a player (max_players = 0, the reference) and once per --players
value. Rows: channels zeroed and how many of them the reference zeroed too, overlap of the
top-20 Shapley channels with the reference's, the written model's clean accuracy and the
true trigger's ASR on the test set, seconds of the Shapley stage and of the whole scan,
and the ratio of Shapley seconds reference / narrowed. Sample zoo models come from
samples/zoo.json, corpus models (--corpus) from benchmarks/corpus/manifest.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = "resnet_badnets,resnet_blended"


def entries(zoo: list[str], corpus: list[str]) -> list[dict]:
    """(name, model path, few-shot, test set, attack, params, target) of each model."""
    out = []
    zoo_all = {e["name"]: e for e in json.loads((ROOT / "samples" / "zoo.json").read_text())}
    for name in zoo:
        e = zoo_all[name]
        out.append({**e, "model": ROOT / "samples" / e["model"],
                    "fewshot": ROOT / "samples" / "data" / "fewshot.npz",
                    "test": ROOT / "samples" / "data" / "test.npz"})
    if corpus:
        manifest = {e["name"]: e for e in json.loads(
            (ROOT / "benchmarks" / "corpus" / "manifest.json").read_text())["models"]}
        for name in corpus:
            e = manifest[name]
            out.append({**e, "model": ROOT / "benchmarks" / "corpus" / e["model"],
                        "fewshot": ROOT / e["fewshot"], "test": ROOT / e["test"]})
    return out


def run(entry: dict, players: int) -> dict:
    from scanner.api import ScanOptions, evaluate, scan
    from scanner.attacks import Attack

    with tempfile.TemporaryDirectory(prefix="shapscan-narrow-") as tmp:
        policy = Path(tmp) / "policy.toml"
        policy.write_text(f'extends = "default"\n[shapley]\nmax_players = {players}\n')
        out = Path(tmp) / "repaired.onnx"
        start = time.perf_counter()
        result = scan(entry["model"], ScanOptions(data=entry["fewshot"], policy=policy,
                                                  out=out, keep_incomplete=True, quiet=True))
        seconds = time.perf_counter() - start
        rep = result.repair
        row: dict = {"players": players, "seconds": seconds,
                     "shapley_s": result.timings.get("shapley", float("nan")),
                     "verdict": result.verdict.value}
        if rep is None:
            return row
        row |= {"channels": rep.channels_total, "used": rep.players or rep.channels_total,
                "zeroed": {(c.layer, c.channel) for c in rep.pruned},
                "top": [(c.layer, c.channel) for c in rep.top_channels],
                "status": rep.status}
        if out.is_file():
            ev = evaluate(out, entry["test"], Attack(entry["attack"], entry["params"]),
                          entry["target"])
            row |= {"acc": ev.clean_acc, "asr": ev.asr}
    return row


def fmt(row: dict, ref: dict | None) -> str:
    def pct(key: str) -> str:
        return f"{100 * row[key]:.1f} %" if key in row else "-"

    zeroed = row.get("zeroed", set())
    same = f"{len(zeroed & ref['zeroed'])}/{len(zeroed)}" if ref and "zeroed" in ref else "-"
    top = (f"{len(set(row['top'][:20]) & set(ref['top'][:20])) / 20:.2f}"
           if ref and "top" in ref and "top" in row else "-")
    ratio = (f"{ref['shapley_s'] / row['shapley_s']:.1f}×"
             if ref and row.get("shapley_s") else "-")
    return (f"| {row.get('used', '-')} of {row.get('channels', '-')} | {len(zeroed)} | {same} "
            f"| {top} | {row.get('status', row['verdict'])} | {pct('acc')} | {pct('asr')} "
            f"| {row['shapley_s']:.0f} | {row['seconds']:.0f} | {ratio} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="sample zoo names")
    ap.add_argument("--corpus", default="", help="development corpus names")
    ap.add_argument("--players", default="128,512", help="max_players values to compare")
    ap.add_argument("--no-full", action="store_true", help="skip the every-channel run")
    args = ap.parse_args()
    zoo = [m for m in args.models.split(",") if m]
    corpus = [m for m in args.corpus.split(",") if m]
    print("| model | players | zeroed | also zeroed by all | top-20 overlap | repair "
          "| clean acc | true ASR | Shapley s | scan s | Shapley speed-up |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for entry in entries(zoo, corpus):
        ref = None if args.no_full else run(entry, 0)
        if ref is not None:
            print(f"| {entry['name']} " + fmt(ref, None), flush=True)
        for players in (int(p) for p in args.players.split(",")):
            print(f"| {entry['name']} " + fmt(run(entry, players), ref), flush=True)


if __name__ == "__main__":
    main()
