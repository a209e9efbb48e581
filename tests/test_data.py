from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from scanner.data import (
    ImageSet,
    Preprocess,
    infer_preprocess,
    load_images,
    resolve_preprocess,
    save_npz,
    shifted,
)
from scanner.errors import DataError

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


def test_folder_of_labelled_files_resized(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "3_x.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "7_y.jpg")
    data = load_images(tmp_path, GRAY)
    assert data.labels.tolist() == [3, 7]
    assert data.pixels.shape == (2, 1, 8, 8)


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


def test_infer_layout_from_shape():
    assert infer_preprocess(["N", 28, 28, 3]).layout == "NHWC"
    assert infer_preprocess(["N", 1, 28, 28]).layout == "NCHW"
    with pytest.raises(DataError):
        infer_preprocess(["N", 10])


def test_shifted_copies_keep_labels():
    images = ImageSet(np.random.default_rng(0).random((3, 1, 6, 6)).astype(np.float32),
                      np.array([0, 1, 2]))
    rows = shifted(images, 4)
    assert len(rows) == 15 and rows.labels.tolist() == [0, 1, 2] * 5
    np.testing.assert_array_equal(rows.pixels[:3], images.pixels)
    np.testing.assert_array_equal(rows.pixels[3], np.roll(images.pixels[0], 1, axis=2))
