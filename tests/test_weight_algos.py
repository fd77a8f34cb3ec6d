"""GPTQ and HQQ for MatMul/Gemm weights (``--weight-algo``, issue 26): measured against nearest rounding on held-out
data, run by ONNX Runtime as MatMulNBits, their encodings round trip; and the weight-only MatMul behind an attention
context (``MatMul -> Transpose -> Reshape -> MatMul``) fused too."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter import QuantConfig, quantize
from converter.cli import main
from converter.errors import ConfigError
from converter.encodings_file import apply_encodings
from converter.quant.qdq import dequantized_values

from .conftest import op_counts

K, H, N = 128, 128, 64
_MIX = np.random.default_rng(7).standard_normal((K, K)) / np.sqrt(K) * 3


def mlp(seed: int = 0, gemm: bool = False, tokens: bool = False) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Add(b1) -> Tanh -> MatMul(W2) (or a Gemm with transB) -> y; W1 with a few large input rows.
    ``tokens``: x is ``[1, T, K]`` (a transformer's layout: ONNX Runtime turns a 2-D MatMul + Add into a Gemm before
    it fuses MatMulNBits)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((K, H)) / 12).astype(np.float32)
    w1[:3] *= 6  # outlier input features
    w2 = (rng.standard_normal((H, N)) / 12).astype(np.float32)
    lead = [1, None] if tokens else [None]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, N])
    second = (helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1) if gemm
              else helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h"], name="bias1"),
             helper.make_node("Tanh", ["h"], ["r"], name="act"), second]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2.T.copy() if gemm else w2, "w2"),
             numpy_helper.from_array((rng.standard_normal(H) / 10).astype(np.float32), "b1")]
    return helper.make_model(helper.make_graph(nodes, "mlp", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def inputs(n: int, seed: int) -> np.ndarray:
    """Correlated features (GPTQ's point: the errors of one column can be made up in the next)."""
    z = np.random.default_rng(seed).standard_normal((n, K))
    return (z @ _MIX + 0.5 * z).astype(np.float32)


def calib(tokens: bool = False) -> list[dict[str, np.ndarray]]:
    return [{"x": inputs(128, s)[None] if tokens else inputs(128, s)} for s in range(8)]  # 1024 rows, K = 128


def output_mse(path, model, x) -> float:
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(np.mean((got - ref) ** 2) / np.mean(ref ** 2))


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("block", [None, 32])
def test_gptq_and_hqq_lower_the_held_out_error_of_nearest_rounding(tmp_path, block, gemm):
    model = mlp(gemm=gemm)
    held = inputs(512, 99)
    err, reports = {}, {}
    for algo in ("rtn", "gptq", "hqq"):
        cfg = QuantConfig(weight_bits=4, weight_block_size=block, weight_algo=algo, smoothquant=False)
        r = quantize(model, calib(), cfg, output_dir=tmp_path / algo, name="m")
        err[algo], reports[algo] = output_mse(r.model_path, model, held), r.report
    assert err["gptq"] < 0.8 * err["rtn"], err
    assert err["hqq"] < err["rtn"], err
    gran = "per-channel" if block is None else f"block-{block}"
    layers = reports["gptq"]["gptq"]["layers"]
    assert [x["node"] for x in layers] == ["fc1", "fc2"] and all(x["granularity"] == gran for x in layers)
    assert all(x["relative_output_error"] < x["relative_output_error_rtn"] for x in layers), layers
    assert [x["node"] for x in reports["hqq"]["hqq"]["layers"]] == ["fc1", "fc2"]
    assert "gptq" not in reports["rtn"] and "hqq" not in reports["rtn"]


@pytest.mark.parametrize("bits", [4, 8])
def test_eight_bits_too(tmp_path, bits):
    model = mlp(1)
    held = inputs(512, 98)
    err = {a: output_mse(quantize(model, calib(), QuantConfig(weight_bits=bits, weight_algo=a, smoothquant=False),
                                  output_dir=tmp_path / a, name="m").model_path, model, held)
           for a in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"], err


@pytest.mark.parametrize("algo", ["gptq", "hqq"])
def test_grid_runs_as_matmulnbits_and_the_encodings_round_trip(tmp_path, algo):
    model = mlp(2, tokens=True)
    r = quantize(model, calib(True), QuantConfig(weight_bits=4, weight_block_size=32, weight_algo=algo),
                 output_dir=tmp_path, name="m")
    qdq = onnx.load(r.model_path)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(r.model_path, so, providers=["CPUExecutionProvider"])
    assert op_counts(onnx.load(so.optimized_model_filepath)).get("MatMulNBits", 0) == 2  # both weight MatMuls
    float_path = r.report["outputs"]["float_model"]  # the float model holding the grid values
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(float_path).graph.initializer}
    used = dequantized_values(qdq)
    for w in ("w1", "w2"):
        e = r.plan.encodings[w]  # what the encodings file carries: the round trip below
        assert e.blocked and e.block_size == 32 and e.bitwidth == 4
        np.testing.assert_array_equal(e.dequantize(e.quantize(floats[w])), floats[w])  # exactly on the grid
        np.testing.assert_array_equal(used[f"{w}_dequantized"], floats[w])
        if algo == "hqq":  # asymmetric: unsigned, a zero point per block that HQQ chose (not one value)
            assert not e.signed and not e.symmetric and len(set(e.zero_point)) > 3
        else:
            assert e.signed and set(e.zero_point) == {0}
    again = apply_encodings(float_path, r.encodings_path, tmp_path / "again.onnx")
    assert again.SerializeToString() == qdq.SerializeToString()


def test_hqq_zero_points_reach_matmulnbits(tmp_path):
    r = quantize(mlp(3, tokens=True), calib(True), QuantConfig(weight_bits=4, weight_block_size=32, weight_algo="hqq"),
                 output_dir=tmp_path, name="m")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(r.model_path, so, providers=["CPUExecutionProvider"])
    opt = onnx.load(so.optimized_model_filepath)
    inits = {t.name: numpy_helper.to_array(t) for t in opt.graph.initializer}
    nbits = [n for n in opt.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2
    for n in nbits:
        zp = inits[n.input[3]]  # packed uint4 zero points: not the implicit 8 of a symmetric grid
        assert len(np.unique(zp)) > 3, np.unique(zp)


def attention_like() -> onnx.ModelProto:
    """q = x Wq + bq, v = x Wv + bv, s = q v^T, ctx = s v, Transpose, Reshape, out = ctx Wo (x: ``[1, T, D]``): the
    context reaches the weight-only output projection through data movement only."""
    rng = np.random.default_rng(5)
    d, t = 64, 16
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, t, d])  # batch unknown: no MatMul + Add -> Gemm
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, t, d])
    inits = [numpy_helper.from_array((rng.standard_normal((d, d)) / 8).astype(np.float32), k) for k in ("wq", "wv", "wo")]
    inits += [numpy_helper.from_array((rng.standard_normal(d) / 8).astype(np.float32), k) for k in ("bq", "bv")]
    inits.append(numpy_helper.from_array(np.array([0, t, d], np.int64), "shape"))
    mm, add = "MatMul", "Add"
    nodes = [helper.make_node(mm, ["x", "wq"], ["q0"], name="q"), helper.make_node(add, ["q0", "bq"], ["q"], name="q_bias"),
             helper.make_node(mm, ["x", "wv"], ["v0"], name="v"), helper.make_node(add, ["v0", "bv"], ["v"], name="v_bias"),
             helper.make_node("Transpose", ["v"], ["vt"], name="vt", perm=[0, 2, 1]),
             helper.make_node(mm, ["q", "vt"], ["s"], name="scores"),
             helper.make_node(mm, ["s", "v"], ["ctx"], name="context"),
             helper.make_node("Transpose", ["ctx"], ["ct"], name="ct", perm=[0, 2, 1]),
             helper.make_node("Reshape", ["ct", "shape"], ["cr"], name="cr"),
             helper.make_node(mm, ["cr", "wo"], ["y"], name="out")]
    return helper.make_model(helper.make_graph(nodes, "att", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_the_output_projection_behind_data_movement_is_fused_too(tmp_path):
    model = attention_like()
    data = [{"x": np.random.default_rng(s).standard_normal((1, 16, 64)).astype(np.float32)} for s in range(16)]
    r = quantize(model, data, QuantConfig(weight_bits=4, weight_block_size=32), output_dir=tmp_path, name="m")
    assert not {"ctx", "ct", "cr"} & set(r.plan.tensors)  # no Q/DQ that only the weight-only layer would read
    assert {"q", "s"} <= set(r.plan.tensors)  # the scores MatMul still reads quantized inputs
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(r.model_path, so, providers=["CPUExecutionProvider"])
    ops = op_counts(onnx.load(so.optimized_model_filepath))
    assert ops.get("MatMulNBits", 0) == 3, ops  # q, v and the output projection
    x = data[0]["x"]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(r.model_path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.98, cos


def test_bad_combinations_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="hqq"):
        QuantConfig(weight_algo="hqq", target="qnn")
    with pytest.raises(ConfigError, match="adaround"):
        QuantConfig(weight_algo="gptq", adaround=True)
    with pytest.raises(ConfigError, match="weight_algo"):
        QuantConfig(weight_algo="awq")
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    np.save(tmp_path / "x.npy", inputs(64, 1))
    out = tmp_path / "out"
    assert main(["quantize", str(path), "--calib", str(tmp_path / "x.npy"), "-o", str(out), "--weight-algo", "hqq",
                 "--target", "qnn"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "fix:" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_cli_weight_algo(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    np.save(tmp_path / "x.npy", np.concatenate([b["x"] for b in calib()]))
    assert main(["quantize", str(path), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o"),
                 "--weight-bits", "4", "--weight-block-size", "32", "--weight-algo", "gptq"]) == 0
    import json

    report = json.loads((tmp_path / "o" / "m.report.json").read_text())
    assert report["config"]["weight_algo"] == "gptq" and len(report["gptq"]["layers"]) == 2


def test_weight_only_leaves_every_activation_in_float(tmp_path):
    model = attention_like()
    data = [{"x": np.random.default_rng(s).standard_normal((1, 16, 64)).astype(np.float32)} for s in range(16)]
    r = quantize(model, data, QuantConfig(weight_bits=4, weight_block_size=32, weight_only=True, weight_algo="gptq"),
                 output_dir=tmp_path, name="m")
    assert r.report["summary"]["quantized_tensors"] == {"activation": 0, "weight": 3, "bias": 0}
    assert r.report["gptq"]["layers"]  # GPTQ still read the calibration data
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(r.model_path, so, providers=["CPUExecutionProvider"])
    ops = op_counts(onnx.load(so.optimized_model_filepath))
    assert ops.get("MatMulNBits") == 3 and not {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul",
                                                 "MatMulIntegerToFloat"} & set(ops), ops


def test_gptq_on_the_asymmetric_grid_uses_all_16_levels_and_beats_its_rounding(tmp_path):
    """``weight_symmetric: false`` with GPTQ (the documented MiniLM W4 block-32 setting): uint4 with a zero point per
    block GPTQ chose, every one of the 16 codes in use (the symmetric grid has 15), held-out error below nearest
    rounding on the same grid, and ONNX Runtime fuses it to MatMulNBits with those zero points."""
    model = mlp(4, tokens=True)
    held = inputs(512, 97)[None]
    err, runs = {}, {}
    for algo in ("rtn", "gptq"):
        cfg = QuantConfig(weight_bits=4, weight_block_size=32, weight_algo=algo, weight_symmetric=False,
                          weight_only=True, smoothquant=False)
        runs[algo] = quantize(model, calib(True), cfg, output_dir=tmp_path / algo, name="m")
        err[algo] = output_mse(runs[algo].model_path, model, held)
    assert err["gptq"] < 0.8 * err["rtn"], err
    sym = QuantConfig(weight_bits=4, weight_block_size=32, weight_algo="gptq", weight_only=True, smoothquant=False)
    err["gptq_symmetric"] = output_mse(quantize(model, calib(True), sym, output_dir=tmp_path / "sym", name="m").model_path,
                                       model, held)
    assert err["gptq"] < 0.8 * err["gptq_symmetric"], err  # 16 levels against the restricted [-7, 7]
    r = runs["gptq"]
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(r.report["outputs"]["float_model"]).graph.initializer}
    for w in ("w1", "w2"):
        e = r.plan.encodings[w]
        assert not e.signed and not e.symmetric and e.block_size == 32 and len(set(e.zero_point)) > 3
        assert set(np.unique(e.quantize(floats[w])).tolist()) == set(range(16))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(r.model_path, so, providers=["CPUExecutionProvider"])
    opt = onnx.load(so.optimized_model_filepath)
    assert op_counts(opt).get("MatMulNBits", 0) == 2 and op_counts(opt).get("MatMul", 0) == 0
    inits = {t.name: numpy_helper.to_array(t) for t in opt.graph.initializer}
    assert all(len(np.unique(inits[n.input[3]])) > 3 for n in opt.graph.node if n.op_type == "MatMulNBits")
