"""HTML report: self-contained, escapes attacker-controlled names, renders in Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_fixtures import (
    LAYERS,
    backdoor_result,
    clean_result,
    data_free_result,
    error_result,
    inconclusive_result,
    isolation_flagged_result,
    model_summary,
)

from scanner.findings import ChannelValue, Finding, LayerInfo, Severity
from scanner.report import render_html, write_report
from scanner.report.charts import png_data_uri

EVIL = '<script>alert("x")</script>'


class Collector(HTMLParser):
    """Collects tags, attributes and text so tests check the parsed document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Collector:
    collector = Collector()
    collector.feed(page)
    return collector


def test_backdoor_report_has_every_section() -> None:
    page = render_html(backdoor_result())
    doc = parse(page)
    text = " ".join(doc.text)
    for heading in ("BACKDOOR DETECTED", "Model", "Detection", "Reversed trigger for class 3",
                    "Repair", "Top channels by backdoor Shapley value", "Zeroed channels",
                    "Findings", "Timings"):
        assert heading in text, heading
    assert "target class 3" in text and "4 of 416 channels zeroed" in text
    assert "out/cnn_badnets.safe.onnx" in text
    # the given-back note comes after the zeroed-channel table and names channel 17
    back = " ".join(text[text.index("switched back on"):].split())
    assert "/features/relu2/Relu_output_0 17" in back
    assert "SS201" in text and "9f2c4e7a" in text
    # one anomaly bar per class and the dashed threshold line in the SVG chart
    assert sum(1 for tag, _ in doc.tags if tag == "rect") >= 10 + 8
    assert any(tag == "line" and a.get("class") == "threshold" for tag, a in doc.tags)
    assert "flag threshold 2" in text
    imgs = [a for tag, a in doc.tags if tag == "img"]
    assert [a["alt"] for a in imgs] == ["mask", "pattern", "trigger (mask × pattern)",
                                        "stamped example"]
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)


def test_trigger_images_are_upscaled_with_nearest_neighbour() -> None:
    result = backdoor_result()
    uri = png_data_uri(result.detection.masks[3])
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.size == (140, 140)  # 28 px x 5
    pixels = np.asarray(image)
    # nearest neighbour: every 5x5 block is one flat colour
    assert np.all(pixels.reshape(28, 5, 28, 5).std(axis=(1, 3)) == 0)
    rgb = png_data_uri(np.random.default_rng(0).uniform(size=(3, 32, 32)))
    assert Image.open(io.BytesIO(base64.b64decode(rgb.split(",", 1)[1]))).mode == "RGB"


def test_model_controlled_strings_are_escaped() -> None:
    result = backdoor_result()
    evil_layer = LayerInfo(EVIL, "Relu", f'node"><img src=x onerror=alert(1)>{EVIL}', 8, 4)
    result.model = model_summary(path=f"models/{EVIL}.onnx", layers=[*LAYERS, evil_layer])
    result.model_path = result.model.path
    result.repair.top_channels.append(ChannelValue(EVIL, 0, 0.01, 0.0, False))
    result.repair.pruned.append(ChannelValue(EVIL, 1, 0.01, 0.0, True))
    result.repair.given_back.append(ChannelValue(EVIL, 2, 0.01, 0.0, False))
    result.findings.append(Finding("SS107", Severity.HIGH, f"dangling input {EVIL}", EVIL))
    result.errors.append(f"export failed at {EVIL}")
    result.skipped.append(EVIL)
    result.timings[EVIL] = 1.0
    result.method = EVIL
    page = render_html(result)
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;") >= 9
    doc = parse(page)
    assert not any(tag in ("script", "iframe", "object", "embed") for tag, _ in doc.tags)
    assert all(tag != "img" or a["src"].startswith("data:") for tag, a in doc.tags)
    assert not any(name.startswith("on") for _, attrs in doc.tags for name in attrs)


def test_self_contained_without_network_references() -> None:
    for make in (backdoor_result, clean_result, error_result, inconclusive_result):
        page = render_html(make())
        # base64 payloads may contain "//": only the markup around them is checked
        markup = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", page)
        assert not re.search(r"https?:|//[a-z]|@import|url\(", markup, re.IGNORECASE), make
        doc = parse(page)
        assert not any(tag in ("link", "script") for tag, _ in doc.tags)


def test_other_verdicts_render() -> None:
    clean = render_html(clean_result())
    assert 'class="banner clean"' in clean and "Reversed trigger for" not in clean
    assert "Repair" not in clean and "No findings." in clean
    assert "synthesised from the model were checked too" in clean
    assert "few-shot 0.62, synthesised 0.71" in clean
    error = render_html(error_result())
    assert "ERROR — MODEL NOT SCANNED" in error and "Errors and skipped items" in error
    assert "com.evil" in error and "Detection" not in error
    inconclusive = render_html(inconclusive_result())
    assert "INCONCLUSIVE" in inconclusive and "skipped: behavioural scan" in inconclusive


def test_non_finite_anomaly_index_renders() -> None:
    result = clean_result()
    result.detection.classes[0].anomaly_index = float("inf")
    result.detection.classes[1].anomaly_index = float("nan")
    page = render_html(result)
    assert "∞" in page and "nan" not in page.lower().replace("nan-", "")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = write_report(tmp_path / "report.html", render_html(backdoor_result()))
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             f"--screenshot={shot}", "--window-size=1200,2400", page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert image.shape[:2] == (2400, 1200)
    assert image.std() > 20  # not a blank page
    # the verdict banner (red) is near the top, and the trigger images (black) below it
    red = (image[..., 0] > 170) & (image[..., 1] < 80) & (image[..., 2] < 80)
    assert red[:300].sum() > 20_000
    assert (image.sum(axis=2) < 40).sum() > 30_000


def test_recorded_total_is_not_double_counted() -> None:
    result = clean_result()
    result.timings["total"] = 15.0
    page = render_html(result)
    assert "<th class=num>15.00 s</th>" in page and page.count(">total<") == 1


def test_rgb_trigger_and_batched_mask_shapes() -> None:
    result = backdoor_result()
    rng = np.random.default_rng(1)
    result.detection.masks[3] = rng.uniform(size=(1, 28, 28))
    result.detection.patterns[3] = rng.uniform(size=(3, 28, 28))
    result.detection.examples[3] = rng.uniform(size=(3, 28, 28))
    imgs = [a for tag, a in parse(render_html(result)).tags if tag == "img"]
    modes = [Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1]))).mode
             for a in imgs]
    assert modes == ["L", "RGB", "RGB", "RGB"]


def test_a_baseline_repair_claims_no_verdict() -> None:
    import dataclasses

    from scanner.findings import Verdict

    result = dataclasses.replace(backdoor_result(), verdict=Verdict.REPAIR_ONLY, detection=None)
    text = " ".join(parse(render_html(result)).text)
    assert "REPAIR ONLY — NO DETECTION" in text
    assert "BACKDOOR DETECTED" not in text and "anomalously small trigger" not in text


def _svg_numbers(tag_attrs: dict[str, str | None], *names: str) -> list[float]:
    return [float(tag_attrs[n] or 0) for n in names]


def test_the_threshold_label_sits_in_the_margin_right_of_every_bar() -> None:
    for make in (backdoor_result, isolation_flagged_result):
        doc = parse(render_html(make()))
        bars = [a for tag, a in doc.tags if tag == "rect"][:10]  # the anomaly chart's
        right_edge = max(x + w for x, w in (_svg_numbers(a, "x", "width") for a in bars))
        line = next(a for tag, a in doc.tags if tag == "line" and a.get("class") == "threshold")
        label = next(a for tag, a in doc.tags if tag == "text"
                     and a.get("class") == "threshold-label")
        assert float(label["x"] or 0) > max(right_edge, float(line["x2"] or 0))


def test_a_class_flagged_by_the_patch_test_shows_that_test_not_only_its_bar() -> None:
    result = isolation_flagged_result()
    page = render_html(result)
    doc = parse(page)
    text = " ".join(doc.text)
    # the bar (combined index 2.28) is under the 2.5 line: the diamond marks the patch
    # test's index, above the line, and a note says which test flagged the class
    line_y = float(next(a for tag, a in doc.tags
                        if tag == "line" and a.get("class") == "threshold")["y1"] or 0)
    [mark] = [a for tag, a in doc.tags if tag == "path" and a.get("class") == "test-mark"]
    mark_y = float((mark["d"] or "").split()[1])  # "M cx top-of-diamond ..."
    assert mark_y < line_y
    assert "patch test 3.32" in text
    assert "Class 0 was flagged by the patch test, not by the combined index" in \
        " ".join(text.split())
    # a class flagged by the combined index gets no diamond
    assert not any(tag == "path" and a.get("class") == "test-mark"
                   for tag, a in parse(render_html(backdoor_result())).tags)


def test_a_warp_flag_is_marked_with_the_warp_index() -> None:
    from scanner.report.charts import anomaly_chart

    result = isolation_flagged_result()
    classes = result.detection.classes
    classes[0].warp_anomaly_index = float("inf")  # all other warps equal: drawn at the top
    chart = anomaly_chart(classes, 2.5, reasons={0: "warp"})
    assert "warp test ∞" in chart and chart.count('class="test-mark"') == 1


def test_a_data_free_report_says_synthesised_inputs_never_few_shot_in_the_repair() -> None:
    page = render_html(data_free_result())
    doc = parse(page)
    text = " ".join(" ".join(doc.text).split())
    repair = text[text.index("Repair"):text.index("Top channels")]
    assert "few-shot" not in repair
    assert "Reversed trigger success (stamped synthesised inputs)" in repair
    assert "Clean accuracy (synthesised inputs)" in repair
    assert ("on 45 rows: the 9 synthesised inputs of other classes and 4 shifted copies of "
            "each, stamped with the reversed trigger at 2x its strength") in repair
    few = " ".join(" ".join(parse(render_html(isolation_flagged_result())).text).split())
    assert "clean accuracy on 90 rows: the 10 few-shot images and 8 shifted copies" in few


def _shoot(page: Path, shot: Path, height: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             f"--screenshot={shot}", f"--window-size=1100,{height}", page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)


def _colour(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    return (np.abs(image - np.array(rgb)) <= tol).all(axis=2)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_three_kinds_of_scan_render_their_charts_in_headless_chromium(tmp_path: Path) -> None:
    """A patch-flagged, an isolation-flagged and a data-free scan's reports as Chromium
    draws them: not blank, the verdict banner on top, the anomaly chart's dashed red
    threshold line, and the outlined bar of a class the isolation test flagged."""
    shots = {}
    for name, make in (("patch", backdoor_result), ("isolation", isolation_flagged_result),
                       ("data-free", data_free_result)):
        page = write_report(tmp_path / f"{name}.html", render_html(make()))
        shots[name] = _shoot(page, tmp_path / f"{name}.png", 1500)
    for name, image in shots.items():
        assert image.shape[:2] == (1500, 1100), name
        assert image.std() > 20, name  # not a blank page
        red = _colour(image, (198, 40, 40))  # FLAG: banner, threshold line, flagged bar
        assert red[:250].sum() > 20_000, name  # the BACKDOOR banner
        # the chart (below the findings): a dashed red line is many short red runs on a row
        rows = red[350:1000].sum(axis=1)
        assert rows.max() > 200, name
    # the pale, outlined bar of the class the test flagged (about 2,900 pixels; red text
    # and bar edges antialiased on white leave some 650 of that shade in every report)
    light = {name: _colour(image, (244, 199, 195), 6).sum() for name, image in shots.items()}
    assert light["isolation"] > 2_000 + max(light["patch"], light["data-free"])
