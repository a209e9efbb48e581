"""`scan --executor ray`: a folder scanned as Ray tasks on a local 2-CPU cluster gives the
local run's verdicts, channels, reports and exit code; a task whose worker dies is re-run
and says so. Skipped when Ray is not installed (`pip install -e '.[dev,ray]'`)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, zoo_model
from onnx import TensorProto, helper, numpy_helper

from scanner.api import scan
from scanner.fleet import RAY_MISSING, scan_on_ray


def colour_model(seed: int, classes: int = 3, channels: int = 6) -> onnx.ModelProto:
    """Conv(3->6)-Relu-GAP-Gemm on 3x8x8 images whose class is their dominant colour, with
    seeded noise on the weights: each seed a different model that scans in about a second."""
    rng = np.random.default_rng(seed)
    w = 0.1 * rng.standard_normal((channels, 3, 3, 3))
    fc = 0.3 * rng.standard_normal((classes, channels))
    for k in range(classes):
        w[k, k, 1, 1] += 1.0
        fc[k, k] += 3.0
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), name) for a, name in
             ((w, "w"), (np.zeros(channels), "b"), (fc, "fc_w"), (np.zeros(classes), "fc_b"))]
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1] * 4,
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc",
                              transB=1)]
    graph = helper.make_graph(
        nodes, "colour", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                        ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def colour_images(path: Path, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), 2)
    pixels = 0.2 * rng.random((len(labels), 8, 8, 3))
    pixels[np.arange(len(labels)), :, :, labels] += 0.6
    np.savez(path, x=pixels.astype(np.float32), y=labels)
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Path, Path]:
    """Three colour models (at the scan's seed 0, model seeds 0 and 8 are flagged and get
    channels zeroed, 2 is clean; seed 1's flag is withdrawn by the selectivity veto) and
    one file that is no model: exit 1 and 2 at once, so the gate's precedence is part of
    what must match."""
    folder = tmp_path / "models"
    folder.mkdir()
    for i, seed in enumerate((0, 8, 2)):
        (folder / f"colour{i}.onnx").write_bytes(colour_model(seed).SerializeToString())
    (folder / "broken.onnx").write_bytes(b"not a model")
    return folder, colour_images(tmp_path / "few.npz")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # the same ORT thread count in both runs (a Ray task takes the driver's), so float
    # sums add up in the same order and channel choices cannot differ by rounding
    monkeypatch.setenv("SHAPSCAN_THREADS", "1")


def outcome(report: Path) -> dict[str, tuple]:
    """Per model: verdict, flagged targets, zeroed channels, errors."""
    doc = json.loads(report.read_text())
    return {Path(r["model_path"]).name: (
        r["verdict"], tuple((r["detection"] or {}).get("flagged_targets", ())),
        tuple((c["layer"], c["channel"]) for c in (r["repair"] or {}).get("pruned", ())),
        len(r["errors"])) for r in doc["results"]}


def scan_both(run_cli, models: Path | list[Path], data: Path, tmp_path: Path, *extra: str):
    """The same scan run locally, then on Ray, each with --out FOLDER and --report; each
    run's CLI result and report outcome."""
    models = models if isinstance(models, list) else [models]
    local, on_ray = tmp_path / "local.json", tmp_path / "ray.json"
    first = run_cli("scan", *models, "--data", data, "--report", local, "--out",
                    tmp_path / "local_out", *extra)
    second = run_cli("scan", *models, "--data", data, "--report", on_ray, "--out",
                     tmp_path / "ray_out", "--executor", "ray", *extra)
    return first, outcome(local), second, outcome(on_ray)


def test_a_folder_scanned_on_ray_matches_the_local_scan(ray_cluster, run_cli, fleet,
                                                        tmp_path):
    folder, data = fleet
    first, local, second, on_ray = scan_both(run_cli, folder, data, tmp_path)
    assert on_ray == local
    assert second.code == first.code == 2  # a broken model outranks the backdoors
    verdicts = [v[0] for v in local.values()]
    assert verdicts.count("backdoor") == 2 and "clean" in verdicts and "error" in verdicts
    assert any(v[2] for v in local.values()), "the comparison must include zeroed channels"
    # the same summaries, table and stderr lines, whatever ran them
    assert second.out.count("BACKDOOR") == first.out.count("BACKDOOR") == 2
    assert "colour2.onnx  clean" in second.out
    assert "broken.onnx" in second.err and "broken.onnx" in first.err
    # --out: the same files with the same bytes (a repair is deterministic for its seed)
    written = {p.name: p.read_bytes() for p in (tmp_path / "local_out").iterdir()}
    assert written and written == {p.name: p.read_bytes()
                                   for p in (tmp_path / "ray_out").iterdir()}


def _dies_on_first_try(marker: Path, victim: str):
    """A scan function whose Ray worker process exits while scanning `victim` the first
    time (the marker file remembers that it did), and scans normally on the re-run."""

    def scan_or_die(path, options, progress):
        if path.name == victim and not marker.exists():
            marker.touch()
            os._exit(1)  # the worker process dies: no exception, no result
        return scan(path, options, progress)

    return scan_or_die


def test_a_worker_killed_mid_scan_is_rerun_and_reported(ray_cluster, run_cli, fleet, tmp_path,
                                                        monkeypatch):
    folder, data = fleet
    marker = tmp_path / "killed-once"
    import scanner.commands.executor as executor

    monkeypatch.setattr(executor, "scan_on_ray", functools.partial(
        scan_on_ray, scan_fn=_dies_on_first_try(marker, "colour1.onnx")))
    first, local, second, on_ray = scan_both(run_cli, folder, data, tmp_path)
    assert marker.exists(), "the worker was not killed"
    assert on_ray == local and second.code == first.code
    doc = json.loads((tmp_path / "ray.json").read_text())
    attempts = {Path(r["model_path"]).name: r.get("attempts", 1) for r in doc["results"]}
    assert attempts == {"broken.onnx": 1, "colour0.onnx": 1, "colour1.onnx": 2,
                        "colour2.onnx": 1}
    assert "scanned on try 2: Ray re-ran the task after its worker was lost" in second.out


def test_a_model_whose_worker_dies_on_every_try_is_an_error_the_others_are_scanned(
        ray_cluster, run_cli, fleet, tmp_path, monkeypatch):
    folder, data = fleet
    (folder / "broken.onnx").unlink()
    import scanner.commands.executor as executor

    def always_dies(path, options, progress):
        if path.name == "colour2.onnx":
            os._exit(1)
        return scan(path, options, progress)

    monkeypatch.setattr(executor, "scan_on_ray", functools.partial(scan_on_ray,
                                                                   scan_fn=always_dies))
    report = tmp_path / "r.json"
    result = run_cli("scan", folder, "--data", data, "--report", report, "--executor", "ray",
                     "--ray-retries", "1", "--quiet")
    assert result.code == 2  # never a pass for a model nobody scanned
    got = outcome(report)
    assert got["colour2.onnx"][0] == "error" and got["colour0.onnx"][0] == "backdoor"
    line = [x for x in result.err.splitlines() if "colour2.onnx" in x]
    assert len(line) == 1 and "lost on each of 2 tries" in line[0]
    doc = json.loads(report.read_text())
    assert [r.get("attempts", 1) for r in doc["results"]] == [1, 1, 2]


def test_a_bug_in_a_task_stops_the_run_in_one_line_as_it_does_locally(ray_cluster, run_cli,
                                                                       fleet, monkeypatch):
    folder, data = fleet
    import scanner.commands.executor as executor

    def buggy(path, options, progress):
        raise RuntimeError(f"boom in {path.name}")

    monkeypatch.setattr(executor, "scan_on_ray", functools.partial(scan_on_ray,
                                                                   scan_fn=buggy))
    result = run_cli("scan", folder, "--data", data, "--executor", "ray")
    assert result.code == 2
    assert result.err.splitlines()[-1] == ("shapscan: internal error: RuntimeError: boom in "
                                           "broken.onnx (rerun with --debug for a traceback)")


@pytest.mark.parametrize("args, needle", [
    (("--device", "cuda"), "--ray-gpus 1 (--device cuda asks for 1 by default): no node of "
                           "the Ray cluster has that many GPUs (the largest has 0)"),
    (("--ray-cpus", "3"), "--ray-cpus 3: no node of the Ray cluster has that many CPUs "
                          "(the largest has 2)"),
])
def test_a_task_the_cluster_can_never_run_is_refused_not_left_pending(ray_cluster, run_cli,
                                                                      fleet, args, needle):
    folder, data = fleet
    result = run_cli("scan", folder, "--data", data, "--executor", "ray", *args)
    assert result.code == 4 and result.err.strip() == f"shapscan: error: {needle}"


@pytest.mark.parametrize("args, needle", [
    (("--ray-address", "127.0.0.1:6379"), "--ray-address needs --executor ray"),
    (("--ray-cpus", "2"), "--ray-cpus needs --executor ray"),
    (("--executor", "ray", "--ray-cpus", "0"), "--ray-cpus"),
])
def test_ray_flags_are_checked_before_anything_runs(run_cli, tmp_path, args, needle):
    out = tmp_path / "out"
    result = run_cli("scan", zoo_model("cnn_clean"), "--data", FEWSHOT, "--out", out, *args)
    assert result.code == 4 and needle in result.err
    assert "Traceback" not in result.err and not out.exists()


def test_without_ray_installed_the_ray_executor_is_one_usage_line(run_cli, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "out"
    result = run_cli("scan", zoo_model("cnn_clean"), "--data", FEWSHOT, "--out", out,
                     "--executor", "ray")
    assert result.code == 4 and not out.exists()
    assert result.err.strip() == f"shapscan: error: {RAY_MISSING}"


def test_a_cluster_address_nothing_listens_on_is_one_line_before_any_output(run_cli,
                                                                             tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    result = run_cli("scan", zoo_model("cnn_clean"), zoo_model("cnn_badnets"), "--data",
                     FEWSHOT, "--out", out, "--executor", "ray", "--ray-address",
                     "127.0.0.1:1")
    assert result.code == 2 and not out.exists()
    assert result.err.strip() == ("shapscan: error: cannot reach the Ray cluster at "
                                  "127.0.0.1:1: Connection refused")


@pytest.mark.slow
def test_sample_models_scanned_on_ray_match_the_local_scan(ray_cluster, run_cli, tmp_path):
    models = [zoo_model(name) for name in ("cnn_badnets", "cnn_clean", "silunet_trojan")]
    first, local, second, on_ray = scan_both(run_cli, models, FEWSHOT, tmp_path, "--quiet")
    assert on_ray == local and second.code == first.code == 1
    assert local["cnn_badnets.onnx"][:2] == ("backdoor", (0,))
    assert local["cnn_clean.onnx"][0] == "clean"
