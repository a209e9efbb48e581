from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scanner.data import (
    METADATA_KEY,
    ImageSet,
    Preprocess,
    infer_preprocess,
    load_images,
    resolve_preprocess,
    save_npz,
    shifted,
)
from scanner.errors import DataError, UsageError

GRAY = Preprocess("NCHW", 1, 8, 8)


def write_file(path, payload: bytes):
    path.write_bytes(payload)
    return path


def write_npz(path, x, y):
    np.savez(path, x=x, y=y)
    return path


def test_npz_uint8_nhwc_roundtrip(tmp_path):
    pixels = np.random.default_rng(0).uniform(0, 1, (5, 1, 8, 8)).astype(np.float32)
    save_npz(tmp_path / "d.npz", pixels, np.arange(5))
    data = load_images(tmp_path / "d.npz", GRAY)
    assert data.pixels.shape == (5, 1, 8, 8)
    np.testing.assert_allclose(data.pixels, pixels, atol=0.5 / 255 + 1e-6)
    assert data.labels.tolist() == [0, 1, 2, 3, 4]


def test_gray_images_replicated_for_rgb_model(tmp_path):
    save_npz(tmp_path / "d.npz", np.full((2, 1, 8, 8), 0.5, np.float32), np.array([0, 1]))
    data = load_images(tmp_path / "d.npz", Preprocess("NHWC", 3, 8, 8, scale=255.0))
    assert data.pixels.shape == (2, 3, 8, 8)


def test_preprocess_affine_and_gradient_are_consistent():
    prep = Preprocess("NHWC", 3, 4, 4, scale=255.0, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0, 1, (2, 3, 4, 4)).astype(np.float32)
    x = prep.to_model(pixels)
    assert x.shape == (2, 4, 4, 3)
    # a linear loss L = <w, to_model(p)>: dL/dp from grad_to_pixels equals finite differences
    w = rng.normal(size=x.shape).astype(np.float32)
    grad = prep.grad_to_pixels(w)
    d = np.zeros_like(pixels)
    d[1, 2, 3, 0] = 1e-2
    fd = ((w * prep.to_model(pixels + d)).sum() - (w * prep.to_model(pixels - d)).sum()) / 2e-2
    assert grad[1, 2, 3, 0] == pytest.approx(fd, rel=1e-3)


def test_folder_of_class_dirs(tmp_path):
    for label, name in enumerate(["ankle_boot", "bag"]):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((8, 8), 40 * (label + 1), np.uint8)).save(tmp_path / name / "a.png")
    data = load_images(tmp_path, GRAY)
    assert data.labels.tolist() == [0, 1]
    assert data.pixels[1].max() == pytest.approx(80 / 255)


def test_folder_of_other_size_images_is_refused_unless_resize(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "3_x.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "7_y.jpg")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: images are 16x16, the "
                                        "model expects 8x8; .* give --resize"):
        load_images(tmp_path, GRAY)
    data = load_images(tmp_path, GRAY, resize=True)
    assert data.labels.tolist() == [3, 7]
    assert data.pixels.shape == (2, 1, 8, 8)
    assert data.resized == {"16x16": 2}
    # at the model's size nothing is resized, --resize or not
    assert load_images(tmp_path, Preprocess("NCHW", 1, 16, 16), resize=True).resized == {}


def test_npz_of_other_size_images_is_resized_only_on_request(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (2, 16, 1))  # [2, 16, 16]
    path = write_npz(tmp_path / "d.npz", ramp, np.array([0, 1]))
    with pytest.raises(DataError, match="images are 16x16, the model expects 8x8"):
        load_images(path, GRAY)
    data = load_images(path, GRAY, resize=True)
    assert data.pixels.shape == (2, 1, 8, 8) and data.resized == {"16x16": 2}
    # bilinear: the ramp stays a ramp, inside [0, 1]
    row = data.pixels[0, 0, 4]
    assert np.all(np.diff(row) > 0) and 0 <= row.min() and row.max() <= 1


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing.npz", "no such file"),
    (lambda p: write_npz(p / "a.npz", np.zeros((2, 1, 9, 9), np.uint8), np.zeros(2, int)),
     "9x9"),
    (lambda p: write_npz(p / "b.npz", np.zeros((2, 8, 8), np.uint8), np.zeros(3, int)),
     "2 images but 3 labels"),
    (lambda p: write_npz(p / "c.npz", np.full((2, 8, 8), 3.0, np.float32), np.zeros(2, int)),
     "[0, 1]"),
    (lambda p: write_npz(p / "d.npz", np.zeros((2, 8, 8), np.uint8), np.zeros(2)),
     "integer"),
    (lambda p: write_file(p / "e.npz", b"not a zip"), "unreadable"),
    (lambda p: write_file(p / "f.txt", b"x"), "expected a .npz"),
])
def test_bad_data_raises_one_line_error(tmp_path, make, message):
    with pytest.raises(DataError) as err:
        load_images(make(tmp_path), GRAY)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("y", "needle"), [
    (np.array([-1, 0]), "label -1 is not a class index"),
    (np.array([0, 2**64 - 1], np.uint64), "label 18446744073709551615 is not a class index"),
])
def test_labels_must_be_class_indices(tmp_path, y, needle):
    path = write_npz(tmp_path / "d.npz", np.zeros((2, 8, 8), np.uint8), y)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {needle}"):
        load_images(path, GRAY)


def test_float_npz_without_images_says_so(tmp_path):
    path = write_npz(tmp_path / "d.npz", np.zeros((0, 8, 8), np.float32), np.zeros(0, int))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: no images$"):
        load_images(path, GRAY)


def test_nhwc_with_alpha_drops_it(tmp_path):
    # [N, H, W, 4] and [N, H, W, 2] are RGBA and gray+alpha, not 8 channels of width 4
    rgb = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), np.uint8)
    x = np.concatenate([rgb, np.full((3, 8, 8, 1), 7, np.uint8)], axis=3)
    rgba = load_images(write_npz(tmp_path / "a.npz", x, np.arange(3)), Preprocess("NCHW", 3, 8, 8))
    np.testing.assert_array_equal(rgba.pixels, rgb.transpose(0, 3, 1, 2) / np.float32(255))
    gray_alpha = np.stack([rgb[..., 0], rgb[..., 1]], axis=3)  # [N, 8, 8, 2]: gray + alpha
    data = load_images(write_npz(tmp_path / "g.npz", gray_alpha, np.arange(3)), GRAY)
    np.testing.assert_array_equal(data.pixels[:, 0], rgb[..., 0] / np.float32(255))


def test_folder_label_too_large_is_a_data_error(tmp_path):
    huge = "99999999999999999999999"
    image = tmp_path / f"{huge}_a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    with pytest.raises(DataError, match=f"^{re.escape(str(image))}: label {huge} is too large"):
        load_images(tmp_path, GRAY)
    image.unlink()
    for name in ("0", huge):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name / "a.png")
    folder = re.escape(str(tmp_path / huge))
    with pytest.raises(DataError, match=f"^{folder}: label {huge} is too large"):
        load_images(tmp_path, GRAY)


@pytest.mark.parametrize("digit", ["\u00b2", "\u0669"])  # superscript two, Arabic-Indic nine
def test_non_ascii_digits_are_never_labels(tmp_path, digit):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / f"{digit}_a.png")
    with pytest.raises(DataError, match="cannot tell the label"):
        load_images(flat, GRAY)
    # as a class folder it is a class name: folders take labels in name order
    dirs = tmp_path / "dirs"
    for name in ("0", "1", digit):
        (dirs / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(dirs / name / "a.png")
    assert load_images(dirs, GRAY).labels.tolist() == [0, 1, 2]


def test_decompression_bomb_is_a_data_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 16x16 image stands in for a bomb
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "0_bomb.png")
    bomb = re.escape(str(tmp_path / "0_bomb.png"))
    with pytest.raises(DataError, match=rf"^{bomb}: unreadable image \(Image size \(256 pixels\) "
                                        "exceeds limit"):
        load_images(tmp_path, GRAY)


def test_unreadable_image_in_folder(tmp_path):
    (tmp_path / "0_bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="unreadable image"):
        load_images(tmp_path, GRAY)


def test_preprocess_precedence(tmp_path):
    model = tmp_path / "m.onnx"
    meta = {"shapscan.preprocess": json.dumps({"scale": 255.0})}
    assert resolve_preprocess(model, meta, ["N", 1, 8, 8]).scale == 255.0
    (tmp_path / "m.preprocess.json").write_text(json.dumps({"scale": 2.0}))
    assert resolve_preprocess(model, meta, ["N", 1, 8, 8]).scale == 2.0
    assert resolve_preprocess(model, meta, ["N", 1, 8, 8], {"scale": 3.0}).scale == 3.0


@pytest.mark.parametrize(("stored", "needle"), [
    ("null", "expected a JSON object of preprocessing fields, got null"),
    ("[1, 2]", "expected a JSON object of preprocessing fields, got [1, 2]"),
    ('"hello"', 'expected a JSON object of preprocessing fields, got "hello"'),
    ('{"mean": "abc"}', 'mean must be a number or a list of numbers, got "abc"'),
    ('{"mean": {"a": 1}}', "mean must be a number or a list of numbers"),
    ('{"channels": "abc"}', 'channels must be a positive integer, got "abc"'),
    ('{"scale": "x"}', 'scale must be a number in (0, 1e6], got "x"'),
    ('{"height": -5}', "height must be a positive integer, got -5"),
    ('{"height": 28.5}', "height must be a positive integer, got 28.5"),
    ('{"std": [1, 0]}', "std must be a number in [1e-6, 1e6] or a list of them"),
    ('{"std": [1e999]}', "std must be a number in [1e-6, 1e6]"),
])
def test_bad_preprocessing_metadata_names_its_source_and_field(stored, needle):
    with pytest.raises(DataError) as err:
        resolve_preprocess(Path("m.onnx"), {METADATA_KEY: stored}, ["N", 1, 8, 8])
    assert str(err.value).startswith(f"model metadata {METADATA_KEY}: {needle}")
    assert "\n" not in str(err.value)


def test_binary_sidecar_is_a_data_error_naming_it(tmp_path):
    sidecar = write_file(tmp_path / "m.preprocess.json", b"\xff\xfe\x00{")
    with pytest.raises(DataError) as err:
        resolve_preprocess(tmp_path / "m.onnx", {}, ["N", 1, 8, 8])
    assert str(err.value).startswith(f"{sidecar}: unreadable preprocessing sidecar (")
    assert "\n" not in str(err.value)


def test_sidecar_field_errors_name_the_sidecar(tmp_path):
    sidecar = tmp_path / "m.preprocess.json"
    sidecar.write_text(json.dumps({"layout": "CHW"}))
    with pytest.raises(DataError, match=f'^{re.escape(str(sidecar))}: layout must be NCHW or '
                                        'NHWC, got "CHW"$'):
        resolve_preprocess(tmp_path / "m.onnx", {}, ["N", 1, 8, 8])


def test_spec_contradicting_the_model_input_is_bad_data_or_a_bad_flag():
    meta = {METADATA_KEY: json.dumps({"height": 100, "width": 100})}
    with pytest.raises(DataError, match=(
            rf"^preprocessing from model metadata {METADATA_KEY} gives input \[N, 1, 100, 100\], "
            r"but the model takes \[N, 1, 8, 8\]$")):
        resolve_preprocess(Path("m.onnx"), meta, ["N", 1, 8, 8])
    with pytest.raises(UsageError, match=(r"^preprocessing from --layout gives input "
                                          r"\[N, 8, 8, 1\], but the model takes \[N, 1, 8, 8\]$")):
        resolve_preprocess(Path("m.onnx"), {}, ["N", 1, 8, 8], {"layout": "NHWC"})
    with pytest.raises(UsageError, match=(r"^mean has 2 values \(--mean\) but the input has 3 "
                                          r"channels \(the model's input shape\); give 1 value "
                                          r"or 3$")):
        resolve_preprocess(Path("m.onnx"), {}, ["N", 3, 8, 8], {"mean": (0.5, 0.5)})
    # a symbolic dimension takes what the spec gives
    assert resolve_preprocess(Path("m.onnx"), meta, ["N", 1, "h", "w"]).height == 100


def test_infer_layout_from_shape():
    assert infer_preprocess(["N", 28, 28, 3]).layout == "NHWC"
    assert infer_preprocess(["N", 1, 28, 28]).layout == "NCHW"
    flat = infer_preprocess(["N", 10])  # flat images: the shape comes from flags or sidecar
    assert flat.flat and (flat.height, flat.width) == (0, 0)
    with pytest.raises(DataError, match="rank 3"):
        infer_preprocess(["N", 10, 10])


def test_shifted_copies_keep_labels():
    images = ImageSet(np.random.default_rng(0).random((3, 1, 6, 6)).astype(np.float32),
                      np.array([0, 1, 2]))
    rows = shifted(images, 4)
    assert len(rows) == 15 and rows.labels.tolist() == [0, 1, 2] * 5
    np.testing.assert_array_equal(rows.pixels[:3], images.pixels)
    np.testing.assert_array_equal(rows.pixels[3], np.roll(images.pixels[0], 1, axis=2))


def test_a_layout_from_flag_or_sidecar_settles_an_input_with_5_channels(tmp_path):
    shape = ["N", 5, 28, 28]  # neither 1, 3 nor 4 channels on either side: the shape can't tell
    with pytest.raises(DataError, match="cannot tell the channel axis"):
        resolve_preprocess(tmp_path / "m.onnx", {}, shape)
    prep = resolve_preprocess(tmp_path / "m.onnx", {}, shape, {"layout": "NCHW"})
    assert (prep.layout, prep.channels, prep.height, prep.width) == ("NCHW", 5, 28, 28)
    (tmp_path / "m.preprocess.json").write_text('{"layout": "NCHW"}')
    assert resolve_preprocess(tmp_path / "m.onnx", {}, shape).channels == 5


def test_nhwc_data_with_the_model_channel_count_is_read_as_nhwc(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 5), dtype=np.uint8)
    np.savez(tmp_path / "c5.npz", x=x, y=np.arange(4))
    images = load_images(tmp_path / "c5.npz", Preprocess("NCHW", 5, 8, 8))
    np.testing.assert_allclose(images.pixels, x.transpose(0, 3, 1, 2) / 255.0, rtol=1e-6)


def test_16_bit_greyscale_pngs_keep_their_range(tmp_path):
    # Pillow's convert("L") saturates 16-bit values: every pixel above 1/257 came out white
    ramp = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    (tmp_path / "0").mkdir()
    Image.fromarray(ramp).save(tmp_path / "0" / "a.png")
    data = load_images(tmp_path, GRAY)
    assert np.allclose(data.pixels[0, 0], ramp / 65535.0, atol=1e-6)


def test_32_bit_images_have_no_range_and_are_refused(tmp_path):
    Image.fromarray(np.ones((8, 8), np.float32), mode="F").save(tmp_path / "0_a.tiff")
    with pytest.raises(DataError, match="32-bit"):
        load_images(tmp_path, GRAY)


def test_hidden_entries_are_neither_classes_nor_images(tmp_path):
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((8, 8), 9, np.uint8)).save(tmp_path / label / "a.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # sorted first, it used to become label 0
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "1" / ".a-checkpoint.png")
    assert load_images(tmp_path, GRAY).labels.tolist() == [0, 1]


def test_data_that_is_not_a_regular_file_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "fewshot.npz"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(DataError, match="not a regular file"):
        load_images(fifo, GRAY)


def test_npz_suffix_in_any_case(tmp_path):
    with open(tmp_path / "few.NPZ", "wb") as f:  # np.savez would append ".npz"
        np.savez(f, x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 1]))
    assert len(load_images(tmp_path / "few.NPZ", GRAY)) == 2


def test_class_folders_are_ordered_by_name_as_strings_as_the_readme_says(tmp_path):
    """README "Data": sorted folder names are classes 0, 1, 2, ... (as strings: "B" before
    "a", "10_bag" before "2_pullover"), an empty folder takes its place; numeric names are
    their own class."""
    names = ["a_shirt", "10_bag", "B_coat", "2_pullover", "empty"]
    for value, name in enumerate(names):
        (tmp_path / name).mkdir()
        if name != "empty":
            Image.fromarray(np.full((8, 8), 20 * (value + 1), np.uint8)).save(
                tmp_path / name / "x.png")
    data = load_images(tmp_path, GRAY)
    by_label = {int(y): round(float(x.max()) * 255) for x, y in zip(data.pixels, data.labels,
                                                                    strict=True)}
    # sorted: 10_bag, 2_pullover, B_coat, a_shirt, empty
    assert by_label == {0: 40, 1: 80, 2: 60, 3: 20}
    numeric = tmp_path / "numeric"
    for name in ("10", "2"):
        (numeric / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(numeric / name / "x.png")
    assert sorted(load_images(numeric, GRAY).labels.tolist()) == [2, 10]
