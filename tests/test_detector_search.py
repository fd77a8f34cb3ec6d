"""Fallback search on a YOLO-style detector whose head Concat joins boxes (0..320) and scores (0..1).

models/digits_detector.py: 11 Conv layers, one ``Concat([boxes, probs])`` output. With scale-group
splitting (the default) the search meets a 1% target on thresholded class-score agreement with (at
most) one compute layer in float, and the class scores keep their 8-bit resolution; without it
(``max_shared_scale_loss_bits=None``) the Concat's shared encoding spans 0..320 and every score
collapses onto a step of ~1.26 (0 or 1.26).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converter import QuantConfig
from converter.search import AccuracyTarget, TargetNotMetError, auto_quantize

from .conftest import load_models_module

COMPUTE_OPS = {"Conv", "Gemm", "MatMul"}


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    import torch

    from converter import export_torch

    mod = load_models_module("digits_detector")
    model = mod.build()
    path = tmp_path_factory.mktemp("detector") / "detector.onnx"
    export_torch(model, torch.zeros(mod.INPUT_SHAPE), path)
    x_cal, _ = mod.make_data(64, seed=10)
    x_eval, _ = mod.make_data(200, seed=11)
    calib = [{mod.INPUT_NAME: x_cal[i:i + 16]} for i in range(0, len(x_cal), 16)]
    return {"mod": mod, "path": path, "calib": calib, "evaluate": mod.ScoreAgreement(str(path), x_eval)}


def _search(detector, tmp_path, config: QuantConfig) -> tuple[dict, np.ndarray]:
    evaluate = detector["evaluate"]
    try:
        res = auto_quantize(str(detector["path"]), detector["calib"], evaluate, AccuracyTarget(max_drop=0.01),
                            config, output_dir=tmp_path, name="det", latency=False)
        report, model_path = res.report, res.model_path
    except TargetNotMetError:
        report = json.loads((tmp_path / "det.report.json").read_text())
        model_path = tmp_path / "det.onnx"
    return report, evaluate.outputs(str(model_path))


def test_detector_float_model_is_a_detector(detector):
    mod = detector["mod"]
    ref = detector["evaluate"].reference
    assert ref.shape == (200, 16, 15)
    assert ref[..., :4].max() > 250 and ref[..., 4:].max() <= 1.0  # boxes in pixels of 320, scores 0..1
    x, gt = mod.make_data(200, seed=11)
    assert mod.detection_accuracy(ref, gt) > 0.8
    assert len(np.unique(ref[..., 4:])) > 1000


def test_search_meets_target_int8_with_split_concat(detector, tmp_path):
    report, out = _search(detector, tmp_path, QuantConfig())
    s = report["search"]
    ref = detector["evaluate"].reference
    res = detector["mod"].score_resolution(out, ref)
    compute = [r for r in s["ranking"] if r["op_type"].split("+")[0] in COMPUTE_OPS]
    print(f"\nsplit: met {s['met']} FP32 {s['baseline_metric']:.4f} final {s['final_metric']:.4f} threshold "
          f"{s['threshold']:.4f} float {len(s['fallback_layers'])}/{len(compute)} compute layers "
          f"({s['float_fraction']:.3f}), evaluations {s['full_evaluations']}, {res}, "
          f"split {report['summary']['split_scale_groups']}")
    assert s["met"] and s["final_metric"] >= s["threshold"]
    assert len(compute) == 11
    assert s["float_fraction"] <= 0.1  # >= 90% of the Conv layers run in INT8
    split = report["summary"]["split_scale_groups"]
    assert split, "the head Concat's encoding should have been split"
    concat_nodes = [f for f in split if any("Concat" in n for n in f["float_nodes"]) or "Concat" in f["group"]
                    or any("concat" in n.lower() for n in f["float_nodes"])]
    assert concat_nodes, split
    assert split[0]["loss_bits"] > 6  # 0..1 inside 0..~300: more than 6 bits lost if shared
    # class scores keep 8-bit resolution
    assert res["distinct_scores"] > 20
    assert res["max_abs_err"] < 0.05


def test_no_split_collapses_class_scores(detector, tmp_path):
    report, out = _search(detector, tmp_path, QuantConfig(max_shared_scale_loss_bits=None))
    s = report["search"]
    res = detector["mod"].score_resolution(out, detector["evaluate"].reference)
    print(f"\nno split: met {s['met']} final {s['final_metric']:.4f} threshold {s['threshold']:.4f} "
          f"float {len(s['fallback_layers'])} layers, {res}, split {report['summary'].get('split_scale_groups')}")
    assert not report["summary"].get("split_scale_groups")
    # shared 0..~300 encoding: the scores fall on a step of ~1.2 (0 or one step), errors up to ~half a step
    assert res["distinct_scores"] <= 4
    assert res["max_abs_err"] > 0.3
