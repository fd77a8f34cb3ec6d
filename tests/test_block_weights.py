"""Block-wise weights (opset 21 blocked DequantizeLinear), per-layer weight widths, and their encodings."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from converter import QuantConfig, quantize
from converter.cli import main
from converter.errors import ConfigError, EncodingsError
from converter.encodings_file import apply_encodings
from converter.quant.encode import weight_encoding
from converter.quant.encodings_io import dumps_encodings, loads_encodings

from .conftest import op_counts, parse, run, float_of

K, N = 200, 48  # K is not a multiple of 32: the last block is ragged (8 of 32)


def outlier_matmul():
    """y = x @ W with one large weight per output column: per channel, that outlier sets the whole column's
    int4 step and the other 199 weights round to a few levels; blocks confine it to its 32 rows."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (K, N)).astype(np.float32)
    w[rng.integers(0, K, N), np.arange(N)] = rng.choice([-1.0, 1.0], N) * rng.uniform(0.6, 1.0, N)
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B,{K}] x) => (float[B,{N}] y) {{
      y = MatMul(x, W)
    }}""", W=w)


def xs(seed, n=2, b=32):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (b, K)).astype(np.float32)} for _ in range(n)]


def rel_err(y, ref):
    return float(np.mean((y - ref) ** 2) / np.mean(ref**2))


def test_blocks_beat_per_channel_on_outlier_weights_in_ort(tmp_path):
    """W4A8 on the qnn target (every activation quantized, the same for each row): blocks beat per channel. On
    ort-cpu a block-wise MatMul is weight-only, so ONNX Runtime fuses it into MatMulNBits."""
    model = outlier_matmul()
    x = xs(9, 1, 256)[0]
    ref = run(model, x)[0]
    errs, fused = {}, {}
    rows = {"pc4": dict(weight_bits=4), "b32": dict(weight_bits=4, weight_block_size=32),
            "b64": dict(weight_bits=4, weight_block_size=64), "b32w8": dict(weight_bits=8, weight_block_size=32),
            "pc8": dict(weight_bits=8)}
    for label, cfg in rows.items():
        for target in ("qnn", "ort-cpu"):
            r = quantize(model, xs(1), QuantConfig(target=target, **cfg), output_dir=tmp_path / target / label, name="m")
            q = onnx.load(str(r.model_path))
            errs[target, label] = rel_err(run(q, x)[0], ref)
            [dq] = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W_quantized"]
            if "weight_block_size" in cfg:
                size = cfg["weight_block_size"]
                scale = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == dq.input[1]))
                assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": size}
                assert scale.shape == (-(-K // size), N)  # ragged: 200 = 6 x 32 + 8
                [w] = r.report["summary"]["weights"]
                assert w["granularity"] == f"block-{size}" and ("activations" in w) == (target == "ort-cpu")
            so = ort.SessionOptions()
            so.optimized_model_filepath = str(tmp_path / f"{target}{label}.opt.onnx")
            ort.InferenceSession(str(r.model_path), so, providers=["CPUExecutionProvider"])
            fused[target, label] = op_counts(onnx.load(so.optimized_model_filepath)).get("MatMulNBits", 0)
    qnn = {k[1]: v for k, v in errs.items() if k[0] == "qnn"}
    # measured (relative MSE vs FP32, qnn): int4 per channel 0.107, blocks of 64 0.033, of 32 0.016; int8 1e-3, 4e-4
    assert qnn["b32"] * 4 < qnn["pc4"] and qnn["b64"] * 2 < qnn["pc4"], errs
    assert qnn["b32"] < qnn["b64"] < 0.05, errs
    assert qnn["b32w8"] < qnn["b32"] / 3 and qnn["pc8"] < qnn["b32"] / 3, errs
    # ort-cpu: blocks weight-only, fused into MatMulNBits (int4 and int8; it quantizes x itself, accuracy level 4)
    assert errs["ort-cpu", "b32"] * 4 < errs["ort-cpu", "pc4"] and errs["ort-cpu", "b32"] < 0.05, errs
    assert {k: v for k, v in fused.items() if v} == {("ort-cpu", "b32"): 1, ("ort-cpu", "b64"): 1,
                                                     ("ort-cpu", "b32w8"): 1}, fused


def test_blocked_scales_are_per_block_max_or_mse():
    w = outlier_matmul().graph.initializer[0]
    w = numpy_helper.to_array(w)
    enc = weight_encoding(w, 4, 1, "minmax", 32, 0)
    assert enc.block_shape == (7, N) and enc.axis == 0 and enc.block_size == 32
    blocks = np.abs(np.pad(w, ((0, 7 * 32 - K), (0, 0)))).reshape(7, 32, N).max(axis=1)
    np.testing.assert_allclose(enc.scale_array().reshape(7, N), blocks / 7, rtol=1e-6)
    mse = weight_encoding(w, 4, 1, "mse", 32, 0)
    assert np.mean((mse.fake_quantize(w) - w) ** 2) < np.mean((enc.fake_quantize(w) - w) ** 2)


def conv_model(cin=64, group=1):
    rng = np.random.default_rng(3)
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B,{cin},6,6] x) => (float[B,16,6,6] y) {{
      h = Conv <pads: ints = [1, 1, 1, 1], group: int = {group}> (x, W, Bias)
      y = Relu(h)
    }}""", W=rng.normal(0, 0.1, (16, cin // group, 3, 3)).astype(np.float32) * rng.uniform(0.2, 2, (1, cin // group, 1, 1)).astype(np.float32),
                 Bias=rng.normal(0, 0.1, 16).astype(np.float32))


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_conv_gemm_blocks_run_in_ort_and_round_trip_the_encodings(tmp_path, version):
    """A Conv block is 32 input channels x the whole kernel (AIMET's): the encodings hold [O, I/32, 1, 1], the ONNX
    scale repeats it over the kernel ([O, I/32, 3, 3], ONNX Runtime does not broadcast). Gemm (transB) blocks
    axis 1. Both go through write -> read -> apply-encodings to the same bytes, bw 4 per channel and blocks."""
    rng = np.random.default_rng(5)
    gemm = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B,96] x) => (float[B,24] y) {
      y = Gemm <transB: int = 1> (x, W, C)
    }""", W=rng.normal(0, 0.1, (24, 96)).astype(np.float32), C=rng.normal(0, 0.1, 24).astype(np.float32))
    cases = {"conv": (conv_model(), lambda s: {"x": np.random.default_rng(s).normal(0, 1, (4, 64, 6, 6)).astype(np.float32)}),
             "gemm": (gemm, lambda s: {"x": np.random.default_rng(s).normal(0, 1, (8, 96)).astype(np.float32)})}
    for label, (model, data) in cases.items():
        x = data(7)
        ref = run(model, x)[0]
        errs = {}
        for block in (None, 32):
            cfg = QuantConfig(weight_bits=4, weight_block_size=block, encodings_version=version)
            r = quantize(model, [data(1), data(2)], cfg, output_dir=tmp_path / f"{label}{block}", name="m")
            q = onnx.load(str(r.model_path))
            errs[block] = rel_err(run(q, x)[0], ref)
            again = tmp_path / f"{label}{block}.again.onnx"
            apply_encodings(float_of(r, model), r.encodings_path, again)
            assert again.read_bytes() == r.model_path.read_bytes(), (label, block)
            if block is None:
                continue
            [dq] = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W_quantized"]
            scale = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == dq.input[1]))
            doc = json.loads(r.encodings_path.read_text())
            if version == "2.0.0":
                [w] = [e for e in doc["encodings"] if e["name"] == "W"]
                assert w["output_dtype"] == "int4" and w["block_size"] == 32 and "y_zero_point" not in w
                shape = np.asarray(w["y_scale"]).shape
            else:
                [w] = [e for e in doc["param_encodings"] if e["name"] == "W"]
                assert w["enc_type"] == "PER_BLOCK" and w["bw"] == 4 and w["block_size"] == 32
                assert set(w["offset"]) == {-8} and w["is_sym"] is True
                shape = (len(w["scale"]),)
            if label == "conv":
                assert scale.shape == (16, 2, 3, 3) and w.get("axis", 1) == 1
                assert shape == ((16, 2, 1, 1) if version == "2.0.0" else (32,))
            else:
                assert scale.shape == (24, 3) and w.get("axis", 1) == 1 and int(np.prod(shape)) == 72
        assert errs[32] < 0.05 and errs[None] < 0.05, (label, errs)  # the model still (int4 weights, 8-bit acts)


def test_one_block_or_no_block_axis_stays_per_channel(tmp_path):
    """A depthwise Conv (1 input channel a group) has nothing to cut into blocks: per channel, and the report
    says why."""
    r = quantize(conv_model(cin=16, group=16), [{"x": np.ones((2, 16, 6, 6), np.float32)}],
                 QuantConfig(weight_bits=4, weight_block_size=32), output_dir=tmp_path, name="m")
    [w] = r.report["summary"]["weights"]
    assert w["granularity"] == "per-channel" and "one block" in w["note"]
    assert r.report["plan"]["tensors"]["W"]["axis"] == 0 and "block_size" not in r.report["plan"]["tensors"]["W"]


def test_per_block_1_0_0_is_transposed_like_aimet():
    """AIMET writes a [K, N] MatMul weight's blocks in (output channel, block) order in 1.0.0, as-is in 2.0.0."""
    w = numpy_helper.to_array(outlier_matmul().graph.initializer[0])
    enc = weight_encoding(w, 4, 1, "minmax", 64, 0)  # block shape (4, 48)
    v1 = json.loads(dumps_encodings({}, {"W": enc}, {}, "1.0.0"))["param_encodings"][0]
    np.testing.assert_array_equal(v1["scale"], enc.scale_array().reshape(4, N).T.reshape(-1).astype(np.float64))
    v2 = loads_encodings(dumps_encodings({}, {"W": enc}, {}, "2.0.0"))
    assert v2.params["W"] == enc
    with pytest.raises(EncodingsError, match="0.6.1 has no block form"):
        dumps_encodings({}, {"W": enc}, {}, "0.6.1")


def three_layers():
    rng = np.random.default_rng(2)
    return parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B,64] x) => (float[B,16] y) {
      a = MatMul(x, W1)
      b = Relu(a)
      c = Gemm <transB: int = 1> (b, W2, C2)
      d = Relu(c)
      y = MatMul(d, W3)
    }""", W1=rng.normal(0, 0.1, (64, 64)).astype(np.float32), W2=rng.normal(0, 0.1, (64, 64)).astype(np.float32),
                 C2=np.zeros(64, np.float32), W3=rng.normal(0, 0.1, (64, 16)).astype(np.float32))


def test_per_layer_widths_from_the_plan_to_the_model_and_encodings(tmp_path):
    model = three_layers()
    data = [{"x": np.random.default_rng(1).normal(0, 1, (8, 64)).astype(np.float32)}]
    cases = {
        "first/last at 8": ({"first": 8, "last": 8}, {"W1": 8, "W2": 4, "W3": 8}),
        "op beats default, name beats last": ({"op:MatMul": 8, "last": 8, "MatMul_4": 4}, {"W1": 8, "W2": 4, "W3": 4}),
    }
    for label, (overrides, want) in cases.items():
        cfg = QuantConfig(weight_bits=4, weight_bits_overrides=overrides, weight_block_size=32)
        r = quantize(model, data, cfg, output_dir=tmp_path / str(len(overrides)), name="m")
        assert {w["weight"]: w["bits"] for w in r.report["summary"]["weights"]} == want, label
        assert {n: r.plan.tensors[n].bitwidth for n in want} == want
        q = onnx.load(str(r.model_path))
        dtypes = {t.name: t.data_type for t in q.graph.initializer}
        assert {n: dtypes[f"{n}_quantized"] for n in want} == {
            n: onnx.TensorProto.INT4 if b == 4 else onnx.TensorProto.INT8 for n, b in want.items()}
        enc = json.loads(r.encodings_path.read_text())
        assert {e["name"]: e["bw"] for e in enc["param_encodings"] if e["name"] in want} == want
        again = tmp_path / "again.onnx"
        apply_encodings(float_of(r, model), r.encodings_path, again)
        assert again.read_bytes() == r.model_path.read_bytes()
    with pytest.raises(ConfigError, match="no node named 'MatMul_9'"):
        quantize(model, data, QuantConfig(weight_bits_overrides={"MatMul_9": 8}), output_dir=tmp_path / "x", name="m")


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_block_size=48), "weight_block_size must be one of 32, 64, 128"),
    (dict(weight_block_size=32, per_channel=False), "weight_block_size needs per-channel weights"),
    (dict(weight_block_size=32, encodings_version="0.6.1"), "0.6.1 has no block-wise form"),
    (dict(weight_bits_overrides={"first": 3}), r"weight_bits_overrides\['first'\] must be 4 or 8"),
    (dict(weight_bits_overrides={"op:": 8}), "weight_bits_overrides keys must be"),
])
def test_bad_combinations_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message) as exc:
        QuantConfig(**kwargs)
    assert exc.value.fix


def test_cli_weight_block_size(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(outlier_matmul(), str(path))
    np.save(tmp_path / "c.npy", xs(1, 1)[0]["x"])
    args = ["quantize", str(path), "--calib", str(tmp_path / "c.npy"), "-o", str(tmp_path / "o"), "--weight-bits", "4"]
    assert main(args + ["--weight-block-size", "48"]) != 0
    err = capsys.readouterr().err
    assert "weight_block_size must be one of 32, 64, 128" in err and "fix:" in err and err.count("error:") == 1
    assert main(args + ["--weight-block-size", "64", "--per-tensor"]) != 0
    assert "needs per-channel weights" in capsys.readouterr().err
    assert main(args + ["--weight-block-size", "64"]) == 0
    report = json.loads((tmp_path / "o" / "m.report.json").read_text())
    assert report["summary"]["weights"][0]["granularity"] == "block-64" and report["config"]["weight_block_size"] == 64
