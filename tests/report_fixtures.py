"""Hand-built ScanResult objects with realistic values, for the report and gate tests.

Modelled on the sample zoo's cnn_badnets model: 10 classes, NCHW 1x28x28 input, four ReLU
layers with 416 channels in all, a 3x3 BadNets patch in the bottom-right corner, target 3.
"""

from __future__ import annotations

import numpy as np

from scanner.findings import (
    ChannelValue,
    ClassReverse,
    Detection,
    Finding,
    LayerInfo,
    ModelSummary,
    Repair,
    ScanResult,
    Severity,
    Verdict,
)
from scanner.policy import RepairPolicy
from scanner.wording import target_missed

LAYERS = [
    LayerInfo("/features/relu1/Relu_output_0", "Relu", "/features/relu1/Relu", 32, 4),
    LayerInfo("/features/relu2/Relu_output_0", "Relu", "/features/relu2/Relu", 64, 4),
    LayerInfo("/features/relu3/Relu_output_0", "Relu", "/features/relu3/Relu", 128, 4),
    LayerInfo("/classifier/relu/Relu_output_0", "Relu", "/classifier/relu/Relu", 192, 2),
]
# Reversed mask L1 norms: honest classes need 40-70 pixels, the backdoor target about 9.
MASK_L1 = [52.3, 61.8, 47.1, 9.4, 58.0, 66.2, 44.9, 55.5, 49.7, 63.1]


def anomaly_indices(norms: list[float]) -> list[float]:
    arr = np.asarray(norms)
    median = np.median(arr)
    mad = np.median(np.abs(arr - median))
    return list((median - arr) / (1.4826 * mad))


def model_summary(path: str = "samples/models/cnn_badnets.onnx",
                  layers: list[LayerInfo] | None = None) -> ModelSummary:
    return ModelSummary(
        path=path, sha256="9f2c4e7a1b0d83f6c5e2a9174b3d6e80f1a2c3d4e5f60718293a4b5c6d7e8f90",
        opset=17, inputs=[("input", ["N", 1, 28, 28])], outputs=[("logits", ["N", 10])],
        layers=list(LAYERS if layers is None else layers), size_bytes=1_273_416)


def detection(target: int = 3, seed: int = 0) -> Detection:
    rng = np.random.default_rng(seed)
    indices = anomaly_indices(MASK_L1)
    classes = [ClassReverse(target=t, mask_l1=l1, anomaly_index=float(a),
                            reversed_asr=1.0 if t == target else float(rng.uniform(0.55, 0.95)),
                            flagged=bool(a > 2.0))
               for t, (l1, a) in enumerate(zip(MASK_L1, indices, strict=True))]
    mask = rng.uniform(0.0, 0.08, size=(28, 28))
    mask[24:27, 24:27] = rng.uniform(0.85, 1.0, size=(3, 3))
    pattern = rng.uniform(0.0, 1.0, size=(1, 28, 28))
    pattern[:, 24:27, 24:27] = 1.0
    clean = np.zeros((1, 28, 28))
    clean[:, 6:22, 12:16] = 0.9  # a crude "1"
    example = (1 - mask) * clean + mask * pattern
    return Detection(classes=classes, flagged_targets=[c.target for c in classes if c.flagged],
                     threshold=2.0, data_free=False, masks={target: mask},
                     patterns={target: pattern}, examples={target: example},
                     forward_passes=18_400, views={"few-shot": 1.6})


def repair(target: int = 3) -> Repair:
    top = [ChannelValue(LAYERS[2].name, 77, 0.412, 0.004, True),
           ChannelValue(LAYERS[2].name, 5, 0.287, 0.011, True),
           ChannelValue(LAYERS[1].name, 41, 0.173, 0.002, True),
           ChannelValue(LAYERS[3].name, 150, 0.094, 0.006, True),
           ChannelValue(LAYERS[2].name, 101, 0.051, 0.038, False),
           ChannelValue(LAYERS[0].name, 12, 0.022, 0.061, False),
           ChannelValue(LAYERS[3].name, 9, 0.013, 0.002, False),
           ChannelValue(LAYERS[1].name, 3, -0.008, 0.015, False)]
    return Repair(target=target, channels_total=416, pruned=[c for c in top if c.pruned],
                  top_channels=top, reversed_asr_before=1.0, reversed_asr_after=0.0,
                  fewshot_acc_before=1.0, fewshot_acc_after=1.0, permutations=40,
                  forward_passes=2_960, estimator="eps-greedy",
                  output_path="out/cnn_badnets.safe.onnx", target_probability_before=0.97,
                  target_probability_after=0.002,
                  given_back=[ChannelValue(LAYERS[1].name, 17, 0.031, 0.044, False)])


def backdoor_result() -> ScanResult:
    det = detection()
    rep = repair()
    findings = [
        Finding("SS201", Severity.CRITICAL,
                f"class 3 is reachable with a trigger of 9.4 pixels (anomaly index "
                f"{det.classes[3].anomaly_index:.2f} > 2.0); "
                "reversed trigger success 100%", "logits",
                {"target": 3, "anomaly_index": det.classes[3].anomaly_index,
                 "mask_l1": 9.4, "reversed_asr": 1.0}),
        Finding("SS301", Severity.INFO, "repaired model written with 4 of 416 channels zeroed",
                None, {"output_path": rep.output_path, "channels": np.array([77, 5, 41, 150])}),
    ]
    return ScanResult(model_path="samples/models/cnn_badnets.onnx", verdict=Verdict.BACKDOOR,
                      findings=findings, model=model_summary(), detection=det, repair=rep,
                      device="cpu", seed=0, tool_version="0.1.0",
                      timings={"load": 0.04, "reverse": 11.82, "detect": 0.01,
                               "shapley": 7.35, "prune": 0.62, "export": 0.09})


def clean_result(path: str = "samples/models/cnn_clean.onnx") -> ScanResult:
    det = detection()
    norms = [*MASK_L1[:3], 51.0, *MASK_L1[4:]]
    for c, l1, a in zip(det.classes, norms, anomaly_indices(norms), strict=True):
        c.mask_l1, c.anomaly_index, c.flagged = l1, float(a), False
        c.reversed_asr = min(c.reversed_asr, 0.9)
    det.flagged_targets = []
    det.masks, det.patterns, det.examples = {}, {}, {}
    det.views = {"few-shot": 0.62, "synthesised": 0.71}  # both views looked: clean
    return ScanResult(model_path=path, verdict=Verdict.CLEAN, model=model_summary(path),
                      detection=det, timings={"load": 0.03, "reverse": 12.1, "detect": 0.01})


def suspicious_result() -> ScanResult:
    """Clean verdict with an SS202 (MEDIUM) finding: fails only a MEDIUM gate."""
    result = clean_result("samples/models/cnn_blend.onnx")
    result.findings.append(Finding("SS202", Severity.MEDIUM, "class 6: anomaly index 1.7 "
                                   "above the warning level 1.5", None, {"target": 6}))
    return result


def error_result() -> ScanResult:
    return ScanResult(model_path="incoming/vendor.onnx", verdict=Verdict.ERROR,
                      findings=[Finding("SS102", Severity.CRITICAL,
                                        "operator domain 'com.evil' is not allowed",
                                        "CustomDecode_0", {"domain": "com.evil"})],
                      errors=["model refused: operator domain 'com.evil' is not allowed "
                              "(node CustomDecode_0)"])


def inconclusive_result() -> ScanResult:
    return ScanResult(model_path="samples/models/linear.onnx", verdict=Verdict.INCONCLUSIVE,
                      findings=[Finding("SS204", Severity.LOW,
                                        "no activation layers with channels found")],
                      model=model_summary("samples/models/linear.onnx", layers=[]),
                      skipped=["behavioural scan: no activation layers"])


# cnn_badnets scanned with its 10 few-shot images (seed 0): class 0 is flagged by the patch
# test (patch index 3.32, 2.06 robust σ from the next class) while its combined index, the
# bar the chart draws, is 2.28, under the 2.5 threshold. (target, mask L1, combined, patch
# index, patch isolation, full-image index, warp index)
ISOLATION_CLASSES = [
    (0, 5.8, 2.28, 3.32, 2.06, 1.24, 1.34), (1, 35.8, 0.04, 0.05, 0.0, 0.03, -1.47),
    (2, 37.7, 0.18, -0.05, 0.0, 0.40, -0.91), (3, 52.0, -0.54, -0.63, 0.0, -0.46, 0.27),
    (4, 30.0, 0.57, 0.36, 0.0, 0.78, -1.01), (5, 49.5, -0.75, -0.54, 0.0, -0.95, 0.32),
    (6, 18.2, 1.17, 1.26, 0.0, 1.09, -0.69), (7, 69.4, -1.32, -1.14, 0.0, -1.50, -0.27),
    (8, 24.1, 0.36, 0.75, 0.0, -0.03, 0.40), (9, 54.9, -0.65, -0.72, 0.0, -0.57, 0.66)]


def _stamp_rows(rep: Repair, images: str = "few-shot") -> Repair:
    """The rows a real scan of a 10-class model measures the repair on (scanner/repair.py)."""
    rep.inputs, rep.trigger_gain = images, 2.0
    rep.stamped_images, rep.stamped_copies, rep.clean_images, rep.clean_copies = 9, 4, 10, 8
    return rep


def isolation_flagged_result() -> ScanResult:
    result = backdoor_result()
    det = result.detection
    det.classes = [ClassReverse(target=t, mask_l1=l1, anomaly_index=a, reversed_asr=1.0,
                                patch_anomaly_index=p, patch_isolation=iso,
                                universal_anomaly_index=u, warp_anomaly_index=w,
                                flagged=t == 0)
                   for t, l1, a, p, iso, u, w in ISOLATION_CLASSES]
    det.flagged_targets, det.threshold, det.reasons = [0], 2.5, {0: "patch"}
    det.masks, det.patterns, det.examples = ({0: v} for v in (
        det.masks[3], det.patterns[3], det.examples[3]))
    det.views, det.forward_passes = {"few-shot": 1.66}, 32_400
    rep = _stamp_rows(repair(target=0))
    rep.reversed_asr_after, rep.target_reached = 0.044, False
    rep.target_probability_before, rep.target_probability_after = 0.946, 0.062
    rep.clean_target_probability_after = 0.004
    rep.fewshot_acc_before, rep.fewshot_acc_after = 0.9, 0.989
    result.repair = rep
    result.findings = [
        Finding("SS201", Severity.CRITICAL, "backdoor towards class 0: a patch-like reversed "
                "trigger flips 100% of the 9 few-shot images of other classes it was reversed "
                "on (patch anomaly index 3.32 > 2, 2.06 robust σ from the next class ≥ 1)",
                "class 0", {"target": 0, "test": "patch"}),
        Finding("SS302", Severity.HIGH, target_missed(rep, RepairPolicy()), "class 0")]
    return result


def data_free_result() -> ScanResult:
    """A data-free scan: every image the scan measured on was synthesised from the model."""
    result = backdoor_result()
    det = result.detection
    det.data_free, det.bn_layers_matched, det.views = True, 4, {"synthesised": 2.31}
    det.reasons = {3: "combined"}
    result.repair = _stamp_rows(result.repair, "synthesised")
    result.findings[-1] = (Finding(
        "SS301", Severity.INFO, "zeroed 4 of 416 channels (0.96%); reversed trigger success "
        "100% -> 0%; data-free: clean behaviour was only checked on synthesised inputs, "
        "measure the repaired model's accuracy on real data before deploying it", "class 3"))
    return result
