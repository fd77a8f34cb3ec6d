"""SmoothQuant: activation outlier channels moved into the MatMul weights; FP32 unchanged, INT8 error down; 1 / s
folded into the producer (LayerNorm, Mul/Add chain, MatMul) where it has no other reader, else one float Mul."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from converter import QuantConfig, quantize
from converter.pipeline import prepare
from converter.techniques import get as technique
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


def copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_smoothing_keeps_fp32_and_shares_one_scale_across_readers():
    model = outlier_model()
    smoothed = copy(model)
    [change] = smoothquant(smoothed, batches(1), ["CPUExecutionProvider"])
    assert change.tensor == "t" and sorted(change.matmuls) == ["MatMul_1", "MatMul_2"]
    assert change.error_after * 1.5 <= change.error_before and change.outlier_ratio > 20
    # 1 / s folded into the producing MatMul's weight columns: no node added
    assert change.folded_into == "MatMul_0" and change.mul_node is None and op_counts(smoothed) == op_counts(model)
    unfolded = copy(model)
    [change] = smoothquant(unfolded, batches(1), ["CPUExecutionProvider"], fold=False)
    assert op_counts(unfolded)["Mul"] == 1 and change.why_not_folded == "folding off"  # one Mul before both MatMuls
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
    assert entry["tensor"] == "t" and entry["alpha"] == 0.5 and entry["folded_into"] == "MatMul_0"
    assert not on.report["summary"]["float_nodes"]  # folded: nothing left in float, the smoothed t is quantized
    assert "t" in on.plan.encodings and "smoothquant" not in off.report
    unfolded = QuantConfig(smoothquant_alpha=0.5)
    assert unfolded.smoothquant_alpha == 0.5 and QuantConfig(smoothquant_alpha="auto").smoothquant_alpha == "auto"


def test_no_outliers_nothing_changes():
    rng = np.random.default_rng(0)
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x) => (float[N,8] y) {
      h = MatMul(x, W0)
      y = MatMul(h, W1)
    }""", W0=rng.normal(0, 0.4, (16, 32)).astype(np.float32), W1=rng.normal(0, 0.2, (32, 8)).astype(np.float32))
    state = prepare(model)
    state.config, state.calib_data = QuantConfig(), batches(1)
    changes = technique("smoothquant").run(state)
    assert changes == [] and state.config == QuantConfig()


def test_one_shot_reader_is_read_once_and_kept_only_in_part(tmp_path):
    """SmoothQuant reads calibration samples before calibration: a get_next() reader still gives calibration
    every sample, and only the first ``keep`` items are held in memory."""
    from converter.calib.readers import Replayable

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
        # refused by the report's SHA-256 binding before any tensor is looked up, naming the file to pass
        assert "is the original float model, which smoothquant changed" in exc.message
        assert exc.fix.startswith(f"pass {float_path}")
    # a second run replaces its own outputs, the float model included
    quantize(str(tmp_path / "m.onnx"), batches(1), QuantConfig(), output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "m.prepared.onnx").with_suffix(".tmp").exists()


# --- a small transformer block: LayerNorm -> Q, K, V; LayerNorm -> fc1 -> GELU -> fc2 ------------------------------

D, F = 16, 48
OUTLIERS = [3, 11]


def block(post_ln: bool = False, decomposed: bool = False):
    """One transformer block with outlier channels planted in both LayerNorms' gamma (as trained transformers have)
    and in fc1's columns (so GELU's output has them too). ``post_ln``: the residual reads the LayerNorm's output
    (BERT), else the block's input (pre-LN, GPT). ``decomposed``: LayerNorm as exporters write it
    (ReduceMean/Sub/Pow/Sqrt/Div -> Mul(gamma) -> Add(beta)) instead of LayerNormalization."""
    rng = np.random.default_rng(3)
    w = {k: rng.normal(0, 0.3, shape).astype(np.float32) for k, shape in
         (("WQ", (D, D)), ("WK", (D, D)), ("WV", (D, D)), ("WO", (D, D)), ("W1", (D, F)), ("W2", (F, D)))}
    g1, g2 = np.ones(D, np.float32), np.ones(D, np.float32)
    g1[OUTLIERS], g2[OUTLIERS] = 40.0, 30.0
    for k in ("WQ", "WK", "WV"):
        w[k][OUTLIERS] /= 20.0
    w["W1"][OUTLIERS] /= 15.0
    w["W1"][:, :4] *= 12.0
    w["W2"][:4] /= 12.0
    b1, b2 = rng.normal(0, 0.5, D).astype(np.float32), rng.normal(0, 0.5, D).astype(np.float32)
    consts = dict(G1=g1, B1=b1, G2=g2, B2=b2, SQ2=np.array(1.4142135, np.float32), ONE=np.array(1, np.float32),
                  HALF=np.array(0.5, np.float32), TWO=np.array(2, np.float32), EPS=np.array(1e-5, np.float32), **w)

    def ln(x, out, g, b):
        if not decomposed:
            return f"{out} = LayerNormalization <axis = -1> ({x}, {g}, {b})"
        return (f"{out}_m = ReduceMean <axes = [-1]> ({x})\n {out}_c = Sub({x}, {out}_m)\n"
                f" {out}_p = Pow({out}_c, TWO)\n {out}_v = ReduceMean <axes = [-1]> ({out}_p)\n"
                f" {out}_e = Add({out}_v, EPS)\n {out}_s = Sqrt({out}_e)\n {out}_n = Div({out}_c, {out}_s)\n"
                f" {out}_g = Mul({out}_n, {g})\n {out} = Add({out}_g, {b})")

    residual = "h" if post_ln else "x"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,T,{D}] x) => (float[N,T,{D}] y) {{
      {ln("x", "h", "G1", "B1")}
      q = MatMul(h, WQ)
      k = MatMul(h, WK)
      v = MatMul(h, WV)
      kt = Transpose <perm = [0, 2, 1]> (k)
      sc = MatMul(q, kt)
      p = Softmax <axis = -1> (sc)
      a = MatMul(p, v)
      o = MatMul(a, WO)
      r = Add({residual}, o)
      {ln("r", "h2", "G2", "B2")}
      f = MatMul(h2, W1)
      fd = Div(f, SQ2)
      fe = Erf(fd)
      f1 = Add(fe, ONE)
      fm = Mul(f, f1)
      gelu = Mul(fm, HALF)
      f2 = MatMul(gelu, W2)
      y = Add(r, f2)
    }}"""
    return prepare(parse(text, **consts)).model


def block_batches(seed, n=4):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (2, 12, D)).astype(np.float32)} for _ in range(n)]


def by_tensor(changes):
    return {c.tensor: c for c in changes}


@pytest.mark.parametrize("decomposed", [False, True])
def test_pre_ln_block_folds_into_the_layernorm_shared_by_q_k_v(decomposed):
    model = block(decomposed=decomposed)
    smoothed = copy(model)
    changes = by_tensor(smoothquant(smoothed, block_batches(1), ["CPUExecutionProvider"]))
    qkv = changes["h"]
    assert len(qkv.matmuls) == 3 and qkv.mul_node is None  # one s shared by Q, K and V
    ln = next(n for n in model.graph.node if "h" in n.output)
    assert qkv.folded_into == ln.name  # LayerNormalization, or the decomposed LayerNorm's Add(beta) (+ Mul(gamma))
    assert changes["h2"].folded_into and changes["h2"].mul_node is None
    # GELU's Mul(0.5) stays scalar (fused blocks match it): fc2's input gets a Mul, or nothing where it does not pay
    assert "gelu" not in changes or changes["gelu"].why_not_folded.startswith("producer Mul has no per-channel")
    added = op_counts(smoothed).get("Mul", 0) - op_counts(model).get("Mul", 0)
    assert added == ("gelu" in changes)  # no Mul where a fold exists
    assert len(smoothed.graph.node) == len(model.graph.node) + added
    onnx.checker.check_model(smoothed, full_check=True)
    x = block_batches(9, 1)[0]
    for got, want in zip(run(smoothed, x), run(model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_post_ln_layernorm_read_by_the_residual_gets_a_mul():
    """BERT: the LayerNorm output also feeds the residual Add, and the LayerNorm after that Add mixes channels, so
    1 / s cannot be folded: one float Mul before Q, K, V, FP32 unchanged."""
    model = block(post_ln=True)
    smoothed = copy(model)
    changes = by_tensor(smoothquant(smoothed, block_batches(1), ["CPUExecutionProvider"]))
    assert changes["h"].mul_node and changes["h"].why_not_folded == "also read by Add"
    x = block_batches(9, 1)[0]
    for got, want in zip(run(smoothed, x), run(model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_folded_smoothquant_lowers_all_int8_error_of_the_block(tmp_path):
    model = block()
    x = block_batches(9, 1)[0]
    ref = run(model, x)[0]
    cos = {}
    for label, config in (("off", QuantConfig(smoothquant=False)), ("on", QuantConfig()),
                          ("auto", QuantConfig(smoothquant_alpha="auto"))):
        res = quantize(model, block_batches(1), config, output_dir=tmp_path / label, name="m")
        cos[label] = cosine(ref, run(str(res.model_path), x)[0])
        if label != "off":
            entries = {e["tensor"]: e for e in res.report["smoothquant"]}
            assert entries["h"]["folded_into"] and entries["h2"]["folded_into"]
    assert 1 - cos["on"] < (1 - cos["off"]) / 2, cos
    assert 1 - cos["auto"] < (1 - cos["off"]) / 2, cos


def test_alpha_auto_from_the_cli_and_bad_alpha_is_one_clear_error():
    from converter.cli import main
    from converter.errors import ConfigError

    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        QuantConfig(smoothquant_alpha="best")
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        QuantConfig(smoothquant_alpha=1.5)
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "m.onnx", "--calib", "d", "--smoothquant-alpha", "best"])
    assert exc.value.code == 2


def test_fold_passes_a_channel_keeping_reshape_and_ignores_shape_readers():
    """GPT-2's Conv1D: LayerNorm -> Reshape (B, T, C) -> (B*T, C) -> Gemm, the LayerNorm's Shape read for the
    output's shape: 1 / s still folds into the LayerNorm (Shape reads no values)."""
    rng = np.random.default_rng(5)
    g = np.ones(D, np.float32)
    g[OUTLIERS] = 40.0
    w = rng.normal(0, 0.3, (D, 24)).astype(np.float32)
    w[OUTLIERS] /= 20.0
    model = prepare(parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,T,{D}] x) => (float[N,T,24] y) {{
      h = LayerNormalization <axis = -1> (x, G, B)
      s = Shape(h)
      lead = Slice(s, S0, S2)
      target = Concat <axis = 0> (lead, C24)
      flat = Reshape(h, FLAT)
      z = Gemm(flat, W, C)
      y = Reshape(z, target)
    }}""", G=g, B=rng.normal(0, 0.5, D).astype(np.float32), W=w, C=rng.normal(0, 0.1, 24).astype(np.float32),
        S0=np.array([0], np.int64), S2=np.array([2], np.int64), C24=np.array([24], np.int64),
        FLAT=np.array([-1, D], np.int64))).model
    smoothed = copy(model)
    [change] = smoothquant(smoothed, block_batches(1), ["CPUExecutionProvider"])
    assert change.tensor == "flat" and change.folded_into == "LayerNormalization_0" and change.mul_node is None
    assert op_counts(smoothed) == op_counts(model)
    x = block_batches(9, 1)[0]
    np.testing.assert_allclose(run(smoothed, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-4)
