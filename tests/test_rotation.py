"""Stream rotation (converter/quant/rotation.py): which streams it finds, that FP32 is unchanged, and that 4-bit
weights lose less through it, measured in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from converter import QuantConfig, apply_encodings, quantize
from converter.quant.rotation import linear_streams, rotate_streams

from .conftest import parse


def stream_model(seed: int = 0, tail: str = "") -> onnx.ModelProto:
    """Stem Conv + Relu, a 3x3 Conv writing a 16-channel stream, two inverted-residual blocks adding to it (expand
    1x1 + Relu, depthwise 3x3 + Relu, project 1x1), a 3x3 head Conv reading it, pooling and a Gemm. The stream's
    writers have heavy-tailed rows (a few large weights each), as trained project Convs do. ``tail`` is added to
    the graph body (a variant's extra node)."""
    rng = np.random.default_rng(seed)

    def w(*shape, heavy=False):
        fan_in = int(np.prod(shape[1:]))
        v = rng.normal(0, 1 / np.sqrt(fan_in), shape)
        if heavy:  # two weights per output channel 6x the rest
            rows = v.reshape(shape[0], -1)
            for r in rows:
                r[rng.choice(len(r), 2, replace=False)] *= 6
            v = rows.reshape(shape)
        return v.astype(np.float32)

    def b(n):
        return rng.normal(0, 0.1, n).astype(np.float32)

    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,10] y) {{
      s = Conv <pads: ints = [1, 1, 1, 1]> (x, W0, B0)
      r0 = Relu(s)
      t0 = Conv <pads: ints = [1, 1, 1, 1]> (r0, WS, BS)
      e1 = Conv (t0, E1, BE1)
      q1 = Relu(e1)
      d1 = Conv <pads: ints = [1, 1, 1, 1], group: int = 32> (q1, D1, BD1)
      u1 = Relu(d1)
      p1 = Conv (u1, P1, BP1)
      t1 = Add(p1, t0)
      e2 = Conv (t1, E2, BE2)
      q2 = Relu(e2)
      d2 = Conv <pads: ints = [1, 1, 1, 1], group: int = 32> (q2, D2, BD2)
      u2 = Relu(d2)
      p2 = Conv (u2, P2, BP2)
      t2 = Add(t1, p2)
      h = Conv <pads: ints = [1, 1, 1, 1]> (t2, WH, BH)
      rh = Relu(h)
      gp = GlobalAveragePool(rh)
      f = Flatten(gp)
      y = Gemm <transB: int = 1> (f, F, FB)
      {tail}
    }}""", W0=w(16, 3, 3, 3), B0=b(16), WS=w(16, 16, 3, 3, heavy=True), BS=b(16), E1=w(32, 16, 1, 1), BE1=b(32),
                 D1=w(32, 1, 3, 3), BD1=b(32), P1=w(16, 32, 1, 1, heavy=True), BP1=b(16), E2=w(32, 16, 1, 1),
                 BE2=b(32), D2=w(32, 1, 3, 3), BD2=b(32), P2=w(16, 32, 1, 1, heavy=True), BP2=b(16),
                 WH=w(24, 16, 3, 3), BH=b(24), F=w(10, 24), FB=b(10))


def batches(seed: int, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.normal(0, 1, (16, 3, 1, 1)) + 0.5 * rng.normal(0, 1, (16, 3, 8, 8))).astype(np.float32)}
            for _ in range(n)]


def run(model, feed) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_the_stream_is_found_with_its_writers_and_readers():
    (stream,) = linear_streams(stream_model())
    assert stream.channels == 16
    assert stream.tensors == ["t0", "p1", "t1", "p2", "t2"]
    assert len(stream.writers) == 3 and len(stream.readers) == 3  # 3x3 + two project Convs; two expands + 3x3 head


def test_streams_that_cannot_turn_are_left_alone():
    # a Relu reading the stream: an activation does not commute with a rotation
    assert linear_streams(stream_model(tail="z = Relu(t1)")) == []
    m = stream_model()
    m.graph.output.append(onnx.helper.make_tensor_value_info("t1", onnx.TensorProto.FLOAT, None))
    assert linear_streams(m) == []  # a graph output would change


def test_a_depthwise_reader_keeps_the_stream_as_it_is():
    m = stream_model()
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((16, 1, 1, 1), np.float32), "DX"))
    m.graph.node.append(onnx.helper.make_node("Conv", ["t2", "DX"], ["z"], group=16))
    m.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None))
    assert linear_streams(m) == []


def test_rotation_keeps_fp32_and_lowers_the_weight_error_it_chose_by():
    m = stream_model()
    x = batches(9, 1)[0]
    before = run(m, x)
    result = rotate_streams(m, batches(1, 2), ["CPUExecutionProvider"], bits=4, per_channel=True)
    (s,) = result.streams
    assert s.rotated and s.error_after < 0.9 * s.error_before
    np.testing.assert_allclose(run(m, x), before, rtol=1e-4, atol=1e-4)
    # the same seed gives the same rotation
    again = stream_model()
    rotate_streams(again, batches(1, 2), ["CPUExecutionProvider"], bits=4, per_channel=True)
    assert all(a.raw_data == b.raw_data for a, b in zip(m.graph.initializer, again.graph.initializer))


def test_no_candidate_leaves_the_model_as_it_is():
    m = stream_model()
    before = m.SerializeToString()
    result = rotate_streams(m, batches(1, 2), ["CPUExecutionProvider"], bits=4, candidates=0)
    assert not result.streams[0].rotated and m.SerializeToString() == before


def _config(**kw) -> QuantConfig:
    return QuantConfig(**{"weight_bits": 4, "threads": 1, "fast_bias_correction": False, "smoothquant": False,
                          "max_latency_ratio": float("inf"), **kw})


def test_rotated_4bit_model_is_closer_to_fp32_on_held_out_inputs(tmp_path):
    """Nearest rounding, 4-bit per-channel weights, 8-bit activations: the rotated model's held-out output error
    against FP32 is lower than the unrotated one's; the float model written beside it gives FP32's outputs."""
    model, calib, held = stream_model(1), batches(1), batches(7, 2)  # seeds 0-3: 0.74, 0.52, 0.75, 0.53x
    ref = np.concatenate([run(model, h) for h in held])

    def error(res) -> float:
        return float(np.mean((np.concatenate([run(res.model_path, h) for h in held]) - ref) ** 2))

    plain = quantize(model, calib, _config(), tmp_path / "plain", "m")
    turned = quantize(model, calib, _config(rotation=True), tmp_path / "rot", "m")
    entry = turned.report["rotation"]
    assert entry["rotated"] == 1 and entry["streams"][0]["channels"] == 16
    assert "rotation" not in plain.report or not plain.report["rotation"]
    np.testing.assert_allclose(run(turned.report["outputs"]["float_model"], held[0]), run(model, held[0]),
                               rtol=1e-4, atol=1e-4)
    e_plain, e_rot = error(plain), error(turned)
    assert e_rot < 0.8 * e_plain, (e_rot, e_plain)
    # the encodings name the turned model's weights: applied to the float model written beside them, they give the
    # QDQ model back
    again = apply_encodings(turned.report["outputs"]["float_model"], turned.encodings_path, tmp_path / "again.onnx")
    assert again.SerializeToString() == onnx.load(str(turned.model_path)).SerializeToString()
