from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FEWSHOT, SAMPLES, TEST_SET, zoo_entries, zoo_model
from graph_builders import conv_relu_model, save
from PIL import Image

from scanner.data import METADATA_KEY

# The committed zoo: eval must reproduce what make_zoo.py measured when it trained them.
ZOO = zoo_entries()


@pytest.mark.parametrize("entry", ZOO, ids=[e["name"] for e in ZOO])
def test_eval_reproduces_zoo_json(run_cli, entry):
    result = run_cli("eval", SAMPLES / entry["model"], "--data", TEST_SET,
                     "--zoo-entry", entry["name"], "--json")
    assert result.code == 0, result.err
    got = json.loads(result.out)
    assert got["clean_acc"] == pytest.approx(entry["clean_acc"], abs=1e-3)
    if entry["attack"]:
        assert got["asr"] == pytest.approx(entry["asr"], abs=1e-3)
        assert got["asr"] >= 0.9
    else:
        assert got["asr"] is None


def test_backdoored_models_keep_clean_accuracy_of_their_twin():
    clean = {e["arch"]: e["clean_acc"] for e in ZOO if e["attack"] is None}
    for e in ZOO:
        if e["attack"] and e["arch"] in clean:
            assert e["clean_acc"] >= clean[e["arch"]] - 0.03, e["name"]


def test_fewshot_has_exactly_one_image_per_class():
    with np.load(FEWSHOT) as f:
        assert sorted(f["y"].tolist()) == list(range(10))


def test_eval_table_with_explicit_attack(run_cli):
    model = zoo_model("cnn_badnets")
    result = run_cli("eval", model, "--data", TEST_SET, "--attack", "badnets", "--target", "0",
                     "--param", "size=3")
    assert result.code == 0
    assert "clean accuracy" in result.out and "ASR" in result.out


@pytest.mark.parametrize(("data", "needle"), [
    ("bad.npz", "unreadable .npz"),
    ("shape.npz", "images are 9x9"),
    ("imgs", "unreadable image"),
])
def test_data_errors_exit_2_with_one_line(run_cli, tmp_path, data, needle):
    model = zoo_model("cnn_clean")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 9, 9), np.uint8), y=np.zeros(2, np.int64))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0_a.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    result = run_cli("eval", model, "--data", tmp_path / data)
    assert result.code == 2
    assert needle in result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err


def test_usage_errors_exit_4(run_cli):
    model = zoo_model("cnn_clean")
    assert run_cli("eval", model, "--data", TEST_SET, "--attack", "badnets").code == 4
    assert run_cli("eval", model, "--data", TEST_SET, "--attack", "badnets", "--target", "1",
                   "--param", "colour=red").code == 4
    assert run_cli("eval", model, "--bogus").code == 4


# Bad input: one line, exit 2 for bad data, metadata or zoo files, exit 4 for bad flags.

def tiny_model(tmp_path, preprocess: str | None = None):
    """[N, 3, 8, 8] in [0, 1], 5 classes; `preprocess` goes in its metadata."""
    proto = conv_relu_model()
    if preprocess is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, preprocess
    return save(proto, tmp_path / "m.onnx")


def tiny_data(tmp_path, x=None, y=None, name: str = "d.npz"):
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), np.uint8) if x is None else x
    np.savez(tmp_path / name, x=x, y=np.arange(len(x)) % 5 if y is None else y)
    return tmp_path / name


def assert_one_line_error(result, code: int, message: str):
    assert (result.code, result.err) == (code, f"shapscan: error: {message}\n")


@pytest.mark.parametrize(("stored", "needle"), [
    # these three were reported as "bad attack parameter" with exit 4
    ("null", "expected a JSON object of preprocessing fields, got null"),
    ("[1, 2]", "expected a JSON object of preprocessing fields, got [1, 2]"),
    ('{"mean": {"a": 1}}', 'mean must be a number or a list of numbers, got {"a": 1}'),
    # and these were internal errors
    ('"hello"', 'expected a JSON object of preprocessing fields, got "hello"'),
    ('{"mean": "abc"}', 'mean must be a number or a list of numbers, got "abc"'),
    ('{"channels": "abc"}', 'channels must be a positive integer, got "abc"'),
    ('{"scale": "x"}', 'scale must be a number in (0, 1e6], got "x"'),
    ('{"height": -5}', "height must be a positive integer, got -5"),
])
def test_bad_preprocessing_metadata_exits_2_naming_source_and_field(run_cli, tmp_path, stored,
                                                                     needle):
    result = run_cli("eval", tiny_model(tmp_path, stored), "--data", tiny_data(tmp_path),
                     "--attack", "badnets", "--target", "0")
    assert_one_line_error(result, 2, f"model metadata {METADATA_KEY}: {needle}")


def test_binary_sidecar_exits_2_naming_it(run_cli, tmp_path):
    model = tiny_model(tmp_path)
    sidecar = tmp_path / "m.preprocess.json"
    sidecar.write_bytes(b"\xff\xfe\x00{")
    result = run_cli("eval", model, "--data", tiny_data(tmp_path))
    assert_one_line_error(result, 2, f"{sidecar}: unreadable preprocessing sidecar ('utf-8' "
                                     "codec can't decode byte 0xff in position 0: invalid start "
                                     "byte)")


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--channels", "0", "Invalid value for '--channels': channels must be a positive integer, "
                        "got 0"),
    ("--channels", "-2", "Invalid value for '--channels': channels must be a positive integer, "
                         "got -2"),
    ("--std", "0", "Invalid value for '--std': std must be a number in [1e-6, 1e6] or a list of "
                   "them, got [0.0]"),
    ("--std", "1,-1", "Invalid value for '--std': std must be a number in [1e-6, 1e6] or a list "
                      "of them, got [1.0, -1.0]"),
    ("--scale", "nan", "Invalid value for '--scale': scale must be a number in (0, 1e6], got NaN"),
    ("--scale", "inf", "Invalid value for '--scale': scale must be a number in (0, 1e6], "
                       "got Infinity"),
    ("--scale", "0", "Invalid value for '--scale': scale must be a number in (0, 1e6], got 0.0"),
    ("--mean", "0.5,0.5", "mean has 2 values (--mean) but the input has 3 channels (the "
                          "model's input shape); give 1 value or 3"),
    ("--layout", "NHWC", "preprocessing from --layout gives input [N, 8, 8, 3], but the model "
                         "takes [N, 3, 8, 8]"),
])
def test_bad_preprocessing_flags_exit_4(run_cli, tmp_path, flag, value, message):
    result = run_cli("eval", tiny_model(tmp_path), "--data", tiny_data(tmp_path), flag, value)
    assert_one_line_error(result, 4, message)


def test_bad_data_exits_2_naming_the_file(run_cli, tmp_path, monkeypatch):
    model = tiny_model(tmp_path)
    empty = tiny_data(tmp_path, np.zeros((0, 8, 8, 3), np.float32), np.zeros(0, int), "e.npz")
    assert_one_line_error(run_cli("eval", model, "--data", empty), 2, f"{empty}: no images")
    negative = tiny_data(tmp_path, y=np.array([-1, 0, 1, 2, 3]), name="n.npz")
    assert_one_line_error(run_cli("eval", model, "--data", negative), 2,
                          f"{negative}: label -1 is not a class index (0, 1, 2, ...)")
    huge = tmp_path / "huge"
    huge.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(huge / "99999999999999999999999_a.png")
    assert_one_line_error(run_cli("eval", model, "--data", huge), 2,
                          f"{huge / '99999999999999999999999_a.png'}: label "
                          "99999999999999999999999 is too large for a class index")
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bombs / "0_a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels stand in for a bomb
    result = run_cli("eval", model, "--data", bombs)
    assert result.code == 2 and result.err.count("\n") == 1
    assert result.err.startswith(f"shapscan: error: {bombs / '0_a.png'}: unreadable image "
                                 "(Image size (256 pixels) exceeds limit")


def test_class_folder_named_with_a_non_ascii_digit_is_a_class_name(run_cli, tmp_path):
    for name in ("0", "1", "\u00b2"):  # "²": str.isdigit() but not int()
        (tmp_path / "d" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / name / "a.png")
    result = run_cli("eval", tiny_model(tmp_path), "--data", tmp_path / "d", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["images"] == 3


def test_rgba_images_lose_alpha_not_their_channel_axis(run_cli, tmp_path):
    rgb = tiny_data(tmp_path)
    with np.load(rgb) as f:
        x, y = f["x"], f["y"]
    rgba = tiny_data(tmp_path, np.concatenate([x, np.full_like(x[..., :1], 255)], 3), y, "a.npz")
    model = tiny_model(tmp_path)
    runs = [run_cli("eval", model, "--data", d, "--json") for d in (rgb, rgba)]
    assert [r.code for r in runs] == [0, 0], runs[1].err
    assert json.loads(runs[0].out)["clean_acc"] == json.loads(runs[1].out)["clean_acc"]


@pytest.mark.parametrize(("attack", "param", "message"), [
    ("badnets", "size=abc", "badnets parameter size must be an integer >= 1, got 'abc'"),
    ("badnets", "loc=b", "badnets parameter loc must be one of tl, tr, bl, br, got 'b'"),
    ("badnets", "size=0", "badnets parameter size must be an integer >= 1, got 0"),
    ("badnets", "size=-3", "badnets parameter size must be an integer >= 1, got -3"),
    ("badnets", "loc=zz", "badnets parameter loc must be one of tl, tr, bl, br, got 'zz'"),
    ("trojan", "size=0", "trojan parameter size must be an integer >= 1, got 0"),
    ("wanet", "k=0", "wanet parameter k must be an integer >= 2, got 0"),
    ("badnets", "colour=red", "badnets takes no parameter 'colour' (it takes size, loc, value)"),
    ("badnets", "size=8",
     "bad attack parameter: a patch of size 8 does not fit 8x8 images (at most 7)"),
])
def test_bad_attack_parameters_exit_4(run_cli, tmp_path, attack, param, message):
    result = run_cli("eval", tiny_model(tmp_path), "--data", tiny_data(tmp_path),
                     "--attack", attack, "--target", "0", "--param", param)
    assert_one_line_error(result, 4, message)


def test_negative_target_exits_4(run_cli, tmp_path):
    result = run_cli("eval", tiny_model(tmp_path), "--data", tiny_data(tmp_path),
                     "--attack", "badnets", "--target", "-1")
    assert_one_line_error(result, 4, "Invalid value for '--target': -1 is not in the range "
                                     "x>=0.")


@pytest.mark.parametrize(("zoo", "message"), [
    ('{"a": 1}', "expected a JSON list of zoo entries (objects)"),
    ("[1, 2]", "expected a JSON list of zoo entries (objects)"),
    ('[{"name": "x", "attack": "nope", "target": 0}]',
     "zoo entry 'x': unknown attack 'nope' (known: badnets, blended, patch, sig, trojan, wanet)"),
    ('[{"name": "x", "attack": "badnets"}]', "zoo entry 'x': target must be a class index, "
                                            "got null"),
    ('[{"name": "x", "attack": "badnets", "target": 0, "params": [3]}]',
     "zoo entry 'x': params must be a JSON object, got [3]"),
    ('[{"name": "x", "attack": "badnets", "target": 0, "params": {"size": 0}}]',
     "zoo entry 'x': badnets parameter size must be an integer >= 1, got 0"),
])
def test_malformed_zoo_file_exits_2(run_cli, tmp_path, zoo, message):
    (tmp_path / "zoo.json").write_text(zoo)
    result = run_cli("eval", tiny_model(tmp_path), "--data", tiny_data(tmp_path),
                     "--zoo-entry", "x", "--zoo", tmp_path / "zoo.json")
    assert_one_line_error(result, 2, f"{tmp_path / 'zoo.json'}: {message}")


def test_labels_past_the_model_classes_exit_2_as_in_scan(run_cli, tmp_path):
    big = tiny_data(tmp_path, y=np.arange(5) + 5)
    said = f"{big}: label 9 is out of range for a model with 5 classes"
    assert_one_line_error(run_cli("eval", tiny_model(tmp_path), "--data", big), 2, said)
    # the baselines read the labels too (fine-pruning's accuracy budget): same refusal
    scan = run_cli("scan", tiny_model(tmp_path), "--data", big, "--method", "fp", "-q")
    assert scan.code == 2 and said in scan.err and scan.err.count("\n") == 1


def test_target_past_the_model_classes_exits_4(run_cli, tmp_path):
    result = run_cli("eval", tiny_model(tmp_path), "--data", tiny_data(tmp_path),
                     "--attack", "badnets", "--target", "99")
    assert result.code == 4 and "target 99 is not a class" in result.err
    assert result.err.count("\n") == 1


def test_attack_options_without_an_attack_and_a_missing_zoo_file_are_usage_errors(run_cli,
                                                                                   tmp_path):
    model, data = tiny_model(tmp_path), tiny_data(tmp_path)
    for extra in (["--target", "1"], ["--param", "size=3"]):
        assert_one_line_error(run_cli("eval", model, "--data", data, *extra), 4,
                              "--target and --param describe an attack: give --attack too")
    missing = tmp_path / "nope.json"
    assert_one_line_error(run_cli("eval", model, "--data", data, "--zoo-entry", "x", "--zoo",
                                  missing), 4, f"--zoo {missing}: no such file")


@pytest.mark.parametrize("flag,value", [("--scale", "1e30"), ("--std", "1e-30")])
def test_preprocessing_that_would_overflow_float32_is_refused(run_cli, tmp_path, flag, value):
    result = run_cli("eval", tiny_model(tmp_path), "--data", tiny_data(tmp_path), flag, value)
    assert result.code == 4 and "1e6" in result.err and result.err.count("\n") == 1


def test_attack_success_needs_images_outside_the_target_class(run_cli, tmp_path):
    shot = np.load(FEWSHOT)
    only = tmp_path / "only3.npz"
    np.savez(only, x=shot["x"][3:4], y=shot["y"][3:4])
    result = run_cli("eval", zoo_model("cnn_clean"), "--data", only, "--attack", "badnets",
                     "--target", str(int(shot["y"][3])))
    assert result.code == 2 and result.err.count("\n") == 1
    assert "needs images of other classes" in result.err
