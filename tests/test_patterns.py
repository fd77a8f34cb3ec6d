"""Op patterns and target presets on tiny graphs: what each target places where, measured in ORT."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from converter import QuantConfig, quantize
from converter.config import TARGETS
from converter.graph.index import GraphIndex
from converter.graph.passes import name_nodes
from converter.graph.patterns import find_blocks

from .conftest import op_counts, run
from .conftest import parse as parse_unnamed

F32 = np.float32


def parse(text: str, **initializers) -> onnx.ModelProto:
    """parse() with nodes named as quantize names them (<OpType>_<position>)."""
    model = parse_unnamed(text, **initializers)
    name_nodes(model)
    return model


def calib(rng, shapes: dict[str, tuple], n=8, extra=None):
    return [{**{k: rng.normal(0, 1, s).astype(F32) for k, s in shapes.items()}, **(extra or {})} for _ in range(n)]


def cosine(a, b):
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def consumers(model, tensor):
    return [n for n in model.graph.node if tensor in n.input]


def producer(model, tensor):
    return next(n for n in model.graph.node if tensor in n.output)


def optimized(model, tmp_path) -> dict[str, int]:
    """Op counts after ONNX Runtime's graph optimisations (where QDQ and LayerNorm/Gelu fusions run)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(tmp_path / "optimized.onnx")))


def qdq_tensors(model) -> set[str]:
    """Float tensors that get a QuantizeLinear."""
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.fixture()
def no_patterns(monkeypatch):
    """The ort-cpu preset with its pattern table emptied: what the planner did before patterns."""
    monkeypatch.setitem(TARGETS, "ort-cpu", dataclasses.replace(TARGETS["ort-cpu"], patterns={}))


# --- activation units fused into the Conv before them -------------------------------------------------

ACTIVATIONS = {
    "Relu": "a = Relu(c)",
    "LeakyRelu": "a = LeakyRelu <alpha=0.1> (c)",
    "PRelu": "a = PRelu(c, slope)",
    "HardSwish": "a = HardSwish(c)",
    "HardSwish-x*HardSigmoid": "s = HardSigmoid <alpha=0.16666667, beta=0.5> (c)\n a = Mul(c, s)",
    "HardSwish-paddle": "t = Add(c, three)\n k = Clip(t, zero, six)\n m = Mul(c, k)\n a = Div(m, six)",
    "SiLU": "s = Sigmoid(c)\n a = Mul(c, s)",
    "GELU": "d = Div(c, sqrt2)\n e = Erf(d)\n p = Add(e, one)\n m = Mul(c, p)\n a = Mul(m, half)",
}


def act_model(rng, act: str):
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    m (float[N,3,6,6] x) => (float[N,4,6,6] y) {{
      c = Conv <pads=[1,1,1,1]> (x, W, B)
      {ACTIVATIONS[act]}
      y = Conv <pads=[1,1,1,1]> (a, W2)
    }}"""
    consts = dict(W=rng.normal(0, 0.4, (5, 3, 3, 3)).astype(F32), B=rng.normal(0, 0.1, 5).astype(F32),
                  W2=rng.normal(0, 0.3, (4, 5, 3, 3)).astype(F32), slope=np.full((5, 1, 1), 0.2, F32),
                  three=np.array(3, F32), zero=np.array(0, F32), six=np.array(6, F32), sqrt2=np.array(2 ** 0.5, F32),
                  one=np.array(1, F32), half=np.array(0.5, F32))
    used = {k: v for k, v in consts.items() if k in text.replace("(", " ").replace(",", " ").replace(")", " ").split()}
    return parse(text, **used)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_tensorrt_fuses_every_activation_form_into_the_conv(tmp_path, rng, act):
    model = act_model(rng, act)
    res = quantize(model, calib(rng, {"x": (2, 3, 6, 6)}), QuantConfig(target="tensorrt"), output_dir=tmp_path)
    conv = next(n.name for n in model.graph.node if n.output[0] == "c")
    members = [name for name, st in res.plan.nodes.items() if st.group == conv and name != conv]
    assert members and all(res.plan.nodes[m].status == "fused" for m in members)
    # no Q/DQ between the Conv and its activation: the Conv output feeds only the activation's nodes
    assert {n.op_type for n in consumers(res.model, "c")} <= {"Relu", "LeakyRelu", "PRelu", "HardSwish", "HardSigmoid",
                                                              "Sigmoid", "Mul", "Add", "Div"}
    assert "c" not in qdq_tensors(res.model) and "a" in qdq_tensors(res.model)  # the next Conv's input is quantized
    x = rng.normal(0, 1, (4, 3, 6, 6)).astype(F32)
    assert cosine(run(model, {"x": x})[0], run(res.model, {"x": x})[0]) > 0.99


@pytest.mark.parametrize("act,kind", [("SiLU", "SiLU"), ("GELU", "GELU"), ("HardSwish-paddle", "HardSwish"),
                                      ("HardSwish-x*HardSigmoid", "HardSwish")])
def test_composite_activations_are_recognised(rng, act, kind):
    model = act_model(rng, act)
    onnx.shape_inference.infer_shapes(model)
    blocks = find_blocks(GraphIndex.build(onnx.shape_inference.infer_shapes(model)))
    assert [b.kind for b in blocks] == [kind]
    assert blocks[0].inputs == ("c",) and blocks[0].output == "a"
    assert "c" not in blocks[0].internal and "a" not in blocks[0].internal


def test_ort_cpu_hardswish_is_one_unit_and_conv_still_fuses(tmp_path, rng):
    """ORT has no integer HardSwish: one DQ -> x*clip(x+3,0,6)/6 -> Q, and the Conv before it is a QLinearConv."""
    model = act_model(rng, "HardSwish-paddle")
    res = quantize(model, calib(rng, {"x": (2, 3, 6, 6)}), QuantConfig(target="ort-cpu"), output_dir=tmp_path)
    assert qdq_tensors(res.model) == {"x", "c", "a", "y_float"}  # nothing inside the HardSwish
    assert optimized(res.model, tmp_path).get("QLinearConv") == 2


def test_gemm_bias_batchnorm_relu_is_one_group(tmp_path, rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8] x) => (float[N,3] y) {
      h = MatMul(x, W)
      a = Add(h, B)
      n = BatchNormalization(a, s, b, m, v)
      r = Relu(n)
      y = MatMul(r, W2)
    }""", W=rng.normal(0, 0.4, (8, 6)).astype(F32), B=rng.normal(0, 0.1, 6).astype(F32),
        s=rng.uniform(0.5, 2, 6).astype(F32), b=rng.normal(0, 0.2, 6).astype(F32), m=rng.normal(0, 0.2, 6).astype(F32),
        v=rng.uniform(0.5, 2, 6).astype(F32), W2=rng.normal(0, 0.4, (6, 3)).astype(F32))
    res = quantize(model, calib(rng, {"x": (4, 8)}), QuantConfig(), output_dir=tmp_path)
    mm = producer(model, "h").name
    assert [res.plan.nodes[producer(model, t).name].pattern for t in ("a", "n", "r")] == \
        ["bias_add", "BatchNormalization", "Relu"]
    assert all(res.plan.nodes[producer(model, t).name].group == mm for t in ("a", "n", "r"))
    assert qdq_tensors(res.model) == {"x", "r", "y_float"}
    x = rng.normal(0, 1, (16, 8)).astype(F32)
    assert cosine(run(model, {"x": x})[0], run(res.model, {"x": x})[0]) > 0.99


# --- residual CNN: TensorRT and ORT CPU placements ----------------------------------------------------

RESIDUAL = """
<ir_version: 8, opset_import: ["" : 17]>
res (float[N,4,8,8] x) => (float[N,10] y) {
  c0 = Conv <pads=[1,1,1,1]> (x, W0, B0)
  r0 = Relu(c0)
  c1 = Conv <pads=[1,1,1,1]> (r0, W1, B1)
  r1 = Relu(c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, W2, B2)
  s = Add(c2, r0)
  r2 = Relu(s)
  p = GlobalAveragePool(r2)
  f = Flatten(p)
  y = Gemm <transB=1> (f, W3, B3)
}
"""


def residual_cnn(rng):
    w = lambda *shape: rng.normal(0, 0.3, shape).astype(F32)  # noqa: E731
    return parse(RESIDUAL, W0=w(8, 4, 3, 3), B0=w(8), W1=w(8, 8, 3, 3), B1=w(8), W2=w(8, 8, 3, 3), B2=w(8),
                 W3=w(10, 8), B3=w(10))


def test_tensorrt_residual_cnn_int8_symmetric_and_fused(tmp_path, rng):
    model = residual_cnn(rng)
    res = quantize(model, calib(rng, {"x": (2, 4, 8, 8)}), QuantConfig(target="tensorrt"), output_dir=tmp_path)
    q = res.model
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:  # every Q/DQ: int8 (int32 for biases) with zero point 0
        zp = inits[n.input[2]]
        assert zp.dtype in (np.int8, np.int32) and not zp.any(), n.name
        if zp.dtype == np.int32:
            assert inits[n.input[0]].dtype == np.int32
    # no Q/DQ between a Conv and its fused activation, nor between the last Conv and the residual Add
    for conv_out, follower in (("c0", "Relu"), ("c1", "Relu"), ("c2", "Add"), ("s", "Relu")):
        assert [n.op_type for n in consumers(q, conv_out)] == [follower], conv_out
    add = next(n for n in q.graph.node if n.op_type == "Add")
    shortcut = next(t for t in add.input if t != "c2")
    assert producer(q, shortcut).op_type == "DequantizeLinear"  # the shortcut input is quantized
    assert res.plan.nodes[producer(model, "s").name].pattern == "residual_add"
    assert "y" not in qdq_tensors(q) and "y_float" not in qdq_tensors(q)  # no Q/DQ on outputs
    x = rng.normal(0, 1, (4, 4, 8, 8)).astype(F32)
    assert cosine(run(model, {"x": x})[0], run(q, {"x": x})[0]) > 0.99


def test_ort_cpu_residual_cnn_runs_on_integer_kernels(tmp_path, rng):
    model = residual_cnn(rng)
    res = quantize(model, calib(rng, {"x": (2, 4, 8, 8)}), QuantConfig(target="ort-cpu"), output_dir=tmp_path)
    ops = optimized(res.model, tmp_path)
    assert ops.get("QLinearConv") == 3 and ops.get("QLinearAdd") == 1 and ops.get("QGemm") == 1
    assert not {"Conv", "Add", "Gemm", "Relu"} & set(ops)
    # Add -> Relu is one group (ORT drops the Relu before the Q): one Q/DQ, after the Relu
    assert "s" not in qdq_tensors(res.model) and "r2" in qdq_tensors(res.model)


# --- transformer blocks ---------------------------------------------------------------------------------

LAYERNORM = """
<ir_version: 8, opset_import: ["" : 17]>
ln (float[N,5,16] x) => (float[N,5,8] y) {
  h = MatMul(x, W)
  a = Add(h, B)
  mu = ReduceMean <axes=[-1]> (a)
  d = Sub(a, mu)
  sq = Pow(d, two)
  var = ReduceMean <axes=[-1]> (sq)
  ve = Add(var, eps)
  sd = Sqrt(ve)
  nrm = Div(d, sd)
  g = Mul(nrm, gamma)
  o = Add(g, beta)
  y = MatMul(o, W2)
}
"""


def layernorm_model(rng):
    return parse(LAYERNORM, W=rng.normal(0, 0.4, (16, 16)).astype(F32), B=rng.normal(0, 0.2, 16).astype(F32),
                 two=np.array(2, F32), eps=np.array(1e-5, F32), gamma=rng.uniform(0.5, 1.5, 16).astype(F32),
                 beta=rng.normal(0, 0.1, 16).astype(F32), W2=rng.normal(0, 0.4, (16, 8)).astype(F32))


def test_decomposed_layernorm_stays_whole_and_ort_fuses_it(tmp_path, rng, monkeypatch):
    model = layernorm_model(rng)
    data = calib(rng, {"x": (2, 5, 16)})
    res = quantize(model, data, QuantConfig(target="ort-cpu"), output_dir=tmp_path / "with")
    inside = {"mu", "d", "sq", "var", "ve", "sd", "nrm", "g"}
    assert not inside & qdq_tensors(res.model)
    assert [p["kind"] for p in res.plan.patterns if not p["qdq_inside"]] == ["LayerNorm"]
    assert optimized(res.model, tmp_path).get("LayerNormalization") == 1  # ORT's LayerNormFusion still matches
    # before patterns: Q/DQ inside the LayerNorm, which ORT then cannot fuse
    monkeypatch.setitem(TARGETS, "ort-cpu", dataclasses.replace(TARGETS["ort-cpu"], patterns={}))
    old = quantize(model, data, QuantConfig(target="ort-cpu"), output_dir=tmp_path / "without")
    assert inside & qdq_tensors(old.model)
    assert "LayerNormalization" not in optimized(old.model, tmp_path)
    x = rng.normal(0, 1, (8, 5, 16)).astype(F32)
    f = run(model, {"x": x})[0]
    assert cosine(f, run(res.model, {"x": x})[0]) >= cosine(f, run(old.model, {"x": x})[0]) - 1e-4


def test_pattern_blocks_are_layers_of_the_search_and_the_analyzer(rng):
    """A LayerNorm block is one layer (the search can keep it in float, the analyzer ranks it)."""
    from converter.pipeline import prepare
    from converter.quant.layers import plan_layers
    from converter.quant.plan import build_plan

    prepared = prepare(layernorm_model(rng))
    layers = plan_layers(build_plan(prepared.model, QuantConfig(), prepared.idx), prepared.idx)
    ln = [lay for lay in layers if "ReduceMean" in lay.op_types]
    assert len(ln) == 1 and ln[0].output == "o" and len(ln[0].nodes) == 9, [lay.label for lay in layers]
    assert ln[0].inputs == ["a"] and set(ln[0].constants) == {"two", "eps", "gamma", "beta"}
    assert [lay.op_type for lay in layers] == ["MatMul", "ReduceMean", "MatMul"]


def test_layernorm_node_is_recognised(rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    ln (float[N,5,16] x) => (float[N,5,16] y) {
      y = LayerNormalization <axis=-1> (x, gamma, beta)
    }""", gamma=np.ones(16, F32), beta=np.zeros(16, F32))
    assert [b.kind for b in find_blocks(GraphIndex.build(model))] == ["LayerNorm"]


def test_gelu_erf_stays_whole_and_ort_fuses_it(tmp_path, rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    ff (float[N,5,8] x) => (float[N,5,8] y) {
      h = MatMul(x, W)
      a = Add(h, B)
      d = Div(a, sqrt2)
      e = Erf(d)
      p = Add(e, one)
      m = Mul(a, p)
      gl = Mul(m, half)
      y = MatMul(gl, W2)
    }""", W=rng.normal(0, 0.5, (8, 32)).astype(F32), B=rng.normal(0, 0.2, 32).astype(F32),
        sqrt2=np.array(2 ** 0.5, F32), one=np.array(1, F32), half=np.array(0.5, F32),
        W2=rng.normal(0, 0.3, (32, 8)).astype(F32))
    res = quantize(model, calib(rng, {"x": (2, 5, 8)}), QuantConfig(target="ort-cpu"), output_dir=tmp_path)
    assert not {"d", "e", "p", "m"} & qdq_tensors(res.model)
    assert "gl" in qdq_tensors(res.model)  # the next MatMul's input
    ops = optimized(res.model, tmp_path)
    assert ops.get("Gelu", 0) + ops.get("BiasGelu", 0) == 1 and "Erf" not in ops
    x = rng.normal(0, 1, (8, 5, 8)).astype(F32)
    assert cosine(run(model, {"x": x})[0], run(res.model, {"x": x})[0]) > 0.99


ATTENTION = """
<ir_version: 8, opset_import: ["" : 17]>
att (float[N,6,8] x, float[N,1,6] mask) => (float[N,6,8] y) {
  q = MatMul(x, Wq)
  k = MatMul(x, Wk)
  v = MatMul(x, Wv)
  kt = Transpose <perm=[0,2,1]> (k)
  sc = MatMul(q, kt)
  ss = Mul(sc, scale)
  sm = Add(ss, mask)
  pr = Softmax <axis=-1> (sm)
  o = MatMul(pr, v)
  y = MatMul(o, Wo)
}
"""


@pytest.mark.parametrize("target,bits", [("ort-cpu", 8), ("qnn", 8), ("qnn", 16)])
def test_attention_scores_stay_float_with_a_finfo_min_mask(tmp_path, rng, monkeypatch, target, bits):
    """A BERT-style mask of -3.4e38 must not share an encoding with the scores (it wipes them out)."""
    w = lambda: rng.normal(0, 0.4, (8, 8)).astype(F32)  # noqa: E731
    model = parse(ATTENTION, Wq=w(), Wk=w(), Wv=w(), Wo=w(), scale=np.array(8 ** -0.5, F32))

    def mask(n):
        m = np.zeros((n, 1, 6), F32)
        m[:, :, 4:] = np.finfo(np.float32).min  # the last two positions are padding
        return m

    data = [{"x": rng.normal(0, 1, (2, 6, 8)).astype(F32), "mask": mask(2)} for _ in range(8)]
    cfg = QuantConfig(target=target, activation_bits=bits)
    res = quantize(model, data, cfg, output_dir=tmp_path / "with")
    assert not {"sc", "ss", "sm", "mask"} & qdq_tensors(res.model)
    assert {"q", "kt", "pr", "v"} <= qdq_tensors(res.model)  # both MatMuls keep integer inputs
    assert [p["kind"] for p in res.plan.patterns if p["kind"] == "attention"] == ["attention"]
    monkeypatch.setitem(TARGETS, target, dataclasses.replace(TARGETS[target], patterns={}))
    old = quantize(model, data, cfg, output_dir=tmp_path / "without")
    # a tensor ranging to -3.4e38 gets a finite encoding (clipped), and the files stay strict JSON
    for r in (res, old):
        for enc in r.plan.encodings.values():
            assert np.isfinite(enc.mins()).all() and np.isfinite(enc.maxs()).all()
        for path in (r.encodings_path, r.report_path):
            json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path.name} holds {c}"))
    feeds = {"x": rng.normal(0, 1, (8, 6, 8)).astype(F32), "mask": mask(8)}
    f = run(model, feeds)[0]
    new_cos, old_cos = cosine(f, run(res.model, feeds)[0]), cosine(f, run(old.model, feeds)[0])
    assert new_cos > 0.99 and old_cos < 0.9, (new_cos, old_cos)


def test_concat_inputs_share_one_encoding_on_qnn(tmp_path, rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    cc (float[N,2,4,4] x) => (float[N,6,4,4] y) {
      a = Conv(x, Wa)
      b = Conv(x, Wb)
      y = Concat <axis=1> (a, b)
    }""", Wa=rng.normal(0, 0.1, (3, 2, 1, 1)).astype(F32), Wb=rng.normal(0, 0.2, (3, 2, 1, 1)).astype(F32))  # ranges alike (tests/test_scale_groups.py: unalike)
    res = quantize(model, calib(rng, {"x": (1, 2, 4, 4)}), QuantConfig(target="qnn"), output_dir=tmp_path)
    assert res.plan.encodings["a"] == res.plan.encodings["b"] == res.plan.encodings["y"]


# --- QNN: every activation, 16-bit via a real opset conversion ---------------------------------------

def test_qnn_16bit_converts_the_graph_to_opset_21(tmp_path, rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    r (float[N,4,8] x) => (float[N,4] y) {
      h = MatMul(x, W)
      r = Relu(h)
      t = Sub(r, c)
      y = ReduceMean <axes=[2], keepdims=0> (t)
    }""", W=rng.normal(0, 0.4, (8, 6)).astype(F32), c=np.array(0.25, F32))
    data = calib(rng, {"x": (2, 4, 8)})
    res = quantize(model, data, QuantConfig(target="qnn", activation_bits=16), output_dir=tmp_path)
    q = res.model
    assert next(i.version for i in q.opset_import if i.domain in ("", "ai.onnx")) == 21
    reduce = next(n for n in q.graph.node if n.op_type == "ReduceMean")
    assert len(reduce.input) == 2 and not [a for a in reduce.attribute if a.name == "axes"]  # axes became an input
    onnx.checker.check_model(q, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    zps = {inits[n.input[2]].dtype for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert zps == {np.dtype(np.uint16)}
    assert {"x", "r", "t", "y_float"} <= qdq_tensors(q) and "h" not in qdq_tensors(q)  # every activation but MatMul->Relu
    x = rng.normal(0, 1, (8, 4, 8)).astype(F32)
    assert cosine(run(model, {"x": x})[0], run(q, {"x": x})[0]) > 0.9999
    eight = quantize(model, data, QuantConfig(target="qnn"), output_dir=tmp_path / "8")
    assert next(i.version for i in eight.model.opset_import if i.domain in ("", "ai.onnx")) == 17


def test_presets_are_data():
    """Core code reads pattern decisions from the preset table; each target declares its own."""
    assert not TARGETS["ort-cpu"].patterns["LayerNorm"].qdq_inside
    assert TARGETS["tensorrt"].patterns["residual_add"].join_anchor
    assert "residual_add" not in TARGETS["ort-cpu"].patterns
    assert TARGETS["qnn"].op_types is None and "Sub" not in TARGETS["ort-cpu"].op_types


# --- preprocessing that lets the patterns match -------------------------------------------------------

def test_conv_affine_and_constant_reshapes_fold_into_the_conv(tmp_path, rng):
    """Paddle style: Conv -> Mul(scale) -> Add(Reshape(Constant offset)) -> HardSwish: one Conv + HardSwish."""
    from converter.graph.passes import preprocess

    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    m (float[N,3,6,6] x) => (float[N,4,6,6] y) {
      c = Conv <pads=[1,1,1,1]> (x, W)
      s = Mul(k, c)
      off = Reshape(offset, shape)
      a = Add(s, off)
      y = HardSwish(a)
    }""", W=rng.normal(0, 0.4, (4, 3, 3, 3)).astype(F32), k=np.array([1.7], F32),
        offset=rng.normal(0, 0.3, 4).astype(F32), shape=np.array([1, 4, 1, 1], np.int64))
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    done = preprocess(folded)
    assert done["fold_constants"] == 1 and done["fold_affine"] == 1
    assert [n.op_type for n in folded.graph.node] == ["Conv", "HardSwish"]
    x = rng.normal(0, 1, (2, 3, 6, 6)).astype(F32)
    np.testing.assert_allclose(run(folded, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_residual_add_before_layernorm_stays_whole_and_ort_fuses_skip_layernorm(tmp_path, rng):
    """Post-LN transformer block: the residual stream before a LayerNorm stays float (ORT: SkipLayerNormalization)."""
    text = LAYERNORM.replace("mu = ReduceMean <axes=[-1]> (a)", "res = Add(a, x)\n  mu = ReduceMean <axes=[-1]> (res)")
    text = text.replace("d = Sub(a, mu)", "d = Sub(res, mu)")
    model = parse(text, W=rng.normal(0, 0.4, (16, 16)).astype(F32), B=rng.normal(0, 0.2, 16).astype(F32),
                  two=np.array(2, F32), eps=np.array(1e-5, F32), gamma=rng.uniform(0.5, 1.5, 16).astype(F32),
                  beta=rng.normal(0, 0.1, 16).astype(F32), W2=rng.normal(0, 0.4, (16, 8)).astype(F32))
    res = quantize(model, calib(rng, {"x": (2, 5, 16)}), QuantConfig(target="ort-cpu"), output_dir=tmp_path)
    assert [p["kind"] for p in res.plan.patterns if not p["qdq_inside"]] == ["SkipLayerNorm"]
    assert not {"a", "res", "mu", "d", "nrm"} & qdq_tensors(res.model)
    assert {"x", "o"} <= qdq_tensors(res.model)  # the MatMuls' inputs
    ops = optimized(res.model, tmp_path)
    assert ops.get("SkipLayerNormalization") == 1 and "LayerNormalization" not in ops
    # QNN has no fused skip-LayerNorm: the Add is an ordinary quantized op, the LayerNorm stays whole
    qnn = quantize(model, calib(rng, {"x": (2, 5, 16)}), QuantConfig(target="qnn"), output_dir=tmp_path / "qnn")
    assert [p["kind"] for p in qnn.plan.patterns if not p["qdq_inside"]] == ["LayerNorm"]
    assert "res" in qdq_tensors(qnn.model) and "mu" not in qdq_tensors(qnn.model)


@pytest.mark.parametrize("target", ["ort-cpu", "qnn"])
def test_every_conv_of_the_digits_cnn_becomes_qlinearconv(digits, tmp_path, rng, target):
    """A real residual CNN (trained on scikit-learn's digits): ORT runs every Conv, Add and Gemm on integers."""
    float_ops = op_counts(onnx.load(str(digits["path"])))
    data = [{"input": x[None]} for x in digits["x_train"][:64]]
    res = quantize(digits["path"], data, QuantConfig(target=target), output_dir=tmp_path)
    ops = optimized(res.model, tmp_path)
    assert ops.get("QLinearConv") == float_ops["Conv"] and "Conv" not in ops
    assert ops.get("QLinearAdd") == float_ops["Add"] and ops.get("QGemm") == float_ops["Gemm"]
