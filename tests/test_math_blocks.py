"""Blocks recognised by their math, in the forms real exporters write them (converter/graph/math_blocks.py).

Each form sits between two MatMuls (``h = MatMul(x, W1)`` -> block -> ``z`` -> ``y = MatMul(z, W2)``), so it is
neither a head nor a tail. The forms follow what the exporters emit: TorchScript (opset <= 16: axes attributes,
``Pow(d, 2)``, ``Div``), torch.export/dynamo (opset 18: axes inputs, constants as the first operand, ``Sqrt`` +
``Reciprocal`` for rsqrt), tf2onnx from Keras (``moments`` + ``batch_normalization``: ``x * r + (beta - mean * r)``
with ``r = rsqrt(var + eps) * gamma``), tf2onnx from jax2tf (flax: ``ReduceSum * 1/N``, ``E[x^2] - E[x]^2``,
``Max(var, 0)``, ``x * x * x`` for ``x**3``), paddle2onnx (``[1]``-shaped constants, ``Mul(x, 1/sqrt 2)``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest

from converter import QuantConfig, quantize
from converter.config import TARGETS
from converter.graph.index import GraphIndex
from converter.graph.passes import name_nodes
from converter.graph.patterns import find_blocks

from .conftest import parse as parse_unnamed
from .conftest import run

F32 = np.float32
D = 16  # features (the normalised axis)
C = {  # constants the forms read, by name
    "eps": np.array(1e-5, F32), "eps1": np.array([1e-5], F32), "zero": np.array(0.0, F32),
    "two": np.array(2.0, F32), "two1": np.array([2.0], F32), "three": np.array(3.0, F32),
    "six": np.array(6.0, F32), "one": np.array(1.0, F32), "one1": np.array([1.0], F32), "half": np.array(0.5, F32),
    "half1": np.array([0.5], F32), "inv_n": np.array(1.0 / D, F32), "n": np.array(float(D), F32),
    "sqrt2": np.array(math.sqrt(2.0), F32), "rsqrt2": np.array(1 / math.sqrt(2.0), F32),
    "rsqrt2_1": np.array([1 / math.sqrt(2.0)], F32), "c0": np.array(math.sqrt(2 / math.pi), F32),
    "c1": np.array(0.044715, F32), "k1702": np.array(1.702, F32), "beta15": np.array(1.5, F32),
    "mhalf": np.array(-0.5, F32), "axes": np.array([-1], np.int64),
}

FORMS = {
    # --- LayerNorm ---------------------------------------------------------------------------------
    ("LayerNorm", "torchscript"): (16, """
        m = ReduceMean <axes=[-1]> (h)
        d = Sub(h, m)
        p = Pow(d, two)
        v = ReduceMean <axes=[-1]> (p)
        ve = Add(v, eps)
        s = Sqrt(ve)
        n0 = Div(d, s)
        g = Mul(n0, gamma)
        z = Add(g, beta)"""),
    ("LayerNorm", "dynamo"): (18, """
        m = ReduceMean(h, axes)
        d = Sub(h, m)
        p = Mul(d, d)
        v = ReduceMean(p, axes)
        ve = Add(v, eps)
        s = Sqrt(ve)
        r = Reciprocal(s)
        n0 = Mul(d, r)
        g = Mul(gamma, n0)
        z = Add(beta, g)"""),
    ("LayerNorm", "tf2onnx-keras"): (13, """
        m = ReduceMean <axes=[-1]> (h)
        d = Sub(h, m)
        p = Mul(d, d)
        v = ReduceMean <axes=[-1]> (p)
        ve = Add(v, eps)
        s = Sqrt(ve)
        r = Reciprocal(s)
        rg = Mul(r, gamma)
        a = Mul(h, rg)
        mr = Mul(m, rg)
        bm = Sub(beta, mr)
        z = Add(a, bm)"""),
    ("LayerNorm", "jax2tf"): (13, """
        s1 = ReduceSum(h, axes)
        m = Mul(s1, inv_n)
        h2 = Mul(h, h)
        s2 = ReduceSum(h2, axes)
        m2 = Mul(s2, inv_n)
        mm = Mul(m, m)
        v0 = Sub(m2, mm)
        v = Max(v0, zero)
        ve = Add(v, eps)
        sq = Sqrt(ve)
        r = Reciprocal(sq)
        rg = Mul(r, gamma)
        d = Sub(h, m)
        n0 = Mul(d, rg)
        z = Add(n0, beta)"""),
    ("LayerNorm", "jax2tf-centered"): (13, """
        s1 = ReduceSum(h, axes)
        m = Div(s1, n)
        d = Sub(h, m)
        p = Mul(d, d)
        s2 = ReduceSum(p, axes)
        v = Div(s2, n)
        ve = Max(v, eps)
        r = Pow(ve, mhalf)
        n0 = Mul(d, r)
        g = Mul(n0, gamma)
        z = Add(g, beta)"""),
    ("LayerNorm", "paddle2onnx"): (11, """
        m = ReduceMean <axes=[2]> (h)
        d = Sub(h, m)
        p = Pow(d, two1)
        v = ReduceMean <axes=[2]> (p)
        ve = Add(v, eps1)
        s = Sqrt(ve)
        n0 = Div(d, s)
        g = Mul(n0, gamma)
        z = Add(g, beta)"""),
    # --- GELU ----------------------------------------------------------------------------------------
    ("GELU", "torchscript-erf"): (13, """
        a = Div(h, sqrt2)
        e = Erf(a)
        p = Add(e, one)
        q = Mul(h, p)
        z = Mul(q, half)"""),
    ("GELU", "torchscript-tanh"): (13, """
        hh = Mul(h, half)
        c = Pow(h, three)
        c2 = Mul(c, c1)
        a = Add(h, c2)
        b = Mul(a, c0)
        t = Tanh(b)
        p = Add(t, one)
        z = Mul(hh, p)"""),
    ("GELU", "dynamo-tanh"): (18, """
        c = Pow(h, three)
        c2 = Mul(c1, c)
        a = Add(h, c2)
        b = Mul(c0, a)
        t = Tanh(b)
        p = Add(t, one)
        q = Mul(h, p)
        z = Mul(half, q)"""),
    ("GELU", "dynamo-erf"): (18, """
        a = Mul(h, rsqrt2)
        e = Erf(a)
        p = Add(one, e)
        q = Mul(h, p)
        z = Mul(half, q)"""),
    ("GELU", "tf2onnx-keras-tanh"): (13, """
        c = Pow(h, three)
        c2 = Mul(c1, c)
        a = Add(h, c2)
        b = Mul(c0, a)
        t = Tanh(b)
        p = Add(one, t)
        hh = Mul(half, h)
        z = Mul(hh, p)"""),
    ("GELU", "jax2tf-tanh"): (13, """
        sq = Mul(h, h)
        cu = Mul(h, sq)
        c2 = Mul(cu, c1)
        a = Add(h, c2)
        b = Mul(a, c0)
        t = Tanh(b)
        p = Add(t, one)
        cdf = Mul(p, half)
        z = Mul(h, cdf)"""),
    ("GELU", "paddle2onnx-erf"): (11, """
        a = Mul(h, rsqrt2_1)
        e = Erf(a)
        p = Add(e, one1)
        q = Mul(h, p)
        z = Mul(q, half1)"""),
    ("GELU", "sigmoid-1.702"): (13, """
        a = Mul(k1702, h)
        s = Sigmoid(a)
        z = Mul(h, s)"""),
    # --- others --------------------------------------------------------------------------------------
    ("SiLU", "torch"): (13, """
        s = Sigmoid(h)
        z = Mul(h, s)"""),
    ("SiLU", "swish-beta"): (13, """
        a = Mul(h, beta15)
        s = Sigmoid(a)
        z = Mul(s, h)"""),
    ("HardSwish", "hardsigmoid"): (13, """
        s = HardSigmoid <alpha=0.16666667, beta=0.5> (h)
        z = Mul(h, s)"""),
    ("HardSwish", "paddle-add3-clip-div6"): (13, """
        a = Add(h, three)
        c = Clip(a, zero, six)
        q = Mul(h, c)
        z = Div(q, six)"""),
    ("HardSwish", "relu6"): (13, """
        a = Add(three, h)
        r = Relu(a)
        c = Min(r, six)
        k = Div(c, six)
        z = Mul(k, h)"""),
    ("Mish", "softplus"): (13, """
        sp = Softplus(h)
        t = Tanh(sp)
        z = Mul(h, t)"""),
    ("Mish", "log1p-exp"): (13, """
        e = Exp(h)
        a = Add(e, one)
        sp = Log(a)
        t = Tanh(sp)
        z = Mul(t, h)"""),
    ("DecomposedSoftmax", "reducemax"): (18, """
        mx = ReduceMax(h, axes)
        d = Sub(h, mx)
        e = Exp(d)
        s = ReduceSum(e, axes)
        z = Div(e, s)"""),
    ("DecomposedSoftmax", "no-max"): (13, """
        e = Exp(h)
        s = ReduceSum(e, axes)
        z = Div(e, s)"""),
    ("RMSNorm", "llama"): (18, """
        p = Pow(h, two)
        v = ReduceMean(p, axes)
        ve = Add(v, eps)
        s = Sqrt(ve)
        r = Reciprocal(s)
        n0 = Mul(h, r)
        z = Mul(gamma, n0)"""),
    ("L2Norm", "max-eps"): (13, """
        p = Mul(h, h)
        s = ReduceSum(p, axes)
        q = Sqrt(s)
        c = Max(q, eps)
        z = Div(h, c)"""),
    ("L2Norm", "lpnormalization"): (13, """
        z = LpNormalization <axis=-1, p=2> (h)"""),
}


def form_model(kind: str, form: str, seed: int = 0) -> onnx.ModelProto:
    opset, body = FORMS[(kind, form)]
    rng = np.random.default_rng(seed)
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N,4,{D}] x) => (float[N,4,8] y) {{
        h = MatMul(x, W1)
        {body}
        y = MatMul(z, W2)
    }}"""
    consts = {**C, "W1": rng.normal(0, 0.5, (D, D)).astype(F32), "W2": rng.normal(0, 0.3, (D, 8)).astype(F32),
              "gamma": rng.uniform(0.5, 1.5, D).astype(F32), "beta": rng.normal(0, 0.3, D).astype(F32)}
    words = set(text.replace("(", " ").replace(",", " ").replace(")", " ").split())
    model = parse_unnamed(text, **{k: v for k, v in consts.items() if k in words})
    name_nodes(model)
    return onnx.shape_inference.infer_shapes(model)


def block_nodes(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node if n.op_type != "MatMul"}


def internal_tensors(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node if n.op_type != "MatMul" for o in n.output} - {"z"}


def qdq_tensors(model) -> set[str]:
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def calib(rng, n=8):
    return [{"x": rng.normal(0, 1, (4, 4, D)).astype(F32)} for _ in range(n)]


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("kind,form", list(FORMS))
def test_form_is_one_block(kind, form):
    model = form_model(kind, form)
    blocks = find_blocks(GraphIndex.build(model))
    assert [(b.kind, set(b.nodes), b.inputs, b.output) for b in blocks] == [(kind, block_nodes(model), ("h",), "z")]
    assert blocks[0].internal == internal_tensors(model)


@pytest.mark.parametrize("kind,form", list(FORMS))
def test_ort_cpu_quantizes_the_form_at_its_boundary_only(kind, form, tmp_path):
    """One unit (the ort-cpu preset's policy for every kind but SiLU): no Q/DQ inside, the output quantized for the
    next MatMul. SiLU stays op by op (QLinearSigmoid + QLinearMul: an integer chain ORT runs)."""
    rng = np.random.default_rng(1)
    model = form_model(kind, form)
    res = quantize(model, calib(rng), QuantConfig(target="ort-cpu"), output_dir=tmp_path)
    q = qdq_tensors(res.model)
    assert "z" in q  # the block's output, read by the second MatMul
    assert [p["kind"] for p in res.plan.patterns] == [kind]
    policy = TARGETS["ort-cpu"].patterns.get(kind)
    if policy is not None and not policy.qdq_inside:
        assert not q & internal_tensors(model), sorted(q & internal_tensors(model))  # nothing inside the block
        assert {res.plan.nodes[n].status for n in block_nodes(model)} == {"fused"}
        assert {res.plan.nodes[n].pattern for n in block_nodes(model)} == {kind}
    else:
        assert kind == "SiLU" and internal_tensors(model) <= q
    x = rng.normal(0, 1, (16, 4, D)).astype(F32)
    assert cosine(run(model, {"x": x})[0], run(res.model, {"x": x})[0]) > 0.995


@pytest.mark.parametrize("target", ["tensorrt", "qnn"])
@pytest.mark.parametrize("kind,form", [("LayerNorm", "jax2tf"), ("GELU", "jax2tf-tanh"), ("RMSNorm", "llama"),
                                       ("DecomposedSoftmax", "reducemax"), ("Mish", "softplus")])
def test_other_targets_follow_their_preset(kind, form, target, tmp_path):
    """TensorRT keeps every recognised block whole; QNN maps the normalisations/GELU/Softmax to one op reading
    quantized inputs and runs Mish op by op (Tanh/Softplus/Mul on integers)."""
    rng = np.random.default_rng(2)
    model = form_model(kind, form)
    res = quantize(model, calib(rng), QuantConfig(target=target), output_dir=tmp_path)
    q = qdq_tensors(res.model)
    policy = TARGETS[target].patterns.get(kind)
    if policy is not None and not policy.qdq_inside:
        assert not q & internal_tensors(model)
        assert ("h" in q) == (policy.inputs == "all")
    else:
        assert q & internal_tensors(model)


def test_a_form_with_the_wrong_constant_is_not_a_block():
    """Math, not shape: 0.5 * x * (1 + tanh(0.8 * (x + 0.3 x^3))) is not GELU (nor any other block)."""
    model = form_model("GELU", "jax2tf-tanh")
    for t in model.graph.initializer:
        if t.name == "c1":
            t.CopyFrom(onnx.numpy_helper.from_array(np.array(0.3, F32), "c1"))
    assert [b.kind for b in find_blocks(GraphIndex.build(model))] == ["residual_add"]  # h + 0.3 h^3: an Add


def test_the_same_math_before_the_change_quantized_inside(tmp_path, monkeypatch):
    """What the planner did with the jax2tf LayerNorm before: Q/DQ inside (the pattern table emptied shows it)."""
    monkeypatch.setitem(TARGETS, "ort-cpu", dataclasses.replace(TARGETS["ort-cpu"], patterns={}))
    model = form_model("LayerNorm", "jax2tf")
    res = quantize(model, calib(np.random.default_rng(1)), QuantConfig(target="ort-cpu"), output_dir=tmp_path)
    assert len(qdq_tensors(res.model) & internal_tensors(model)) >= 5


def test_trained_jax2tf_classifier_keeps_its_predictions(tmp_path):
    """A classifier trained here on scikit-learn's real digits, written as jax2tf -> tf2onnx writes flax
    (models/digits_jax_mlp.py: two LayerNorms as ReduceSum * 1/N, E[x^2] - E[x]^2, Max, Sqrt + Reciprocal; a tanh
    GELU with x * (x * x)). All-INT8 top-1 agreement with FP32 on the 597 held-out digits: 1.000 with 8 QuantizeLinear
    (main 0ddc0c3 quantized inside the blocks, 33 QuantizeLinear: 1.000 as trained here, 0.9966 trained 2000 steps;
    this small network's ranges are tame, the real jax2tf classifier of issue 28 fell to 0.35)."""
    from .conftest import load_models_module

    mod = load_models_module("digits_jax_mlp")
    model, (x_test, y_test), x_cal = mod.build()
    ref = run(model, {"input": x_test})[0]
    assert (ref.argmax(1) == y_test).mean() > 0.9  # a real classifier
    res = quantize(model, [{"input": x_cal[i:i + 16]} for i in range(0, 64, 16)], QuantConfig(), output_dir=tmp_path)
    kinds = sorted(p["kind"] for p in res.plan.patterns if not p["qdq_inside"])
    assert kinds == ["GELU", "LayerNorm", "LayerNorm"]
    inside = {t for p in res.plan.patterns for n in p["nodes"] for t in
              next(k for k in model.graph.node if k.name == n).output if t != p["output"]}
    assert not qdq_tensors(res.model) & inside
    out = run(res.model, {"input": x_test})[0]
    agreement = float((out.argmax(1) == ref.argmax(1)).mean())
    print(f"\njax2tf digits MLP: all-INT8 top-1 agreement {agreement:.4f}, "
          f"{sum(n.op_type == 'QuantizeLinear' for n in res.model.graph.node)} QuantizeLinear")
    assert agreement >= 0.98
    # all-INT8 as ONNX Runtime runs it: each Dense (MatMul + bias Add, fused into a Gemm by ORT) before a LayerNorm or
    # GELU block keeps its output Q, so all 4 run as QGemm (without it 3 ran as float Gemms reading DQ inputs)
    from converter.ort_session import runtime_layers

    assert runtime_layers(res.model).float_layers == ()


def test_yolo_silu_is_recognised_and_stays_an_integer_chain(tmp_path):
    """A YOLO SiLU after a Conv is recognised (listed as a SiLU block) but kept op by op on ort-cpu: ORT runs
    QLinearConv -> QLinearSigmoid -> QLinearMul -> QLinearConv, the Mul's operands (x, sigmoid) each with its own
    scale. TensorRT fuses the whole SiLU into the Conv."""
    import onnxruntime as ort

    from .conftest import op_counts

    rng = np.random.default_rng(3)
    model = parse_unnamed("""
    <ir_version: 8, opset_import: ["" : 13]>
    m (float[N,3,8,8] x) => (float[N,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, W, B)
      s = Sigmoid(c)
      a = Mul(c, s)
      y = Conv <pads=[1,1,1,1]> (a, W2)
    }""", W=rng.normal(0, 2.0, (8, 3, 3, 3)).astype(F32), B=rng.normal(0, 1, 8).astype(F32),
        W2=rng.normal(0, 0.3, (4, 8, 3, 3)).astype(F32))
    name_nodes(model)
    data = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(F32)} for _ in range(8)]
    res = quantize(model, data, QuantConfig(), output_dir=tmp_path)
    assert [(p["kind"], p["qdq_inside"]) for p in res.plan.patterns] == [("SiLU", True)]
    assert {"c", "s", "a"} <= qdq_tensors(res.model)
    assert res.plan.encodings["c"] != res.plan.encodings["s"]  # the Mul's operands keep their own scales
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(res.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = op_counts(onnx.load(str(tmp_path / "opt.onnx")))
    assert ops.get("QLinearConv") == 2 and ops.get("QLinearMul") == 1 and ops.get("QLinearSigmoid") == 1
    x = rng.normal(0, 1, (8, 3, 8, 8)).astype(F32)
    assert cosine(run(model, {"x": x})[0], run(res.model, {"x": x})[0]) > 0.995
    trt = quantize(model, data, QuantConfig(target="tensorrt"), output_dir=tmp_path / "trt")
    assert not {"c", "s"} & qdq_tensors(trt.model) and "a" in qdq_tensors(trt.model)


def test_tail_after_the_last_conv_runs_in_float_and_the_conv_stays_integer(tmp_path):
    """A detector-like head: Conv -> Sigmoid (scores) and Conv -> Sigmoid/Mul/Add decode, Concat to the output. The
    float-tail rule leaves Sigmoid, decode and Concat float (plan.float_tail, with the reason), the Convs' outputs
    keep their Q so ORT still runs QLinearConv, and the output is closer to float than with the tail quantized."""
    import onnxruntime as ort

    from .conftest import op_counts

    rng = np.random.default_rng(4)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    m (float[N,3,8,8] x) => (float[N,6,8,8] y) {
      h = Conv <pads=[1,1,1,1]> (x, W)
      r = Relu(h)
      b = Conv (r, Wb)
      s = Conv (r, Ws)
      p = Sigmoid(s)
      bs = Sigmoid(b)
      b2 = Mul(bs, k)
      b3 = Add(b2, off)
      y = Concat <axis=1> (b3, p)
    }"""
    consts = dict(W=rng.normal(0, 0.5, (8, 3, 3, 3)).astype(F32), Wb=rng.normal(0, 0.5, (2, 8, 1, 1)).astype(F32),
                  Ws=rng.normal(0, 0.5, (4, 8, 1, 1)).astype(F32), k=np.array(40.0, F32), off=np.array(100.0, F32))
    model = parse_unnamed(text, **consts)
    name_nodes(model)
    calib_data = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(F32)} for _ in range(8)]
    res = quantize(model, calib_data, QuantConfig(), output_dir=tmp_path)
    tail = {t["op_type"] for t in res.plan.float_tail}
    assert tail == {"Sigmoid", "Mul", "Add", "Concat"} and all("last compute layer" in t["reason"]
                                                               for t in res.plan.float_tail)
    assert {res.plan.nodes[t["node"]].status for t in res.plan.float_tail} == {"float-tail"}
    q = qdq_tensors(res.model)
    assert {"b", "s"} <= q and not q & {"p", "bs", "b2", "b3", "y"}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(res.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert op_counts(onnx.load(str(tmp_path / "opt.onnx"))).get("QLinearConv") == 3
    # the same model with the rule off (the tail quantized, the Concat's 0..1 scores sharing the boxes' range)
    x = rng.normal(0, 1, (16, 3, 8, 8)).astype(F32)
    ref = run(model, {"x": x})[0]
    err_tail = np.abs(run(res.model, {"x": x})[0] - ref)[:, 2:].max()
    import pytest as _pytest
    with _pytest.MonkeyPatch.context() as mp:
        mp.setitem(TARGETS, "ort-cpu", dataclasses.replace(TARGETS["ort-cpu"], float_tail=False))
        whole = quantize(model, calib_data, QuantConfig(max_shared_scale_loss_bits=None), output_dir=tmp_path / "w")
    err_whole = np.abs(run(whole.model, {"x": x})[0] - ref)[:, 2:].max()
    print(f"\nscore max error: float tail {err_tail:.4f}, tail quantized {err_whole:.4f}")
    assert err_tail < 0.1 < err_whole  # scores: float tail vs quantized in the boxes' shared range


def test_torch_normalize_with_expand_is_an_l2norm():
    """torch.nn.functional.normalize as TorchScript exports it (sentence-transformers' last step):
    ReduceL2 -> Clip(min=eps) -> Expand(Shape(x)) -> Div(x, .). The Expand's shape is structure, not data."""
    rng = np.random.default_rng(5)
    model = parse_unnamed(f"""
    <ir_version: 8, opset_import: ["" : 14]>
    g (float[N,{D}] x) => (float[N,8] y) {{
        h = MatMul(x, W1)
        n = ReduceL2 <axes=[1], keepdims=1> (h)
        c = Clip(n, eps)
        s = Shape(h)
        e = Expand(c, s)
        z = Div(h, e)
        y = MatMul(z, W2)
    }}""", W1=rng.normal(0, 0.5, (D, D)).astype(F32), W2=rng.normal(0, 0.3, (D, 8)).astype(F32), eps=C["eps"])
    name_nodes(model)
    model = onnx.shape_inference.infer_shapes(model)
    [b] = find_blocks(GraphIndex.build(model))
    assert (b.kind, b.inputs, b.output) == ("L2Norm", ("h",), "z")
    assert {n for n in b.nodes} == {n.name for n in model.graph.node if n.op_type in ("ReduceL2", "Clip", "Expand",
                                                                                      "Div")}


@pytest.mark.parametrize("kind,form", [("LayerNorm", "paddle2onnx"), ("LayerNorm", "jax2tf"), ("GELU", "jax2tf-tanh"),
                                       ("RMSNorm", "llama"), ("DecomposedSoftmax", "reducemax"),
                                       ("L2Norm", "max-eps")])
def test_forms_are_recognised_without_shapes(kind, form):
    """Shape inference often stops at a dynamic Reshape (PP-OCRv4's SVTR LayerNorms, paddle2onnx): the math is
    checked on a shape guessed from the reduction axes and the constants (gamma's length, a mean's 1/N)."""
    model = form_model(kind, form)
    del model.graph.value_info[:]
    idx = GraphIndex.build(model)
    assert idx.shape.get("h") is None
    [b] = [b for b in find_blocks(idx) if b.kind != "residual_add"]
    assert (b.kind, set(b.nodes), b.inputs, b.output) == (kind, block_nodes(model), ("h",), "z")
