"""SHA-256 binding of encodings / QDQ model / prepared model to the float model (converter.binding), the stale
``<name>.prepared.onnx`` case, and quantize's quality and latency summary.

The model is the bundled digits CNN (conftest's ``digits`` fixture) with the bundled calibration digits; CLE is
what writes ``<name>.prepared.onnx`` (it rescales the Conv weights, so the encodings only fit the prepared model).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converter import QuantConfig, quantize
from converter.cli import main
from converter.errors import EncodingsError, ModelError
from converter.encodings_file import apply_encodings
from converter.verify import verify

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "calib_data" / "digits"


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def outputs_cosine(a: Path | onnx.ModelProto, b: Path | onnx.ModelProto, x: np.ndarray) -> float:
    def run(m):
        data = m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m)
        s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})[0].reshape(len(x), -1)
    fa, fb = run(a), run(b)
    return float(np.mean((fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))))


@pytest.fixture()
def model(digits, tmp_path):
    path = tmp_path / "digits.onnx"
    shutil.copy(digits["path"], path)
    return path


def test_report_binds_every_file_by_sha256(model, tmp_path):
    res = quantize(model, CALIB, QuantConfig(cle=True), tmp_path / "out", name="d")
    b = json.loads(res.report_path.read_text())["binding"]
    assert b["float_model"] == {"path": str(model), "sha256": sha(model)}
    assert res.prepared_path == tmp_path / "out" / "d.prepared.onnx" and res.prepared_path.is_file()
    assert b["prepared_model"]["sha256"] == sha(res.prepared_path)
    assert b["encodings"]["sha256"] == sha(res.encodings_path)
    assert b["qdq_model"]["sha256"] == sha(res.model_path)
    # the encodings files carry no key of ours, in any of the three AIMET versions: the report is the binding
    sections = {"1.0.0": {"version", "activation_encodings", "param_encodings", "quantizer_args"},
                "0.6.1": {"version", "activation_encodings", "param_encodings", "quantizer_args"},
                "2.0.0": {"version", "encodings"}}
    assert set(json.loads(res.encodings_path.read_text())) == sections["1.0.0"]
    for version in ("0.6.1", "2.0.0"):
        r = quantize(model, CALIB, QuantConfig(encodings_version=version), tmp_path / version, name="d")
        assert set(json.loads(r.encodings_path.read_text())) == sections[version]
        assert json.loads(r.report_path.read_text())["binding"]["encodings"]["sha256"] == sha(r.encodings_path)


def test_stale_prepared_model_is_removed_and_refused(tmp_path, capsys):
    """The issue's case: quantize --cle writes <name>.prepared.onnx; a plain re-quantize into the same folder used
    to leave it, and apply-encodings of it with the new encodings gave a wrong model with exit 0. A MobileNet-style
    block with BatchNorm scales 0.02..50 per channel, per-tensor weights: CLE rescales its channels a lot."""
    import torch

    from converter import export_torch

    from .test_cle import DepthwiseNet

    model = tmp_path / "dw.onnx"
    export_torch(DepthwiseNet(torch.nn.ReLU).eval(), torch.zeros(1, 3, 8, 8), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    x = np.random.default_rng(0).normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    for i in range(0, 64, 16):
        np.save(calib / f"{i:03d}.npy", x[i:i + 16])
    out = tmp_path / "out"
    first = quantize(model, calib, QuantConfig(cle=True, per_channel=False), out, name="d")
    old_prepared = tmp_path / "old.prepared.copy"
    shutil.copy(first.prepared_path, old_prepared)
    # no technique that changes the float model this time (the default fast bias correction corrects depthwise Convs)
    second = quantize(model, calib, QuantConfig(per_channel=False, fast_bias_correction=False), out, name="d")
    assert second.prepared_path is None and not (out / "d.prepared.onnx").exists()
    report = json.loads(second.report_path.read_text())
    assert report["binding"]["prepared_model"] is None
    assert report["binding"]["removed_stale_prepared_model"] == str(out / "d.prepared.onnx")
    assert "float_model" not in report["outputs"]

    # the old file put back (a copy, a sync tool): what applying it unchecked gives, then every command refuses it
    shutil.copy(old_prepared, out / "d.prepared.onnx")
    from converter.graph.model_io import load_model
    from converter.graph.passes import preprocess
    from converter.encodings_file import encodings_for_model
    from converter.quant.control_flow import render_control_flow
    from converter.quant.encodings_io import read_encodings
    stale = load_model(out / "d.prepared.onnx")
    preprocess(stale)
    unchecked = render_control_flow(stale, encodings_for_model(stale, read_encodings(second.encodings_path), "x"))
    good_cos, stale_cos = outputs_cosine(model, second.model_path, x), outputs_cosine(model, unchecked, x)
    assert good_cos > 0.98 and stale_cos < good_cos - 0.05, (good_cos, stale_cos)

    code, stdout, err = run_cli(capsys, "apply-encodings", out / "d.prepared.onnx", second.encodings_path,
                                "-o", tmp_path / "applied.onnx")
    assert code == 2 and not (tmp_path / "applied.onnx").exists()
    assert "d.prepared.onnx is stale" in err and f"use the float model {model}" in err and "Traceback" not in err
    with pytest.raises(ModelError, match="stale"):
        verify(out / "d.prepared.onnx", second.model_path, [{"input": x[:8]}])
    from converter.analysis.analyzer import analyze
    with pytest.raises(ModelError, match="stale"):
        analyze(out / "d.prepared.onnx", calib, output_dir=tmp_path / "an")
    assert not (tmp_path / "an").exists()
    # the right model applies, to the bytes quantize wrote
    code, stdout, err = run_cli(capsys, "apply-encodings", model, second.encodings_path, "-o", tmp_path / "ok.onnx")
    assert code == 0, err
    assert (tmp_path / "ok.onnx").read_bytes() == second.model_path.read_bytes()


def test_encodings_refuse_another_model(model, digits, tmp_path, capsys):
    """CLE encodings need the prepared model: the original is refused (naming the prepared file), and so is any
    other model; the prepared model applies. Encodings without a report (another tool's) apply unchecked."""
    out = tmp_path / "out"
    res = quantize(model, CALIB, QuantConfig(cle=True), out, name="d")
    with pytest.raises(EncodingsError) as info:
        apply_encodings(model, res.encodings_path, tmp_path / "a.onnx")
    assert "is the original float model" in info.value.message and str(res.prepared_path) in info.value.fix
    assert not (tmp_path / "a.onnx").exists()

    other = tmp_path / "other.onnx"  # same graph, one weight changed: same tensor names, another model
    m = onnx.load(str(model))
    w = next(t for t in m.graph.initializer if len(t.dims) == 4)
    arr = onnx.numpy_helper.to_array(w) * 1.5
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(other))
    code, _, err = run_cli(capsys, "apply-encodings", other, res.encodings_path, "-o", tmp_path / "b.onnx")
    assert code == 2 and "were made for" in err and str(res.prepared_path) in err and "differs" in err
    assert not (tmp_path / "b.onnx").exists()

    apply_encodings(res.prepared_path, res.encodings_path, tmp_path / "c.onnx")
    assert (tmp_path / "c.onnx").read_bytes() == res.model_path.read_bytes()

    # moved away from its report (or another tool's file): no binding to check, applied as before
    loose = tmp_path / "loose.encodings"
    shutil.copy(res.encodings_path, loose)
    apply_encodings(res.prepared_path, loose, tmp_path / "d.onnx")
    # a hand-edited encodings file: the report no longer describes it, so it is not checked against it either
    edited = out / "d.encodings"
    edited.write_text(edited.read_text().replace('"version": "1.0.0"', '"version":  "1.0.0"'))
    apply_encodings(other, edited, tmp_path / "e.onnx")


def test_verify_refuses_a_float_model_the_qdq_was_not_made_from(model, digits, tmp_path, capsys):
    out = tmp_path / "out"
    res = quantize(model, CALIB, QuantConfig(cle=True), out, name="d")
    x = digits["x_test"][:32]
    other = tmp_path / "other.onnx"
    m = onnx.load(str(model))
    w = next(t for t in m.graph.initializer if len(t.dims) == 4)
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 2, w.name))
    onnx.save(m, str(other))
    with pytest.raises(ModelError) as info:
        verify(other, res.model_path, [{"input": x}])
    assert "was quantized from" in info.value.message and str(model) in info.value.fix
    # the original float model and the prepared one both pass the binding (their outputs agree)
    for float_model in (model, res.prepared_path):
        assert verify(float_model, res.model_path, [{"input": x}]).metrics["samples"] == 32


def test_verify_swapped_models_are_refused_and_same_file_warned(model, digits, tmp_path, capsys, caplog):
    res = quantize(model, CALIB, QuantConfig(), tmp_path / "out", name="d")
    data = tmp_path / "eval"
    data.mkdir()
    np.save(data / "x.npy", digits["x_test"][:40])
    code, out, err = run_cli(capsys, "verify", res.model_path, model, "--data", data)
    assert code == 2 and "the models look swapped" in err and "pass the float model first" in err
    assert "Traceback" not in err
    with caplog.at_level("WARNING", logger="converter"):
        r = verify(model, model, data)
    assert "are the same file" in caplog.text and r.passed


def test_quantize_reports_quality_and_latency(model, tmp_path, capsys):
    code, out, err = run_cli(capsys, "quantize", model, "--calib", CALIB, "-o", tmp_path / "q", "--cle")
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "digits.report.json").read_text())
    q = report["quality"]
    assert q["samples"] == 32 and q["reference"] == str(model)
    o = q["outputs"]["output"]
    assert 0.999 < o["cosine_mean"] <= 1.0 and o["cosine_min"] <= o["cosine_mean"] and 25 < o["sqnr_db"] < 80
    lat = q["latency_batch1"]
    assert lat["runs"] >= 20 and lat["float"]["p10_ms"] <= lat["float"]["median_ms"] <= lat["float"]["p90_ms"]
    assert lat["too_fast_to_time"] == (lat["float"]["median_ms"] < 1.0)
    assert report["timings"]["quality_s"] < 5
    assert f"output cosine {o['cosine_mean']:.5f}" in out and "latency (ORT CPU, batch 1, median of" in out
    assert f"prepared  {tmp_path / 'q' / 'digits.prepared.onnx'}" in out


def test_quantize_warns_when_its_model_is_far_from_fp32(model, tmp_path, capsys, caplog):
    """A plain quantize has no accuracy target, but an output cosine under verify's 0.99 on its own calibration
    samples is said once, loudly, with where to look (exit 0: nothing was asked of it). The model: a Gemm whose
    output reads only the inputs that one huge input column drowns in the shared 8-bit input scale."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (8, 4)).astype(np.float32)
    w[0] = 0.0  # the huge column sets the input's range and contributes nothing
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "drowned",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w, "w")])
    drowned = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(0, 0.01, (64, 8)).astype(np.float32)
    x[:, 0] = rng.choice([-1000.0, 1000.0], 64)
    with caplog.at_level("WARNING", logger="converter"):
        r = quantize(drowned, [{"x": x}], QuantConfig(), tmp_path / "far", name="m")
    far = [m.getMessage() for m in caplog.records if "far from FP32" in m.getMessage()]
    cos = r.report["quality"]["outputs"]["y"]["cosine_mean"]
    assert cos < 0.9 and len(far) == 1 and f"cosine {cos:.4f}" in far[0] and "qconvert analyze" in far[0], far
    caplog.clear()
    with caplog.at_level("WARNING", logger="converter"):
        r = quantize(model, CALIB, QuantConfig(), tmp_path / "near", name="d")
    assert r.report["quality"]["outputs"]["output"]["cosine_mean"] > 0.999
    assert not [m for m in caplog.records if "far from FP32" in m.getMessage()]
