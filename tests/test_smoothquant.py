"""SmoothQuant: activation outlier channels moved into the MatMul weights; FP32 unchanged, INT8 error down."""

from __future__ import annotations

import numpy as np

from converter import QuantConfig, quantize
from converter.pipeline import prepare, smooth
from converter.quant.smoothquant import smoothquant

from .conftest import op_counts, parse, run


def outlier_model():
    """LayerNorm-like tensor with a few huge channels, read by two MatMuls (shared input) and an Add."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.4, (16, 32)).astype(np.float32)
    w0[:, [3, 17]] *= 60.0  # two outlier channels, as transformers' LayerNorm outputs have,
    w1, w2 = rng.normal(0, 0.2, (32, 24)).astype(np.float32), rng.normal(0, 0.2, (32, 24)).astype(np.float32)
    w1[[3, 17]] /= 60.0  # which the next weights damp: the information is in the other channels
    w2[[3, 17]] /= 60.0
    return prepare(parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x) => (float[N,24] a, float[N,24] b) {
      t = MatMul(x, W0)
      a = MatMul(t, W1)
      b = MatMul(t, W2)
    }""", W0=w0, W1=w1, W2=w2)).model


def batches(seed, n=6):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (16, 16)).astype(np.float32)} for _ in range(n)]


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_smoothing_keeps_fp32_and_shares_one_scale_across_readers():
    model = outlier_model()
    smoothed = parse("<ir_version: 8, opset_import: [\"\" : 17]> g (float[N,1] x) => (float[N,1] y) { y = Relu(x) }")
    smoothed.CopyFrom(model)
    [change] = smoothquant(smoothed, batches(1), ["CPUExecutionProvider"])
    assert change.tensor == "t" and sorted(change.matmuls) == ["MatMul_1", "MatMul_2"]
    assert change.error_after * 1.5 <= change.error_before and change.outlier_ratio > 20
    counts = op_counts(smoothed)
    assert counts["Mul"] == 1  # one inserted Mul before both MatMuls
    x = batches(9, 1)[0]
    for got, want in zip(run(smoothed, x), run(model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_smoothquant_lowers_int8_error_and_is_reported(tmp_path):
    model = outlier_model()
    x = batches(9, 1)[0]
    ref = np.concatenate(run(model, x), axis=1)
    on = quantize(model, batches(1), QuantConfig(), output_dir=tmp_path / "on", name="m")
    off = quantize(model, batches(1), QuantConfig(smoothquant=False), output_dir=tmp_path / "off", name="m")
    err_on = 1 - cosine(ref, np.concatenate(run(str(on.model_path), x), axis=1))
    err_off = 1 - cosine(ref, np.concatenate(run(str(off.model_path), x), axis=1))
    assert err_on * 3 < err_off, (err_on, err_off)
    [entry] = on.report["smoothquant"]
    assert entry["tensor"] == "t" and entry["alpha"] == 0.5
    assert entry["mul_node"] in on.report["summary"]["float_nodes"]  # its input (the outliers) is never quantized
    assert "t" not in on.plan.encodings and "smoothquant" not in off.report


def test_no_outliers_nothing_changes():
    rng = np.random.default_rng(0)
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x) => (float[N,8] y) {
      h = MatMul(x, W0)
      y = MatMul(h, W1)
    }""", W0=rng.normal(0, 0.4, (16, 32)).astype(np.float32), W1=rng.normal(0, 0.2, (32, 8)).astype(np.float32))
    prepared = prepare(model)
    config, changes = smooth(prepared, batches(1), QuantConfig())
    assert changes == [] and config == QuantConfig()


def test_one_shot_reader_is_read_once_and_kept_only_in_part(tmp_path):
    """SmoothQuant reads calibration samples before calibration: a get_next() reader still gives calibration
    every sample, and only the first ``keep`` items are held in memory."""
    from converter.pipeline import Replayable

    items = batches(1, n=100)
    handed = []

    class Reader:
        def __init__(self):
            self.it = iter(items)

        def get_next(self):
            item = next(self.it, None)
            if item is not None:
                handed.append(1)
            return item

    res = quantize(outlier_model(), Reader(), QuantConfig(), output_dir=tmp_path, name="m")
    assert res.report["smoothquant"] and res.report["calibration"]["samples"] == 100 * 16
    assert len(handed) == 100  # each item pulled from the reader once
    r = Replayable(iter(items), keep=10)
    assert len(list(r)) == 100 and len(r.head) == 10 and len(list(r)) == 10  # a second full pass: the kept ones


def test_smoothed_float_model_is_written_and_apply_encodings_reproduces_the_qdq_model(tmp_path):
    import onnx

    from converter import apply_encodings
    from converter.errors import EncodingsError

    model = outlier_model()
    onnx.save(model, tmp_path / "m.onnx")
    res = quantize(str(tmp_path / "m.onnx"), batches(1), QuantConfig(), output_dir=tmp_path / "out")
    float_path = tmp_path / "out" / "m.prepared.onnx"
    assert res.report["outputs"]["float_model"] == str(float_path) and float_path.is_file()
    x = batches(9, 1)[0]
    for got, want in zip(run(str(float_path), x), run(model, x)):  # the smoothed float model is the same function
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    apply_encodings(str(float_path), res.encodings_path, tmp_path / "again.onnx")
    assert (tmp_path / "again.onnx").read_bytes() == res.model_path.read_bytes()
    try:
        apply_encodings(str(tmp_path / "m.onnx"), res.encodings_path, tmp_path / "wrong.onnx")
        raise AssertionError("applying to the unsmoothed model must fail")
    except EncodingsError as exc:
        assert "m.prepared.onnx" not in exc.message and ".prepared.onnx" in exc.message + exc.fix
    # a second run replaces its own outputs, the float model included
    quantize(str(tmp_path / "m.onnx"), batches(1), QuantConfig(), output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "m.prepared.onnx").with_suffix(".tmp").exists()
