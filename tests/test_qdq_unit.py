"""QDQ placement on tiny graphs: weights, biases, fused groups, shared scales, targets."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from converter import QuantConfig, quantize
from converter.quant.encoding import Encoding, encoding_from_range

from .conftest import op_counts, parse, run

CNN = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N,3,8,8] x) => (float[N,4] y) {
  c = Conv <pads=[1,1,1,1]> (x, W, B)
  r = Relu(c)
  p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)
  f = Flatten(p)
  y = Gemm <transB=1> (f, W2, B2)
}
"""


def cnn_model(rng):
    return parse(CNN, W=rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32),
                 B=rng.normal(0, 0.1, 6).astype(np.float32),
                 W2=rng.normal(0, 0.2, (4, 96)).astype(np.float32), B2=rng.normal(0, 0.1, 4).astype(np.float32))


def calib(rng, shape, n=16):
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def consumers(model, tensor):
    return [n for n in model.graph.node if tensor in n.input]


def producer(model, tensor):
    return next(n for n in model.graph.node if tensor in n.output)


def init(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def dq_of(model, tensor):
    """The DequantizeLinear producing ``<tensor>_dequantized``."""
    return producer(model, f"{tensor}_dequantized")


def cosine(a, b):
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def optimized_ops(model, tmp_path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(tmp_path / "opt.onnx")))


def test_cnn_ort_cpu_placement(tmp_path, rng):
    model = cnn_model(rng)
    res = quantize(model, calib(rng, (2, 3, 8, 8)), QuantConfig(target="ort-cpu"), output_dir=tmp_path, name="cnn")
    q = res.model
    # Conv -> Relu stay one group: the Conv output goes straight into Relu, no Q/DQ between.
    assert [n.op_type for n in consumers(q, "c")] == ["Relu"]
    # Conv weight: int8, per output channel (axis 0), zero point 0, 6 scales.
    w_dq = dq_of(q, "W")
    assert init(q, w_dq.input[0]).dtype == np.int8
    assert init(q, w_dq.input[1]).shape == (6,) and not init(q, w_dq.input[2]).any()
    assert next(a.i for a in w_dq.attribute if a.name == "axis") == 0
    # Gemm with transB=1: weight (4, 96) per row, axis 0.
    g_dq = dq_of(q, "W2")
    assert init(q, g_dq.input[1]).shape == (4,)
    assert next(a.i for a in g_dq.attribute if a.name == "axis") == 0
    # Bias: int32 with scale = input scale x weight scale, exactly.
    b_dq = dq_of(q, "B")
    assert init(q, b_dq.input[0]).dtype == np.int32
    s_in = init(q, "x_scale")
    np.testing.assert_array_equal(init(q, b_dq.input[1]), (s_in * init(q, w_dq.input[1])).astype(np.float32))
    # MaxPool and Flatten share the Relu output's encoding (data movement: same scale and zero point).
    enc = res.plan.encodings
    assert enc["p"] == enc["r"] and enc["f"] == enc["r"]
    assert res.plan.tensors["p"].group == "r"
    # Activations are uint8 asymmetric for ort-cpu.
    assert init(q, "r_zero_point").dtype == np.uint8
    # ONNX Runtime fuses every Conv and Gemm into integer kernels.
    ops = optimized_ops(q, tmp_path)
    assert ops.get("QLinearConv") == 1 and ops.get("QGemm") == 1 and "Conv" not in ops and "Gemm" not in ops
    # And the numbers stay close to float.
    x = rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    assert cosine(run(model, {"x": x})[0], run(q, {"x": x})[0]) > 0.995


def test_tensorrt_is_int8_symmetric_inputs_only(tmp_path, rng):
    model = cnn_model(rng)
    res = quantize(model, calib(rng, (2, 3, 8, 8)), QuantConfig(target="tensorrt"), output_dir=tmp_path, name="trt")
    q = res.model
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.dtype in (np.int8, np.int32) and not zp.any(), n.name
    # No Q/DQ on the Relu output feeding MaxPool's output path beyond what the Gemm input needs, and
    # none between Conv and its fused Relu.
    assert [n.op_type for n in consumers(q, "c")] == ["Relu"]
    assert "y_QuantizeLinear" not in {n.name for n in q.graph.node}  # graph output not quantized
    assert "x_QuantizeLinear" in {n.name for n in q.graph.node}


def test_gemm_without_transb_and_matmul_axes(tmp_path, rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,5,8] x) => (float[N,5,3] y) {
      h = MatMul(x, Wm)
      a = Add(h, Bm)
      f = Reshape(a, shp)
      g2 = Gemm(f, Wg, Bg)
      y = Reshape(g2, shp2)
    }""", Wm=rng.normal(0, 0.3, (8, 6)).astype(np.float32), Bm=rng.normal(0, 0.1, 6).astype(np.float32),
        shp=np.array([-1, 6], np.int64), Wg=rng.normal(0, 0.3, (6, 3)).astype(np.float32),
        Bg=rng.normal(0, 0.1, 3).astype(np.float32), shp2=np.array([-1, 5, 3], np.int64))
    res = quantize(model, calib(rng, (2, 5, 8)), QuantConfig(), output_dir=tmp_path)
    q = res.model
    assert next(a.i for a in dq_of(q, "Wm").attribute if a.name == "axis") == 1  # (K, N): per column
    assert init(q, dq_of(q, "Wm").input[1]).shape == (6,)
    assert next(a.i for a in dq_of(q, "Wg").attribute if a.name == "axis") == 1  # transB=0: (K, N)
    # MatMul -> bias Add is one group: no Q/DQ on the MatMul output.
    assert [n.op_type for n in consumers(q, "h")] == ["Add"]
    x = rng.normal(0, 1, (4, 5, 8)).astype(np.float32)
    assert cosine(run(model, {"x": x})[0], run(q, {"x": x})[0]) > 0.99


def test_conv_transpose_uses_axis_1(tmp_path, rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    ct (float[N,4,5,5] x) => (float[N,3,10,10] y) {
      y = ConvTranspose <strides=[2,2]> (x, W, B)
    }""", W=rng.normal(0, 0.3, (4, 3, 2, 2)).astype(np.float32), B=rng.normal(0, 0.1, 3).astype(np.float32))
    res = quantize(model, calib(rng, (2, 4, 5, 5)), QuantConfig(), output_dir=tmp_path)
    dq = dq_of(res.model, "W")
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    assert init(res.model, dq.input[1]).shape == (3,)
    assert init(res.model, dq_of(res.model, "B").input[1]).shape == (3,)
    x = rng.normal(0, 1, (2, 4, 5, 5)).astype(np.float32)
    assert cosine(run(model, {"x": x})[0], run(res.model, {"x": x})[0]) > 0.99


def test_constant_node_weights_are_quantized(tmp_path, rng):
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    k (float[N,3,6,6] x) => (float[N,4,4,4] y) {
      y = Conv(x, W)
    }""")
    const = onnx.helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w))
    model.graph.node.insert(0, const)
    onnx.checker.check_model(model)
    res = quantize(model, calib(rng, (1, 3, 6, 6)), QuantConfig(), output_dir=tmp_path)
    q = res.model
    assert "Constant" not in op_counts(q)
    assert init(q, dq_of(q, "W").input[0]).dtype == np.int8
    assert res.plan.tensors["W"].role == "weight"


def test_concat_inputs_share_one_encoding(tmp_path, rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    cc (float[N,2,4,4] x) => (float[N,2,4,4] y) {
      a = Conv(x, Wa)
      b = Conv(x, Wb)
      c = Concat <axis=1> (a, b)
      y = Conv(c, Wc)
    }""", Wa=rng.normal(0, 0.1, (3, 2, 1, 1)).astype(np.float32),
        Wb=rng.normal(0, 0.2, (3, 2, 1, 1)).astype(np.float32),  # ranges alike (test_scale_groups.py: unalike)
        Wc=rng.normal(0, 0.3, (2, 6, 1, 1)).astype(np.float32))  # a Conv reads the Concat (else: a float tail)
    res = quantize(model, calib(rng, (1, 2, 4, 4)), QuantConfig(), output_dir=tmp_path)
    enc = res.plan.encodings
    assert enc["a"] == enc["b"] == enc["c"] and res.plan.split_groups == []
    # the shared range covers the wider branch
    x = rng.normal(0, 1, (4, 2, 4, 4)).astype(np.float32)
    assert cosine(run(model, {"x": x})[0], run(res.model, {"x": x})[0]) > 0.99


def test_graph_output_keeps_its_name(tmp_path, rng):
    model = cnn_model(rng)
    res = quantize(model, calib(rng, (2, 3, 8, 8)), QuantConfig(), output_dir=tmp_path)
    assert [o.name for o in res.model.graph.output] == ["y"]
    assert producer(res.model, "y").op_type == "DequantizeLinear"


def test_old_opset_is_upgraded(tmp_path, rng):
    model = parse("""
    <ir_version: 6, opset_import: ["" : 11]>
    o (float[N,3,4,4] x) => (float[N,2,4,4] y) {
      c = Conv(x, W)
      y = Relu(c)
    }""", W=rng.normal(0, 0.3, (2, 3, 1, 1)).astype(np.float32))
    res = quantize(model, calib(rng, (1, 3, 4, 4)), QuantConfig(), output_dir=tmp_path)
    assert res.report["preprocess"]["upgrade_opset"] == 1
    assert next(i.version for i in res.model.opset_import if i.domain == "") >= 13


@pytest.mark.parametrize("signed,symmetric", [(False, False), (True, True), (True, False)])
def test_encoding_matches_onnx_quantize_linear(rng, signed, symmetric):
    x = rng.normal(0.5, 2, (3, 50)).astype(np.float32)
    enc = encoding_from_range(x.min(), x.max(), 8, signed, symmetric)
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    q (float[3,50] x) => ({'int8' if signed else 'uint8'}[3,50] y) {{
      y = QuantizeLinear(x, s, z)
    }}""", s=enc.scale_array().reshape(()), z=enc.zero_point_array().reshape(()))
    np.testing.assert_array_equal(run(model, {"x": x})[0], enc.quantize(x))
    # the representable range covers the data and includes 0 exactly
    assert min(enc.mins()) <= x.min() + enc.scale[0] and max(enc.maxs()) >= x.max() - enc.scale[0]
    assert enc.dequantize(enc.quantize(np.zeros(1, np.float32)))[0] == 0.0


def test_aimet_offset_convention():
    # ENCODINGS.md example: scale 0.018501..., offset -114 -> uint8 zero point 114.
    enc = Encoding.from_aimet(8, False, [0.018501389771699905], [-114])
    assert enc.zero_point == (114,) and not enc.signed
    assert enc.offsets() == (-114,)
    assert abs(enc.mins()[0] - (-114 * 0.018501389771699905)) < 1e-6
    sym = encoding_from_range(-1.0, 2.0, 8, True, True)
    assert sym.zero_point == (0,) and sym.offsets() == (-128,)
