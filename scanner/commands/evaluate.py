"""`shapscan eval`: clean accuracy and attack success rate of any model (red-team check)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..api import evaluate
from ..attacks import ATTACKS, Attack, AttackError, parse_params
from ..cli import cli, echo_json
from ..errors import DataError, UsageError
from .common import (
    device_option,
    preprocess_options,
    preprocess_overrides,
    require_path,
    resize_option,
)


def find_zoo_entry(name: str, model: Path, zoo: Path | None) -> tuple[Attack | None, int | None]:
    """The trigger and target of zoo entry `name` (None, None for a clean model). A zoo file
    that is not a list of entries, or an entry that is malformed, is bad data."""
    candidates = [zoo] if zoo else [model.resolve().parent.parent / "zoo.json",
                                    Path("samples/zoo.json")]
    for path in candidates:
        if path and path.is_file():
            try:
                entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise DataError(f"{path}: expected a JSON list of zoo entries (objects)")
            for entry in entries:
                if entry.get("name") == name:
                    return _zoo_trigger(entry, f"{path}: zoo entry {name!r}")
            raise UsageError(f"zoo entry {name!r} not in {path}")
    if zoo:
        raise UsageError(f"--zoo {zoo}: no such file")
    raise UsageError("no zoo.json found; pass --zoo PATH")


def _zoo_trigger(entry: dict, where: str) -> tuple[Attack | None, int | None]:
    if not entry.get("attack"):
        return None, None
    target, params = entry.get("target"), entry.get("params", {})
    if not isinstance(target, int) or isinstance(target, bool) or target < 0:
        raise DataError(f"{where}: target must be a class index, got {json.dumps(target)}")
    if not isinstance(params, dict):
        raise DataError(f"{where}: params must be a JSON object, got {json.dumps(params)}")
    try:
        return Attack(entry["attack"], params), target
    except AttackError as exc:
        raise DataError(f"{where}: {exc}") from None


@cli.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="Test images: a .npz (x, y) or a folder of images.")
@click.option("--attack", type=click.Choice(sorted(ATTACKS)), default=None,
              help="Trigger to stamp on the test images.")
@click.option("--target", type=click.IntRange(min=0), default=None, help="Attack target class.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Trigger parameter, repeatable (e.g. --param size=3).")
@click.option("--zoo-entry", default=None, help="Take attack, target and params from zoo.json.")
@click.option("--zoo", type=click.Path(path_type=Path), default=None,
              help="zoo.json to read --zoo-entry from (default: next to the model).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@resize_option
@preprocess_options
@device_option
def eval_cmd(model: Path, data: Path, attack: str | None, target: int | None,
             params: tuple[str, ...], zoo_entry: str | None, zoo: Path | None, as_json: bool,
             resize: bool, device: str, **prep: object) -> int:
    """Clean accuracy and attack success rate (ASR) of MODEL on --data.

    ASR is the share of images whose true label is not the target that the triggered
    input sends to the target. Exit 4 for a missing MODEL or --data, 2 for bad data.
    """
    require_path(model)
    require_path(data, "data")
    if zoo_entry and attack:
        raise UsageError("give either --zoo-entry or --attack, not both")
    if not (zoo_entry or attack) and (target is not None or params):
        raise UsageError("--target and --param describe an attack: give --attack too")
    trigger = None
    if zoo_entry:
        trigger, target = find_zoo_entry(zoo_entry, model, zoo)
    elif attack:
        if target is None:
            raise UsageError("--attack needs --target")
        try:
            trigger = Attack(attack, parse_params(params))
        except AttackError as exc:
            raise UsageError(str(exc)) from None
    try:
        result = evaluate(model, data, trigger, target, preprocess_overrides(**prep), device,
                          resize=resize)
    except AttackError as exc:  # checked against the images only: a patch larger than them
        raise UsageError(f"bad attack parameter: {exc}") from None
    if as_json:
        echo_json({"model": str(model), "clean_acc": result.clean_acc, "asr": result.asr,
                   "images": result.n_images, "attack_images": result.n_attack_images,
                   "attack": trigger.name if trigger else None, "target": target,
                   "resized": result.resized})
        return 0
    asr = "-" if result.asr is None else f"{100 * result.asr:.2f}%"
    rows = [("model", str(model)), ("images", str(result.n_images)),
            ("clean accuracy", f"{100 * result.clean_acc:.2f}%"),
            ("attack", f"{trigger.name} -> {target}" if trigger else "-"), ("ASR", asr)]
    if result.resized:  # --resize: the numbers are for resized images, say so
        rows.insert(2, ("resized", resized_text(result.resized, result.n_images)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    return 0


def resized_text(resized: dict[str, int], total: int) -> str:
    """"10 of 10 images, from 64x64" for the --resize line."""
    count = sum(resized.values())
    return f"{count} of {total} images, from {', '.join(sorted(resized))} (--resize)"
