"""``qconvert verify`` / :func:`converter.verify.verify`: float vs quantized on real data.

The model is the bundled digits CNN (models/digits_cnn.py, conftest's ``digits`` fixture),
quantized with the bundled calibration digits and checked on the 597 held-out digits with labels.
The bad models are real failure modes: activation ranges calibrated on noise x1000, and one weight
scale corrupted in the QDQ file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from converter import QuantConfig, quantize
from converter.cli import main
from converter.errors import CalibrationDataError, ModelError
from converter.calib.readers import load_labels
from converter.verify import Thresholds, format_report, verify

ROOT = Path(__file__).resolve().parents[1]


def make_digits_assets(digits: dict, base: Path) -> dict[str, Path]:
    """From conftest's ``digits`` fixture: held-out data in 6 .npy batches + labels, a good QDQ model."""
    x, y = digits["x_test"], digits["y_test"]
    eval_dir = base / "eval"
    eval_dir.mkdir()
    for i in range(0, len(x), 100):
        np.save(eval_dir / f"{i // 100:03d}.npy", x[i:i + 100])
    np.save(base / "labels.npy", y)
    (base / "labels.txt").write_text("\n".join(map(str, y)) + "\n")
    good = quantize(digits["path"], ROOT / "calib_data" / "digits", QuantConfig(), base / "good", name="digits")
    return {"float": digits["path"], "eval": eval_dir, "labels": base / "labels.npy", "labels_txt": base / "labels.txt",
            "good": good.model_path, "y": y}


@pytest.fixture(scope="module")
def assets(digits, tmp_path_factory):
    return make_digits_assets(digits, tmp_path_factory.mktemp("verify"))


@pytest.fixture(scope="module")
def noise_model(assets, tmp_path_factory):
    """Same float model, activation ranges calibrated on Gaussian noise x1000."""
    base = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(base / f"{i}.npy", (rng.standard_normal((1, 8, 8)) * 1000).astype(np.float32))
    return quantize(assets["float"], base, QuantConfig(), base / "out", name="noisy").model_path


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["verify", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_good_model_passes_with_default_thresholds(assets, tmp_path, capsys):
    report = tmp_path / "reports" / "verify.json"
    code, out, _ = _cli(capsys, assets["float"], assets["good"], "--data", assets["eval"], "--labels",
                        assets["labels"], "--json", report)
    assert code == 0
    assert out.rstrip().splitlines()[-1] == "PASSED"
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["summary"] == "PASSED"
    assert data["samples"] == 597 and data["batches"] == 38  # 597 samples in batches of 16
    o = data["outputs"]["output"]
    assert o["classifier"] and o["shape"] == ["N", 10]
    assert o["cosine_mean"] > 0.999 and o["cosine_min"] > 0.98 and o["sqnr_db"] > 20
    assert o["top1_agreement"] >= 0.99
    acc = data["accuracy"]
    assert acc["float"] > 0.93 and abs(acc["top1_drop"]) <= 0.01
    assert math.isclose(acc["float"] - acc["quant"], acc["top1_drop"])
    lat = data["latency"]
    assert lat["runs"] >= 20 and lat["batch_size"] == 16 and lat["quant"]["median_ms"] > 0
    assert lat["float"]["p10_ms"] <= lat["float"]["median_ms"] <= lat["float"]["p90_ms"]
    assert (lat["ratio"] is None) == lat["too_fast_to_time"]
    # with labels the accuracy drop gates; agreement is reported (the table, the note), not gated
    names = {c["name"]: c for c in data["checks"]}
    assert set(names) == {"cosine[output]", "top1_drop"}
    assert data["thresholds"]["min_agreement"] is None
    assert all(c["passed"] and c["applicable"] for c in names.values())
    for needle in ("cos mean", "SQNR dB", "top-1 agree", "accuracy on 597 labels", "latency per batch of 16",
                   "is reported, not gated"):
        assert needle in out


def test_noise_calibrated_model_fails_with_exit_1(assets, noise_model, tmp_path, capsys):
    report = tmp_path / "bad.json"
    code, out, _ = _cli(capsys, assets["float"], noise_model, "--data", assets["eval"], "--labels",
                        assets["labels_txt"], "--json", report)
    assert code == 1
    verdict = out.rstrip().splitlines()[-1]
    assert verdict.startswith("FAILED: cosine[output] ") and "< 0.9900" in verdict and "top1_drop" in verdict
    data = json.loads(report.read_text())
    assert data["passed"] is False
    assert data["outputs"]["output"]["cosine_mean"] < 0.5
    assert data["accuracy"]["quant"] < 0.5 < data["accuracy"]["float"]


def test_corrupted_weight_scale_is_caught(assets):
    """Multiply the first Conv's weight scales by 30 in an otherwise good QDQ model."""
    model = onnx.load(str(assets["good"]))
    inits = {t.name: t for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv.input[1])
    scale = inits[dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 30, scale.name))
    result = verify(assets["float"], model, assets["eval"], labels=assets["y"])
    assert not result.passed
    failed = [c.name for c in result.checks if not c.passed]
    assert failed == ["cosine[output]", "top1_drop"]  # with labels the drop gates, not the agreement
    assert result.metrics["outputs"]["output"]["top1_agreement"] < 0.99
    assert any("qconvert analyze" in s for s in result.next_steps)
    assert result.metrics["outputs"]["output"]["cosine_mean"] < 0.99
    assert result.to_dict()["summary"].startswith("FAILED: ")


def test_thresholds_select_what_fails(assets, noise_model, capsys):
    code, out, _ = _cli(capsys, assets["float"], assets["good"], "--data", assets["eval"], "--min-sqnr", "200")
    assert code == 1
    verdict = out.rstrip().splitlines()[-1]
    assert verdict.startswith("FAILED: sqnr_db[output] ") and verdict.endswith("< 200.0000")
    assert "top1_drop n/a" in out  # default max-top1-drop without labels: not applicable, not failed
    # every check disabled or loosened: even the noise-calibrated model passes
    code, out, _ = _cli(capsys, assets["float"], noise_model, "--data", assets["eval"], "--labels", assets["labels"],
                        "--min-cosine", "none", "--min-agreement", "0", "--max-top1-drop", "1")
    assert code == 0 and out.rstrip().endswith("PASSED")


def test_labels_from_text_and_array_and_max_samples(assets):
    a = verify(assets["float"], assets["good"], assets["eval"], labels=assets["labels_txt"], max_samples=100,
               batch_size=32, thresholds=Thresholds(min_agreement=None))
    b = verify(assets["float"], assets["good"], assets["eval"], labels=assets["y"][:100], max_samples=100,
               batch_size=32, thresholds=Thresholds(min_agreement=None))
    assert a.metrics["samples"] == 100 and a.metrics["batches"] == 4
    assert a.metrics["accuracy"] == {**b.metrics["accuracy"], "labels": str(assets["labels_txt"])}
    assert [c.name for c in a.checks] == ["cosine[output]", "top1_drop"]
    assert np.array_equal(load_labels(assets["labels_txt"]), load_labels(assets["labels"]))


def test_works_on_onnxruntime_quantize_static_output(assets, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            files = sorted((ROOT / "calib_data" / "digits").glob("*.npy"))
            self.items = iter([{"input": np.load(p)[None]} for p in files])

        def get_next(self):
            return next(self.items, None)

    out = tmp_path / "ort_qdq.onnx"
    quantize_static(str(assets["float"]), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    result = verify(assets["float"], out, assets["eval"], labels=assets["labels"])
    assert result.passed, result.summary
    assert result.metrics["outputs"]["output"]["cosine_mean"] > 0.999


def test_user_errors_exit_2(assets, tmp_path, capsys):
    short = tmp_path / "short.npy"
    np.save(short, assets["y"][:10])
    code, _, err = _cli(capsys, assets["float"], assets["good"], "--data", assets["eval"], "--labels", short)
    assert code == 2 and "10 labels for the 597 samples" in err and "fix:" in err
    code, _, err = _cli(capsys, assets["float"], assets["good"], "--data", assets["eval"], "--max-top1-drop", "0.02")
    assert code == 2 and "--max-top1-drop needs --labels" in err
    code, _, err = _cli(capsys, assets["float"], tmp_path / "missing.onnx", "--data", assets["eval"])
    assert code == 2 and "model file not found" in err
    with pytest.raises(CalibrationDataError, match="must be an integer"):
        (tmp_path / "bad.txt").write_text("cat\ndog\n")
        load_labels(tmp_path / "bad.txt")


TWO_OUTPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 4] x) => (float[N, 2, 4] y, float[N] s) {
    y = Relu(x)
    axes = Constant<value = int64[2] {1, 2}>()
    s = ReduceSum<keepdims = 0>(x, axes)
}
"""

TWO_OUTPUTS_QDQ = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 4] x) => (float[N, 2, 4] y, float[N] s)
  <float sc = {0.05}, uint8 zp = {128}> {
    q = QuantizeLinear(x, sc, zp)
    xd = DequantizeLinear(q, sc, zp)
    y = Relu(xd)
    axes = Constant<value = int64[2] {1, 2}>()
    s = ReduceSum<keepdims = 0>(x, axes)
}
"""


def test_non_classifier_outputs_and_identical_output(tmp_path):
    """Rank-3 and rank-1 outputs: no top-1 agreement (reported n/a); an untouched output is identical."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    np.save(data / "a.npy", rng.uniform(-3, 3, (20, 2, 4)).astype(np.float32))
    f = onnx.parser.parse_model(TWO_OUTPUTS)
    q = onnx.parser.parse_model(TWO_OUTPUTS_QDQ)
    result = verify(f, q, data, thresholds=Thresholds(min_sqnr=20.0))
    y, s = result.metrics["outputs"]["y"], result.metrics["outputs"]["s"]
    assert not y["classifier"] and y["top1_agreement"] is None and y["shape"] == ["N", 2, 4]
    assert 0.999 < y["cosine_mean"] < 1.0 and 0 < y["max_abs_error"] <= 0.025 + 1e-6  # half a quantization step
    assert s["identical"] and s["sqnr_db"] is None and s["max_abs_error"] == 0.0 and s["cosine_min"] == 1.0
    agreement = next(c for c in result.checks if c.name == "top1_agreement")
    assert not agreement.applicable and agreement.passed
    assert result.passed, result.summary
    json.dumps(result.to_dict(), allow_nan=False)  # infinite SQNR is written as null, not Infinity
    row_s = next(ln for ln in format_report(result).splitlines() if ln.startswith("s "))
    assert row_s.split()[1:] == ["[N]", "1.00000", "1.00000", "inf", "0", "-"]


def test_models_must_have_the_same_interface(assets, tmp_path):
    with pytest.raises(ModelError, match="do not have the same inputs/outputs"):
        verify(assets["float"], onnx.parser.parse_model(TWO_OUTPUTS), assets["eval"])


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="fc")], "fc",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", w.shape[1]])],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_agreement_0985_with_labels_passes_and_says_why(tmp_path, capsys):
    """EfficientNet-Lite0's case: top-1 drop 0.5 point, agreement 0.985. Two 10-class models on 200 samples:
    the "quantized" one adds 0.1 x logit 1 to logit 0, which flips exactly the 3 samples whose two top logits are
    1.00 vs 1.02 (agreement 197/200). Labels make it cost 1 sample (float right, quantized wrong: 2; the other way
    round: 1): drop 0.5 point. With labels the default gate passes and the output says agreement is not gated;
    without labels agreement 0.985 < 0.99 still fails, and a failure prints the next step with the user's paths."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.5, (200, 10)).astype(np.float32)
    cls = rng.integers(0, 10, 200)
    x[np.arange(200), cls] = 5.0
    x[:3] = 0.0
    x[:3, 0], x[:3, 1] = 1.0, 1.02  # float picks 1, the perturbed model picks 0
    w_q = np.eye(10)
    w_q[1, 0] = 0.1
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "x.npy", x)
    labels = np.where(np.arange(200) < 3, [1, 1, 0] + [0] * 197, x.argmax(1))
    np.save(tmp_path / "labels.npy", labels)
    onnx.save(_matmul_model(np.eye(10)), str(tmp_path / "float.onnx"))
    onnx.save(_matmul_model(w_q), str(tmp_path / "quant.onnx"))

    code, out, _ = _cli(capsys, tmp_path / "float.onnx", tmp_path / "quant.onnx", "--data", tmp_path / "data",
                        "--labels", tmp_path / "labels.npy", "--json", tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["outputs"]["logits"]["top1_agreement"] == pytest.approx(0.985)
    assert data["accuracy"]["top1_drop"] == pytest.approx(0.005)
    # paired: 2 lost, 1 gained of 200; standard error sqrt(3 - 1/200) / 200 = 0.008653
    acc = data["accuracy"]
    assert (acc["lost"], acc["gained"]) == (2, 1)
    assert acc["top1_drop_ci95"] == pytest.approx([0.005 - 1.96 * 0.0086530, 0.005 + 1.96 * 0.0086530], abs=1e-6)
    assert "top-1 drop +0.50 pt (95% interval -1.20 to +2.20 pt: 2 lost, 1 gained)" in out
    assert "the limit (1 pt) lies inside the top-1 drop's 95% interval (-1.20 to +2.20 pt; 2 sample(s) lost, 1 " \
           "gained, of 200)" in out
    assert code == 0 and out.rstrip().endswith("PASSED")
    assert "top-1 agreement 0.9850 is reported, not gated: with labels the gate is the accuracy drop (+0.50 pt, " \
           "limit 1 pt)" in out
    assert data["notes"] and not data["next_steps"]

    code, out, _ = _cli(capsys, tmp_path / "float.onnx", tmp_path / "quant.onnx", "--data", tmp_path / "data")
    assert code == 1 and "top1_agreement[logits] 0.9850 < 0.9900" in out
    assert f"qconvert analyze {tmp_path / 'float.onnx'} --calib CALIB_DIR --eval {tmp_path / 'data'}" in out
    assert f"--target-metric agreement --eval {tmp_path / 'data'}" in out
    # an explicit --min-agreement gates it with labels too
    code, out, _ = _cli(capsys, tmp_path / "float.onnx", tmp_path / "quant.onnx", "--data", tmp_path / "data",
                        "--labels", tmp_path / "labels.npy", "--min-agreement", "0.99")
    assert code == 1 and "--labels" in out.split("next:")[1]


def test_latency_of_a_model_against_itself_is_a_ratio_near_1(tmp_path):
    """Three 3x3 convolutions on 16 x 48 x 48 (a few ms a batch): verified against itself, the median ratio is
    within 20% of 1 (means of single runs gave x0.14 .. x11.8 on such a run). A tiny model is "too fast to time"."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"y{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 48, 48])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 16, 48, 48])], inits)
    path = tmp_path / "convs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    data = [{"x": rng.normal(0, 1, (4, 16, 48, 48)).astype(np.float32)} for _ in range(2)]
    r = verify(path, path, data, batch_size=4, threads=1)
    lat = r.metrics["latency"]
    assert lat["float"]["median_ms"] > 1.0 and not lat["too_fast_to_time"]
    assert 0.8 <= lat["ratio"] <= 1.2, lat
    assert f"quantized/float x{lat['ratio']:.2f}" in format_report(r)

    tiny = tmp_path / "tiny.onnx"
    onnx.save(_matmul_model(np.eye(4)), str(tiny))
    r = verify(tiny, tiny, [{"x": np.ones((2, 4), np.float32)}])
    assert r.metrics["latency"]["too_fast_to_time"] and r.metrics["latency"]["ratio"] is None
    assert "too fast to time (under 1 ms): no ratio" in format_report(r)
