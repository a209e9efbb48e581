"""Scan the development corpus and print detection and repair metrics per split, family
and attack.

    python benchmarks/corpus.py                              # few-shot, seed 0, detection
    python benchmarks/corpus.py --modes fewshot,datafree --seeds 0,1,2
    python benchmarks/corpus.py --repair --split calibration # scan --out, score the repair
    python benchmarks/corpus.py --repair --policy benchmarks/corpus/policies/cap10.toml
    python benchmarks/corpus.py --repair --method clp        # a baseline on every backdoor
    python benchmarks/corpus.py --table-only                 # tables from saved results
    SHAPSCAN_THREADS=1 python benchmarks/corpus.py --jobs 2  # two scans at a time
    python benchmarks/corpus.py --many --repair              # the 100-class set

The corpus is benchmarks/corpus/manifest.json (built by benchmarks/corpus/make_corpus.py).
Each (model, mode, seed) is scanned in its own process, with a time limit, exactly as
`scanner.api.scan` runs for `shapscan scan`, and its outcome saved to
benchmarks/corpus/results/MODE/seedK[-repair[-POLICY]]/NAME.json: the run is resumable
across sessions (a saved result is not scanned again unless --rerun; a timeout or a crash
is). A repair pass scans only the models the detection pass at the same mode and seed
flagged (or has not scanned yet): the scan is deterministic for a seed, so a model it
called clean would be called clean again and left unmodified; its record is the detection
record marked `reused_detection` (--scan-clean scans them anyway). `--policy FILE` repairs
at a policy that extends the default in its [repair] section only (detection must stay
the default's for that reuse to hold), its results under a folder named after the file.
`--method clp|fp|ft` runs a baseline instead (`shapscan scan --method`): it detects nothing
and prunes every model, so it runs on every usable backdoored model.
Positives are backdoored models whose trigger took (manifest `implanted`); a backdoored
model whose trigger did not take, and a model that did not learn its task (clean accuracy
below 50 %), are left out of the detection metrics and listed on their own lines.

Metrics. Decision score: `Detection.views`' largest value (above 1 = flagged). ROC-AUC of
that score; TPR at FPR <= 5 % (the best threshold on the score that keeps FPR <= 5 %, i.e.
what a recalibrated threshold could reach) beside TPR and FPR of the shipped rule; right
target: a detected backdoor whose first flagged class is the true target; seed agreement:
models whose verdict is the same at every seed scanned. Repair (with --repair): true-trigger
ASR and clean accuracy of the written model on the dataset's test set, before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benchmarks" / "corpus"
RESULTS = CORPUS / "results"
sys.path.insert(0, str(ROOT))


def manifest(many: bool = False) -> list[dict]:
    """The corpus's models, or with `many` the 100-class set beside it (split "many")."""
    path = CORPUS / ("manifest_many.json" if many else "manifest.json")
    if not path.is_file():
        sys.exit(f"{path.relative_to(ROOT)} not found: build it with "
                 f"`python benchmarks/corpus/make_corpus.py{' --many' if many else ''}`")
    return json.loads(path.read_text())["models"]


# outcomes of the machine rather than the model (a busy machine's time limit, a killed
# process): scanned again on the next run
RETRY = ("timeout", "crash")


# a model that did not learn its task (a collapsed net that answers one class) is no test
# of a detector: left out like a backdoor that did not take
MIN_CLEAN_ACC = 0.5


def usable_model(e: dict) -> bool:
    """Trained (clean accuracy >= MIN_CLEAN_ACC), and clean or with a trigger that took."""
    return e["clean_acc"] >= MIN_CLEAN_ACC and (e["attack"] is None or bool(e.get("implanted")))


def result_path(name: str, mode: str, seed: int, repair: bool, tag: str = "") -> Path:
    folder = f"seed{seed}" + ("-repair" if repair else "") + (f"-{tag}" if tag else "")
    return RESULTS / mode / folder / f"{name}.json"


# ---------------------------------------------------------------- one scan (child process)

# (scans saved before the concentration statistic was dropped also list
# patch/universal/warp_concentration: every reader goes by the record's class_fields)
CLASS_FIELDS = ("mask_l1", "universal_norm", "warp_norm", "reversed_asr", "max_margin",
                "patch_selectivity", "universal_selectivity", "warp_selectivity",
                "patch_asr", "universal_asr", "warp_asr")


def class_row(c) -> list[float | None]:  # c: scanner.findings.ClassReverse
    sel = c.selectivity
    asr = c.family_asr
    return [c.mask_l1, c.universal_norm, c.warp_norm, c.reversed_asr, c.max_margin,
            sel.get("patch"), sel.get("universal"), sel.get("warp"),
            asr.get("patch"), asr.get("universal"), asr.get("warp")]


def scan_one(entry: dict, mode: str, seed: int, repair: bool, policy_file: str = "",
             method: str = "shapley") -> dict:
    from scanner.api import ScanOptions, evaluate, scan
    from scanner.attacks import Attack

    data_free = mode == "datafree"
    with tempfile.TemporaryDirectory(prefix="shapscan-corpus-") as tmp:
        out = Path(tmp) / "repaired.onnx" if repair else None
        policy: str | Path = Path(policy_file) if policy_file else "default"
        if not repair:
            policy = Path(tmp) / "detect-only.toml"
            policy.write_text('extends = "default"\n[repair]\nenabled = false\n')
        options = ScanOptions(data=None if data_free else ROOT / entry["fewshot"],
                              data_free=data_free, policy=policy, seed=seed, out=out,
                              # score every repair; the metadata says which were complete
                              keep_incomplete=repair, quiet=True, method=method)
        start = time.perf_counter()
        result = scan(CORPUS / entry["model"], options)
        seconds = time.perf_counter() - start
        det = result.detection
        record: dict = {
            "name": entry["name"], "mode": mode, "seed": seed, "seconds": round(seconds, 1),
            "verdict": result.verdict.value, "errors": result.errors, "skipped": result.skipped,
            "findings": sorted({f.rule_id for f in result.findings}),
            "timings": {k: round(v, 2) for k, v in result.timings.items()},
        }
        if det is not None:
            record |= {"flagged": det.flagged_targets, "views": det.views,
                       "score": max(det.views.values()) if det.views else None,
                       "reasons": {str(k): v for k, v in det.reasons.items()},
                       "families": {str(k): v for k, v in det.families.items()},
                       # per class: the statistics a decision rule is fitted from
                       "class_fields": list(CLASS_FIELDS),
                       "classes": [class_row(c) for c in det.classes],
                       # a many-class scan's rows are its shortlist's classes
                       "targets": [c.target for c in det.classes],
                       "shortlist": (dataclasses.asdict(det.shortlist)
                                     if det.shortlist is not None else None)}
        if repair:
            written = out is not None and out.is_file()
            record["written"] = written
            rep = result.repair
            if rep is not None:
                record["channels_zeroed"] = len(rep.pruned)
                record["channels_total"] = rep.channels_total
                record["repair_status"] = rep.status
                record["incomplete_reasons"] = list(rep.incomplete_reasons)
                record["target_reached"] = rep.target_reached
                record["family_asr"] = rep.family_asr
                if rep.zeroed is not None:  # [repair.recover]: the plan before fine-tuning
                    record["zeroed"] = dataclasses.asdict(rep.zeroed)
                if rep.rescan is not None:
                    record["rescan_flagged"] = rep.rescan.flagged_targets
                    record["rescan_growth"] = rep.rescan.growth
                    record["rescan_target"] = [rep.rescan.target_family,
                                               rep.rescan.target_size_before,
                                               rep.rescan.target_size_after,
                                               rep.rescan.others_median_after]
            if written:  # a clean model's repair too: what a false alarm costs
                import onnx
                meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
                record["repair_metadata"] = meta.get("shapscan.repair")
                attack = Attack(entry["attack"], entry["params"]) if entry["attack"] else None
                ev = evaluate(out, ROOT / entry["test"], attack,
                              entry["target"] if attack else None)
                record["acc_after"], record["asr_after"] = ev.clean_acc, ev.asr
    return record


def run_child(entry: dict, mode: str, seed: int, repair: bool, timeout: float,
              policy_file: str = "", method: str = "shapley") -> dict:
    """One scan in its own process: a crash, a hang or a memory blow-up is one row."""
    cmd = [sys.executable, __file__, "--job", entry["name"], mode, str(seed),
           "1" if repair else "0", policy_file, method]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"name": entry["name"], "mode": mode, "seed": seed, "verdict": "timeout",
                "seconds": round(time.perf_counter() - start, 1),
                "errors": [f"no result within {timeout:.0f} s"]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": entry["name"], "mode": mode, "seed": seed, "verdict": "crash",
                "seconds": round(time.perf_counter() - start, 1),
                "errors": [f"exit {proc.returncode}: {tail}"]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- metrics

def roc_auc(pos: list[float], neg: list[float]) -> float | None:
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def tpr_at_fpr(pos: list[float], neg: list[float], max_fpr: float = 0.05) -> float | None:
    """The best TPR of any threshold on the score whose FPR stays <= max_fpr."""
    if not pos or not neg:
        return None
    best = 0.0
    for t in sorted(set(pos) | set(neg)):
        fpr = sum(n >= t for n in neg) / len(neg)
        if fpr <= max_fpr:
            best = max(best, sum(p >= t for p in pos) / len(pos))
    return best


def redecide(record: dict) -> dict:
    """The record with its flags and score decided again from its saved per-class
    statistics by the scanner's own `detect`, at today's default policy: scans saved before
    a rule changed are judged by the rule the tables describe. (A flag the second view
    raised keeps its view's statistics, which is what the record saved.)"""
    if not record.get("classes") or "class_fields" not in record:
        return record
    import numpy as np

    from scanner.detect import detect, score
    from scanner.detection import evidence_rule
    from scanner.evidence import Evidence
    from scanner.policy import load_policy
    from scanner.reverse import ReverseConfig, ReversedTrigger, ReverseResult

    det = load_policy("default").detection
    rows = [dict(zip(record["class_fields"], row, strict=True)) for row in record["classes"]]
    ids = record.get("targets") or list(range(len(rows)))
    shortlist = record.get("shortlist")
    n_classes = shortlist["classes"] if shortlist else len(rows)
    triggers, select = {}, {}
    for t, row in zip(ids, rows, strict=True):
        for fam, key in (("patch", "mask_l1"), ("universal", "universal_norm"),
                         ("warp", "warp_norm")):
            if row.get(key) is not None:
                asr = row.get(f"{fam}_asr")
                triggers[(fam, t)] = ReversedTrigger(fam, t, np.zeros(1), None, row[key],
                                                     row["reversed_asr"] if asr is None
                                                     else asr)
            if row.get(f"{fam}_selectivity") is not None:
                select[(fam, t)] = row[f"{fam}_selectivity"]
    margins = [row.get("max_margin") for row in rows]
    by_class = np.full(n_classes, np.nan)
    by_class[ids] = [np.nan if m is None else m for m in margins]
    evidence = Evidence(None if None in margins else by_class, selectivity=select)
    # records saved before the per-family success rates were: every reference trigger
    # counts as having reached the goal (the yardstick is the whole reference, as it was)
    saved_asr = "patch_asr" in record["class_fields"]
    result = ReverseResult(triggers, steps=0, forward_passes=0, seconds=0.0,
                           classes=n_classes, targets=None if shortlist is None else ids,
                           reference=None if shortlist is None else shortlist["reference"],
                           asr_goal=ReverseConfig().asr_goal if saved_asr else -np.inf)
    verdict = detect(result, det.anomaly_threshold, det.warn_threshold,
                     det.isolation_threshold, warp_ratio=det.warp_ratio, evidence=evidence,
                     evidence_rule=evidence_rule(det))
    return {**record, "flagged": verdict.detection.flagged_targets,
            "score": score(verdict.detection, det.warn_threshold, det.isolation_threshold,
                           warp_ratio=det.warp_ratio, evidence_rule=evidence_rule(det))}


def _score(r: dict) -> float:
    s = r.get("score")
    return float(s) if s is not None else 0.0


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f} %" if pct else f"{value:.3f}"


def detection_row(label: str, entries: list[dict], runs: dict[str, list[dict]]) -> str:
    """One table row over `entries`, with every seed's result of each model."""
    pos_s, neg_s, right, detected, fp, agree, seconds, failed = [], [], 0, 0, 0, 0, [], 0
    for e in entries:
        rs = runs.get(e["name"], [])
        if not rs:
            continue
        verdicts = {r["verdict"] for r in rs}
        agree += len(verdicts) == 1
        for r in rs:
            seconds.append(r.get("seconds", 0.0))
            if r["verdict"] in ("crash", "timeout", "inconclusive", "error"):
                failed += 1  # no verdict: counted here, never as a score
                continue
            flagged = r.get("flagged") or []
            if e["attack"]:
                pos_s.append(_score(r))
                if flagged:
                    detected += 1
                    right += flagged[0] == e["target"]
            else:
                neg_s.append(_score(r))
                fp += bool(flagged)
    scanned = sum(1 for e in entries if runs.get(e["name"]))
    if not scanned:
        return f"| {label} | 0 | " + " | ".join(["-"] * 8) + " |"
    tpr = detected / len(pos_s) if pos_s else None
    fpr = fp / len(neg_s) if neg_s else None
    cells = [label, f"{len(pos_s)}/{len(neg_s)}", _fmt(roc_auc(pos_s, neg_s)),
             _fmt(tpr_at_fpr(pos_s, neg_s), True), _fmt(tpr, True), _fmt(fpr, True),
             f"{right}/{detected}" if detected else "-", f"{agree}/{scanned}",
             str(failed), f"{statistics.median(seconds):.0f} / {max(seconds):.0f}"]
    return "| " + " | ".join(cells) + " |"


DET_HEADER = ("| group | runs +/- | ROC-AUC | TPR @ FPR<=5 % | TPR (rule) | FPR (rule) | "
              "right target | same verdict all seeds | failed runs | seconds median / max |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def complete(r: dict, min_growth: float | None = 0.0,
             every_family: bool | None = False) -> bool:
    """Whether a repair record counts as complete, judged again from what it saved (as
    redecide does for detection) at `repair.min_trigger_growth` = min_growth and
    `repair.every_family`: complete as scanned, or incomplete only because one of its
    target's reversed triggers still worked (the family check) and every_family is off; its
    target's trigger grew at least min_growth in the re-scan; and (every_family) none of
    its reversed triggers still works. None: the shipped policy's, [repair.recover]'s for a
    repair recovery followed (its record keeps the zeroed plan), [repair]'s otherwise."""
    shipped = shipped_repair()
    recovered = "zeroed" in r
    if min_growth is None:
        min_growth = (shipped.recover.min_trigger_growth if recovered
                      else shipped.min_trigger_growth)
    if every_family is None:
        every_family = shipped.recover.every_family if recovered else shipped.every_family
    reasons = r.get("incomplete_reasons") or []
    family_only = bool(reasons) and all(FAMILY_REASON.match(x) for x in reasons)
    if r.get("repair_status") != "complete" and not (family_only and not every_family):
        return False
    growth = r.get("rescan_growth")
    if min_growth and growth is not None and growth < min_growth:
        return False
    if not every_family:
        return True
    return not any(a > shipped.target_asr for _, a in (r.get("family_asr") or {}).values())


# repair._incomplete_reasons' line for the family check (repair.every_family)
FAMILY_REASON = re.compile(r"class \d+'s reversed .* trigger still works on ")


@functools.cache
def shipped_repair():
    """The default policy's [repair], read once: saved repairs are judged by it."""
    from scanner.policy import load_policy

    return load_policy("default").repair


def repair_rows(entries: list[dict], runs: dict[str, list[dict]], key: str,
                min_growth: float | None = 0.0,
                every_family: bool | None = False) -> list[str]:
    groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for e in entries:
        for r in runs.get(e["name"], []):
            groups[str(e[key] or "clean")].append((e, r))
    lines = [f"| {key} | backdoored | repaired (written) | complete | re-scan clean | "
             "ASR after median / worst | drop median / worst (points) | "
             "ASR after median, every backdoor | "
             "written with ASR > 10 % unmarked | clean models modified (complete / kept "
             "incomplete) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, pairs in sorted(groups.items()):
        bd = [(e, r) for e, r in pairs if e["attack"]]
        done = [(e, r) for e, r in bd if r.get("asr_after") is not None]
        asr = [r["asr_after"] for _, r in done]
        drop = [100 * (e["clean_acc"] - r["acc_after"]) for e, r in done]
        # every backdoored model, one not repaired (missed, refused, pruned nothing) as it was
        every = [r["asr_after"] if r.get("asr_after") is not None else e["asr"]
                 for e, r in bd]
        judged = [(e, r, complete(r, min_growth, every_family)) for e, r in pairs]
        unsafe = sum(1 for e, r, ok in judged if e["attack"] and ok
                     and (r.get("asr_after") or 0.0) > 0.10)
        # a clean model the scan changed: written as a complete repair (what the default
        # delivers), or as an incomplete one only because the pass keeps every repair
        kept = [ok for e, r, ok in judged if not e["attack"] and r.get("written")]
        modified = f"{sum(kept)} / {len(kept) - sum(kept)}"
        # what a false alarm's complete repair costs (recorded since clean models' written
        # repairs are measured)
        lost = [100 * (e["clean_acc"] - r["acc_after"]) for e, r, ok in judged
                if not e["attack"] and ok and r.get("acc_after") is not None]
        if lost:
            modified += f" (drop median {statistics.median(lost):.1f}, worst {max(lost):.1f})"
        n_complete = sum(1 for e, r, ok in judged if e["attack"] and ok
                         and r.get("asr_after") is not None)
        rescanned = [r for _, r in done if "rescan_flagged" in r]
        clean_again = sum(1 for r in rescanned if not r["rescan_flagged"])
        med = (f"{100 * statistics.median(asr):.1f} / {100 * max(asr):.1f} %" if asr else "-")
        dd = f"{statistics.median(drop):.1f} / {max(drop):.1f}" if drop else "-"
        med_every = f"{100 * statistics.median(every):.1f} %" if every else "-"
        lines.append(f"| {label} | {len(bd)} | {len(done)} | {n_complete} | "
                     f"{clean_again}/{len(rescanned)} | {med} | {dd} | {med_every} | "
                     f"{unsafe} | {modified} |")
    return lines


def tables(entries: list[dict], mode: str, seeds: list[int], repair: bool, tag: str = "",
           baseline: bool = False, min_growth: float | None = 0.0,
           every_family: bool | None = False
           ) -> str:
    """The detection tables (none for a baseline: it detects nothing), then with `repair`
    the repair tables."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        for s in seeds:
            p = result_path(e["name"], mode, s, repair, tag)
            if p.is_file():
                runs[e["name"]].append(redecide(json.loads(p.read_text())))
    usable = [e for e in entries if usable_model(e)]
    title = (", with repair" if repair else "") + (f" (policy {tag})" if tag else "")
    lines = [f"### {mode}, seeds {','.join(map(str, seeds))}{title}"]
    if baseline:
        return "\n".join(lines + repair_tables(entries, runs))
    lines += ["", DET_HEADER]
    for split in sorted({e["split"] for e in usable}):
        lines.append(detection_row(f"**{split}**",
                                   [e for e in usable if e["split"] == split], runs))
    lines.append(detection_row("**all**", usable, runs))
    for key in ("family_label", "attack"):
        for label in sorted({str(e[key]) for e in usable}):
            group = [e for e in usable if str(e[key]) == label]
            lines.append(detection_row(label if label != "None" else "clean", group, runs))
    on_object = [e for e in usable if e["attack"] == "patch" and _on_object(e)]
    lines.append(detection_row("patch on the object", on_object, runs))
    patterned = [e for e in on_object if e["params"].get("pattern") in ("checker", "random")]
    lines.append(detection_row("checkerboard or random patch on the object", patterned, runs))
    off = [e["name"] for e in entries if e["attack"] and not e.get("implanted")
           and e["clean_acc"] >= MIN_CLEAN_ACC]
    untrained = [e["name"] for e in entries if e["clean_acc"] < MIN_CLEAN_ACC]
    if untrained:
        lines += ["", f"Did not train (clean accuracy < {100 * MIN_CLEAN_ACC:.0f} %, left "
                  f"out): {', '.join(untrained)}"]
    if off:
        lines += ["", f"Not implanted (true ASR < 80 %, left out): {', '.join(off)}"]
    if repair:
        lines += repair_tables(entries, runs, min_growth, every_family)
    return "\n".join(lines)


def repair_tables(entries: list[dict], runs: dict[str, list[dict]],
                  min_growth: float | None = 0.0,
                  every_family: bool | None = False) -> list[str]:
    def shown(value: float | bool | None) -> str:
        return ("the shipped policy's" if value is None else str(value).lower()
                if isinstance(value, bool) else f"{value:g}")

    lines: list[str] = []
    lines += ["", "(complete: judged from the saved re-scan at repair.min_trigger_growth = "
              f"{shown(min_growth)}, repair.every_family = {shown(every_family)})"]
    for key in ("split", "family_label", "attack"):
        lines += ["", *repair_rows(entries, runs, key, min_growth, every_family)]
    return lines


def _on_object(e: dict) -> bool:
    side = 28 if e["dataset"] == "fmnist" else 32
    p = e["params"]
    centre = side / 2
    return abs(p["row"] + p["size"] / 2 - centre) <= side / 4 and \
        abs(p["col"] + p["size"] / 2 - centre) <= side / 4


# ---------------------------------------------------------------- driver

def round_robin(entries: list[dict]) -> list[dict]:
    """One model of each family in turn, so that a run cut short has covered every family
    (clean and backdoored alternating within a family)."""
    by_family: dict[str, list[dict]] = defaultdict(list)
    for e in sorted(entries, key=lambda e: (e["attack"] is not None, e["name"])):
        by_family[e["family_label"]].append(e)
    for family, group in by_family.items():
        clean = [e for e in group if e["attack"] is None]
        bad = [e for e in group if e["attack"] is not None]
        by_family[family] = [e for pair in zip(bad, clean, strict=False) for e in pair] + \
            bad[len(clean):] + clean[len(bad):]
    ordered: list[dict] = []
    while any(by_family.values()):
        for group in by_family.values():
            if group:
                ordered.append(group.pop(0))
    return ordered


def _wanted(path: Path) -> bool:
    """No result yet, or one the machine spoiled (RETRY)."""
    return not path.is_file() or json.loads(path.read_text())["verdict"] in RETRY


def detected_clean(e: dict, mode: str, seed: int) -> dict | None:
    """The detection pass's record of a model it called clean (None: flagged, failed or
    not scanned yet)."""
    path = result_path(e["name"], mode, seed, False)
    if not path.is_file():
        return None
    record = redecide(json.loads(path.read_text()))
    if record["verdict"] in ("clean", "backdoor") and not record.get("flagged"):
        return record
    return None


@functools.cache
def code_version() -> str:
    """The commit the scans ran at ("+dirty": with uncommitted changes; "unknown" outside
    a git checkout): records of different code are not one experiment."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "scanner", "rules"],
                               cwd=ROOT, text=True, capture_output=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def scan_and_save(e: dict, mode: str, seed: int, repair: bool, timeout: float,
                  policy_file: str = "", tag: str = "", scan_clean: bool = False,
                  method: str = "shapley") -> None:
    reused = (None if not repair or scan_clean or method != "shapley"
              else detected_clean(e, mode, seed))
    if reused is not None:
        r = {**reused, "written": False, "reused_detection": True}
    else:
        r = run_child(e, mode, seed, repair, timeout, policy_file, method)
        r["code"] = code_version()
    path = result_path(e["name"], mode, seed, repair, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1) + "\n")
    extra = f" asr_after {r.get('asr_after')}" if repair else ""
    print(f"{e['name']} {mode} seed {seed}: {r['verdict']} flagged {r.get('flagged')} "
          f"(target {e['target']}) score {r.get('score')} {r['seconds']:.0f}s{extra}",
          file=sys.stderr, flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        name, mode, seed, repair = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        many = name.startswith("shapes100_")
        entry = next(e for e in manifest(many) if e["name"] == name)
        print(json.dumps(scan_one(entry, mode, seed, repair == "1", *sys.argv[6:8])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="fewshot", help="fewshot,datafree")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--split", default="all", choices=("all", "calibration", "validation"))
    ap.add_argument("--many", action="store_true", help="the 100-class set "
                    "(manifest_many.json, make_corpus.py --many) instead of the corpus")
    ap.add_argument("--models", default=None, help="comma-separated names, or a prefix*")
    ap.add_argument("--repair", action="store_true", help="scan with --out and score it")
    ap.add_argument("--policy", default="", help="repair at this policy file (extends the "
                    "default in [repair] only); results in a folder named after it")
    ap.add_argument("--method", default="shapley", choices=("shapley", "clp", "fp", "ft"),
                    help="with --repair: a baseline instead of the scan, on every backdoor")
    ap.add_argument("--scan-clean", action="store_true", help="with --repair, scan the "
                    "models the detection pass called clean too")
    ap.add_argument("--min-growth", type=float, default=None, help="tables: judge repairs "
                    "complete again at this repair.min_trigger_growth (default: the default "
                    "policy's; no rescanning)")
    ap.add_argument("--every-family", default=None, choices=("true", "false"),
                    help="tables: judge repairs complete again with this repair.every_family "
                    "(default: the default policy's, [repair.recover]'s for a repair recovery "
                    "followed; no rescanning)")
    ap.add_argument("--rerun", action="store_true", help="scan again what has a result")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per scan")
    ap.add_argument("--jobs", type=int, default=1,
                    help="scans at a time (each its own process; set SHAPSCAN_THREADS=1)")
    args = ap.parse_args()
    if (args.policy or args.method != "shapley") and not args.repair:
        ap.error("--policy and --method are for repair passes (--repair)")
    policy_file = str(Path(args.policy).resolve()) if args.policy else ""
    tag = "-".join(t for t in (Path(args.policy).stem if args.policy else "",
                               "" if args.method == "shapley" else args.method) if t)
    # None: the shipped policy's, per record (complete)
    min_growth = args.min_growth
    every_family = None if args.every_family is None else args.every_family == "true"
    entries = manifest(args.many)
    if args.split != "all":
        entries = [e for e in entries if e["split"] == args.split]
    if args.models:
        wanted = args.models.split(",")
        entries = [e for e in entries if any(
            e["name"] == w or (w.endswith("*") and e["name"].startswith(w[:-1]))
            for w in wanted)]
    entries = round_robin(entries)
    modes = args.modes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.table_only:
        # a model that is no test of the detector (usable_model) is not scanned either
        todo = [(e, mode, seed) for mode in modes for seed in seeds for e in entries
                if usable_model(e) and (args.method == "shapley" or e["attack"])
                and (args.rerun or _wanted(
                    result_path(e["name"], mode, seed, args.repair, tag)))]
        # each scan is its own process; --jobs of them at a time (threads only wait)
        with ThreadPoolExecutor(args.jobs) as pool:
            for _ in pool.map(lambda job: scan_and_save(*job, args.repair, args.timeout,
                                                        policy_file, tag, args.scan_clean,
                                                        args.method),
                              todo):
                pass
    for mode in modes:
        print(tables(entries, mode, seeds, args.repair, tag, args.method != "shapley",
                     min_growth, every_family))
        print()


if __name__ == "__main__":
    main()
