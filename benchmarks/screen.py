"""The many-class screen (reverse.screen) on the development corpus: where does it rank
each backdoor's true target among the model's classes?

    python benchmarks/screen.py --split calibration
    python benchmarks/screen.py --split validation --configs 40x2,10x4

For every backdoored corpus model of the split (10 or 20 classes), one screen per
`STEPSxIMAGES` configuration on the model's few-shot images (seed 0): the target's place
in the screen's order (0 = first; ties in the score go by class index), the screen's
seconds and forward passes. The summary
counts the models whose default few-shot scan (benchmarks/corpus.py's saved results,
`results/fewshot/seed0`) flagged the right target: those are what a shortlist must not
lose. Rows are written to --out as JSON lines as they come.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benchmarks" / "corpus"
sys.path.insert(0, str(ROOT))


def screen_model(entry: dict, configs: list[str]) -> dict:
    from scanner.api import batchable, load_images, load_model, model_preprocess
    from scanner.autodiff import GradientProgram
    from scanner.reverse import ReverseConfig, screen, sweep

    model = load_model(CORPUS / entry["model"])
    prep = model_preprocess(model)
    batchable(model, prep)
    images = load_images(ROOT / entry["fewshot"], prep)
    program = GradientProgram(model.runnable)
    row = {"name": entry["name"], "classes": entry["classes"], "attack": entry["attack"],
           "target": entry["target"]}
    for name in configs:
        start = time.perf_counter()
        run = sweep if name.startswith("s") else screen
        found = run(program, prep, images, entry["classes"], ReverseConfig(),
                    screen_config(name), seed=0)
        row[name] = {"rank": found.order.index(entry["target"]),
                     "seconds": round(time.perf_counter() - start, 1),
                     "passes": found.forward_passes}
    return row


def screen_config(name: str):
    """`STEPSxIMAGES` (reverse.screen: images per class), or `sSTEPSxIMAGESxRESTARTS`
    (reverse.sweep: images in all)."""
    from scanner.reverse import ScreenConfig

    if name.startswith("s"):
        steps, images, restarts = (int(v) for v in name[1:].split("x"))
        return ScreenConfig(steps=steps, sweep_images=images, restarts=restarts)
    steps, images = (int(v) for v in name.split("x"))
    return ScreenConfig(steps=steps, images=images)


def detected(name: str, target: int) -> bool:
    path = CORPUS / "results" / "fewshot" / "seed0" / f"{name}.json"
    return path.is_file() and target in (json.loads(path.read_text()).get("flagged") or [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="calibration", choices=["calibration", "validation"])
    ap.add_argument("--configs", default="10x2,20x2,40x2,10x4,20x4")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    configs = args.configs.split(",")
    entries = [e for e in json.loads((CORPUS / "manifest.json").read_text())["models"]
               if e["split"] == args.split and e["target"] is not None
               and (CORPUS / e["model"]).is_file()]
    rows = []
    for e in entries:
        try:
            row = screen_model(e, configs)
        except Exception as exc:  # a model the scan refuses is left out, and said
            print(f"{e['name']}: left out ({str(exc).splitlines()[0]})", flush=True)
            continue
        row["detected"] = detected(e["name"], e["target"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    hits = [r for r in rows if r["detected"]]
    print(f"\n{args.split}: {len(rows)} backdoored models, {len(hits)} detected with the right "
          "target by the default few-shot scan (seed 0)\n")
    print("| screen | target first | top 3 | worst rank (of classes) | all models: top 3 | "
          "seconds, all models |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in configs:
        ranks = [r[key]["rank"] for r in hits]
        worst = max(hits, key=lambda r: r[key]["rank"] / r["classes"], default=None)
        print(f"| {key} | {sum(k == 0 for k in ranks)} / {len(hits)} | "
              f"{sum(k < 3 for k in ranks)} / {len(hits)} | "
              + (f"{worst[key]['rank'] + 1} of {worst['classes']} ({worst['name']})"
                 if worst else "-")
              + f" | {sum(r[key]['rank'] < 3 for r in rows)} / {len(rows)} | "
              f"{np.sum([r[key]['seconds'] for r in rows]):.0f} |")


if __name__ == "__main__":
    main()
