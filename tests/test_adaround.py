"""AdaRound: better than nearest rounding at 4 bits on held-out data, weights on the encodings' grid, clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from converter import QuantConfig, quantize
from converter.cli import main
from converter.errors import ConfigError
from converter.encodings_file import apply_encodings
from converter.quant.encodings_io import read_encodings
from converter.quant.qdq import dequantized_values

from .conftest import parse, run


def layer_model():
    """Conv (4 -> 16, 3x3) -> Relu -> depthwise Conv -> Gemm: weights of widely different channel ranges."""
    rng = np.random.default_rng(0)
    return parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4,8,8] x) => (float[N,10] y) {
      h = Conv <pads: ints = [1, 1, 1, 1]> (x, W, B)
      r = Relu(h)
      d = Conv <pads: ints = [1, 1, 1, 1], group: int = 16> (r, D, DB)
      p = GlobalAveragePool(d)
      f = Flatten(p)
      y = Gemm <transB: int = 1> (f, F, FB)
    }""", W=(rng.normal(0, 1, (16, 4, 3, 3)) * rng.uniform(0.1, 2, (16, 1, 1, 1))).astype(np.float32),
                 B=rng.normal(0, 0.1, 16).astype(np.float32),
                 D=rng.normal(0, 1, (16, 1, 3, 3)).astype(np.float32), DB=np.zeros(16, np.float32),
                 F=rng.normal(0, 1, (10, 16)).astype(np.float32), FB=np.zeros(10, np.float32))


def batches(seed, n=4):
    """Inputs correlated across a patch, as images are (with independent inputs nearest rounding is already the
    best a layer can do: its output error is then the sum of independent rounding errors)."""
    rng = np.random.default_rng(seed)
    return [{"x": (rng.normal(0, 1, (16, 4, 1, 1)) + 0.3 * rng.normal(0, 1, (16, 4, 8, 8))).astype(np.float32)}
            for _ in range(n)]


def config(iterations=300, **kw):
    return QuantConfig(weight_bits=4, adaround_iterations=iterations, threads=1, **kw)


def test_adaround_beats_nearest_rounding_at_4_bits(tmp_path):
    model = layer_model()
    held_out = batches(7, 1)[0]
    ref = run(model, held_out)[0]
    err = {}
    for on in (False, True):
        r = quantize(model, batches(1), config(adaround=on), output_dir=tmp_path / str(on), name="m")
        err[on] = float(np.mean((run(r.model_path, held_out)[0] - ref) ** 2))
    assert err[True] < 0.85 * err[False], err  # measured on data the optimization did not see
    layers = r.report["adaround"]["layers"]
    assert [x["node"] for x in layers] == ["Conv_0", "Conv_2", "Gemm_5"]
    assert all(x["loss_adaround"] < x["loss_nearest"] and x["kept"] for x in layers), layers
    assert layers[0]["loss_adaround"] < layers[0]["loss_nearest"] / 2, layers  # its input is float: all its own
    assert r.report["adaround"]["iterations"] == 300 and all(x["seconds"] > 0 for x in layers)
    assert sum(x["flipped_fraction"] for x in layers) > 0  # some weights really rounded the other way


def test_adarounded_weights_lie_on_the_encodings_grid(tmp_path):
    r = quantize(layer_model(), batches(1), config(50, adaround=True, bias_correction=True), output_dir=tmp_path,
                 name="m")
    float_path = r.report["outputs"]["float_model"]  # the float model with the AdaRounded weights
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(float_path).graph.initializer}
    qdq = onnx.load(r.model_path)
    used = dequantized_values(qdq)
    enc = read_encodings(r.encodings_path)
    for w in ("W", "D", "F"):
        e = enc.params[w]
        assert e.bitwidth == 4 and e == r.plan.encodings[w]
        q = e.quantize(floats[w])
        np.testing.assert_array_equal(e.dequantize(q), floats[w])  # exactly on the grid
        np.testing.assert_array_equal(used[f"{w}_dequantized"], floats[w])  # what the QDQ model computes with
    # the encodings applied to that float model give the same QDQ model
    again = apply_encodings(float_path, r.encodings_path, tmp_path / "again.onnx")
    assert again.SerializeToString() == qdq.SerializeToString()
    assert "bias_correction" in r.report  # ran after AdaRound, on its weights
    # the layers bias correction corrects afterwards were compared without their mean error
    corrected = {c["node"] for c in r.report["bias_correction"]["layers"]}
    assert corrected and all(x["centered"] == (x["node"] in corrected) for x in r.report["adaround"]["layers"])


def test_each_layer_reconstructs_its_float_weights_on_its_quantized_input(tmp_path):
    """The search's loss of a layer is its float weights' output against its rounded weights' on the input the QDQ
    model gives it (earlier layers rounded, activations quantized), Relu applied to both: each layer's nearest loss
    in the report is that, computed here from the written QDQ model's captured inputs (all 4096 rows are cached).
    A target from the float model's own activations (which the earlier layers' rounding and the activation
    quantization both move) gives other losses from the second layer on."""
    import torch

    from converter.calib.runner import capture
    from converter.quant.adaround import _Layer, _product, _sample_rows

    model = layer_model()
    data = batches(1)
    r = quantize(model, data, config(0, adaround=True), output_dir=tmp_path, name="m")
    qdq = onnx.load(r.model_path)
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    enc = read_encodings(r.encodings_path)
    q_nodes = {n.name: n for n in qdq.graph.node}
    layers = {x["node"]: x for x in r.report["adaround"]["layers"]}
    for node, w_name, relu in (("Conv_0", "W", True), ("Conv_2", "D", False)):
        n = q_nodes[node]
        inputs = np.concatenate([c[n.input[0]] for c in capture(qdq, [n.input[0]], data, ["CPUExecutionProvider"])])
        w = floats[w_name]
        layer = _Layer(n, w_name, None, groups=16 if w_name == "D" else 1, weight_shape=w.shape)
        rows, _ = _sample_rows(layer, inputs, 10**6, np.random.default_rng(0), w.shape[2:])
        assert len(rows) == 4096 == layers[node]["rows"]
        xt = torch.from_numpy(np.ascontiguousarray(rows.transpose(1, 0, 2)))
        nearest = enc.params[w_name].dequantize(enc.params[w_name].quantize(w)).astype(np.float32)
        bias = floats["B" if w_name == "W" else "DB"]
        out_float = _product(layer, torch.from_numpy(w), xt).numpy() + bias
        out_nearest = _product(layer, torch.from_numpy(nearest), xt).numpy() + bias
        if relu:
            out_float, out_nearest = np.maximum(out_float, 0), np.maximum(out_nearest, 0)
        want = float(((out_nearest - out_float) ** 2).sum(1).mean())
        assert layers[node]["loss_nearest"] == pytest.approx(want, rel=1e-4), (node, layers[node], want)


def test_adaround_without_calibration_data_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        quantize(layer_model(), None, QuantConfig(adaround=True), output_dir=tmp_path, name="m")
    assert "adaround needs calibration data" in exc.value.message and "--calib" in exc.value.fix
    with pytest.raises(ConfigError, match="adaround_iterations must be >= 1"):
        QuantConfig(adaround=True, adaround_iterations=-1)
    with pytest.raises(ConfigError, match="adaround_search off"):
        QuantConfig(adaround=True, adaround_iterations=0, adaround_search=False)


def test_cli_adaround(tmp_path, capsys):
    onnx.save(layer_model(), tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, b in enumerate(batches(1, 2)):
        np.save(calib / f"{i}.npy", b["x"])
    rc = main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(calib), "--weight-bits", "4", "--adaround",
               "--adaround-iterations", "50", "--threads", "1", "--output-dir", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "m.report.json").read_text())
    assert report["config"]["adaround"] is True and report["config"]["adaround_iterations"] == 50
    assert len(report["adaround"]["layers"]) == 3


def test_adaround_with_block_wise_weights(tmp_path):
    """Block-wise scales (one per 32 input channels): AdaRound rounds on each block's own grid."""
    rng = np.random.default_rng(3)
    w = (rng.normal(0, 1, (64, 16)) * np.repeat(rng.uniform(0.05, 2, (2, 1)), 32, axis=0)).astype(np.float32)
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,64] x) => (float[N,16] y) {
      y = MatMul(x, W)
    }""", W=w)
    data = [{"x": (rng.normal(0, 1, (64, 1)) + 0.3 * rng.normal(0, 1, (64, 64))).astype(np.float32)}
            for _ in range(2)]
    held_out = {"x": (rng.normal(0, 1, (64, 1)) + 0.3 * rng.normal(0, 1, (64, 64))).astype(np.float32)}
    ref = run(model, held_out)[0]
    err = {}
    for on in (False, True):
        r = quantize(model, data, config(200, adaround=on, weight_block_size=32, target="qnn"),
                     output_dir=tmp_path / str(on), name="m")
        err[on] = float(np.mean((run(r.model_path, held_out)[0] - ref) ** 2))
    e = r.plan.encodings["W"]
    assert e.blocked and e.block_size == 32
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(r.report["outputs"]["float_model"]).graph.initializer}
    np.testing.assert_array_equal(e.dequantize(e.quantize(floats["W"])), floats["W"])  # on the blocks' grid
    assert err[True] < 0.85 * err[False], err  # measured on held-out data


def test_bias_correction_after_adaround_measures_against_the_float_weights(tmp_path):
    """AdaRound writes grid values over the float weights; bias correction after it must still compare with the
    float weights, or it sees no weight rounding at all and corrects nothing."""
    shifts = {}
    for on in (False, True):
        r = quantize(layer_model(), batches(1), config(50, adaround=on, bias_correction=True),
                     output_dir=tmp_path / str(on), name="m")
        shifts[on] = {c["node"]: c["mean_shift_before"] for c in r.report["bias_correction"]["layers"]}
    assert set(shifts[True]) == {"Conv_0", "Conv_2", "Gemm_5"}
    for node, before in shifts[False].items():
        # AdaRound reduces a layer's mean shift, but it does not remove it (measured: same order of magnitude)
        assert shifts[True][node] > 0.05 * before > 0, shifts


def _depthwise_layer(weights: np.ndarray):
    """A depthwise Conv (one 2x2 kernel per channel) as AdaRound sees it, 4-bit per-channel weights."""
    from onnx import helper

    from converter.quant.adaround import _Layer
    from converter.quant.encode import weight_encoding

    node = helper.make_node("Conv", ["x", "W"], ["y"], name="dw", group=len(weights))
    return _Layer(node, "W", weight_encoding(weights, 4, 0), groups=len(weights), weight_shape=weights.shape)


def test_local_search_reaches_the_exhaustive_optimum_of_a_small_depthwise_layer():
    """Four weights per channel: every rounding within one level of floor/ceil can be tried. The greedy search
    lands on (or next to) the best of them, far below nearest rounding's loss."""
    import itertools

    from converter.quant.adaround import local_search

    rng = np.random.default_rng(0)
    channels, n = 12, 4000
    w = rng.normal(0, 1, (channels, 1, 2, 2)).astype(np.float32)
    layer = _depthwise_layer(w)
    base = rng.normal(0, 1, (n, channels, 1))  # correlated taps, as neighbouring pixels are
    x = (base + 0.3 * rng.normal(0, 1, (n, channels, 4))).astype(np.float32)
    y = np.einsum("nck,ck->nc", x, w.reshape(channels, 4)).astype(np.float32)
    s = layer.enc.scale_array().reshape(channels, 1)
    wq = w.reshape(channels, 4)

    def loss(q):  # per channel
        return np.mean((np.einsum("nck,ck->nc", x, q * s) - y) ** 2, axis=0)

    nearest = layer.enc.quantize(w).reshape(channels, 4).astype(np.float64)
    found, _ = local_search(layer, w, x, y, nearest.reshape(w.shape), center=False)
    found = found.reshape(channels, 4)
    assert np.all(found >= layer.enc.qmin) and np.all(found <= layer.enc.qmax)
    floor = np.floor(wq / s)
    best = np.full(channels, np.inf)
    for combo in itertools.product([-1, 0, 1, 2], repeat=4):
        best = np.minimum(best, loss(np.clip(floor + np.array(combo), layer.enc.qmin, layer.enc.qmax)))
    assert loss(found).sum() <= 1.05 * best.sum(), (loss(found).sum(), best.sum())
    assert loss(found).sum() < 0.7 * loss(nearest).sum(), (loss(found).sum(), loss(nearest).sum())  # measured 0.53x


def test_local_search_scores_only_the_channels_still_moving():
    """The search's step scores only the output channels that moved at the step before (their losses are
    separate): the same moves, bit for bit, as scoring every channel at every step (written out here), at 4 and 8
    bits, with per-channel zero points and several groups."""
    from converter.quant.adaround import _descend

    def every_channel(h, bvec, s, qq, qmin, qmax, max_steps):
        hq = np.matmul(qq * s, h)
        quad = s * s * np.einsum("gkk->gk", h)[:, None, :]
        tiny = 1e-12 * quad.max(axis=-1)
        for _ in range(max_steps):
            lin = 2.0 * s * (hq - bvec)
            up = np.where(qq + 1 <= qmax, lin + quad, np.inf)
            down = np.where(qq - 1 >= qmin, quad - lin, np.inf)
            j_up, j_down = up.argmin(-1), down.argmin(-1)
            b_up = np.take_along_axis(up, j_up[..., None], -1)[..., 0]
            b_down = np.take_along_axis(down, j_down[..., None], -1)[..., 0]
            step, j = np.where(b_up <= b_down, 1.0, -1.0), np.where(b_up <= b_down, j_up, j_down)
            move = np.minimum(b_up, b_down) < -tiny
            if not move.any():
                break
            gi, oi = np.nonzero(move)
            qq[gi, oi, j[gi, oi]] += step[gi, oi]
            hq[gi, oi, :] += (step[gi, oi] * s[gi, oi, j[gi, oi]])[:, None] * h[gi, :, j[gi, oi]]
        return qq

    rng = np.random.default_rng(0)
    for groups, outputs, k, bits, steps in ((1, 40, 24, 4, 4096), (6, 3, 9, 4, 4096), (1, 30, 16, 8, 4096),
                                            (2, 20, 12, 8, 7)):
        x = rng.normal(0, 1, (groups, 300, k)) * rng.uniform(0.1, 3, k)
        h = np.matmul(x.transpose(0, 2, 1), x) / 300 + 1e-3 * np.eye(k)
        w = rng.normal(0, 0.1, (groups, outputs, k))
        s = np.broadcast_to(np.abs(w).max(-1, keepdims=True) / (2 ** (bits - 1) - 1), w.shape).copy()
        bvec = np.matmul(w, h) + rng.normal(0, 0.01, w.shape)
        zero = rng.integers(-2, 3, (groups, outputs, 1)) + np.zeros(w.shape)
        qmin, qmax = -2.0 ** (bits - 1) - zero, 2.0 ** (bits - 1) - 1 - zero
        start = np.clip(np.round(w / s), qmin, qmax)
        want = every_channel(h, bvec, s, start.copy(), qmin, qmax, steps)
        got = _descend(h, bvec, s, start.copy(), qmin, qmax, steps)
        assert not np.array_equal(want, start)
        np.testing.assert_array_equal(got, want)


def test_local_search_after_adaround_lowers_held_out_error(tmp_path):
    """The search starts from AdaRound's rounding and keeps a result only where its loss is lower: on held-out
    data the model's error falls well below AdaRound alone's (measured: 9.6 vs 27.5; nearest 39.9). With no Adam
    steps at all (iterations 0) the search alone is still far better than nearest rounding."""
    model = layer_model()
    held_out = batches(7, 1)[0]
    ref = run(model, held_out)[0]
    err, reports = {}, {}
    for name, cfg in (("adaround", config(300, adaround=True, adaround_search=False)),
                      ("adaround+search", config(300, adaround=True)), ("search", config(0, adaround=True)),
                      ("nearest", config())):
        r = quantize(model, batches(1), cfg, output_dir=tmp_path / name.replace("+", "_"), name="m")
        err[name] = float(np.mean((run(r.model_path, held_out)[0] - ref) ** 2))
        reports[name] = r.report.get("adaround")
    assert err["adaround+search"] < 0.6 * err["adaround"] < err["nearest"], err
    assert err["search"] < 0.5 * err["nearest"], err
    layers = reports["adaround+search"]["layers"]
    assert reports["adaround+search"]["search"] is True
    assert all("loss_search" not in x and x["chosen"] == "adaround" for x in reports["adaround"]["layers"])
    for x in layers:  # the lowest of the three is kept
        assert x["chosen"] == min(("nearest", "adaround", "search"), key=lambda c: x[f"loss_{c}"])
        assert x["search_damp"] in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    assert sum(x["chosen"] == "search" for x in layers) >= 2


@pytest.mark.parametrize("attrs, groups, dims", [
    ({"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, 1, 2),
    ({"strides": [2, 1], "pads": [0, 2, 1, 0], "dilations": [1, 2]}, 1, 2),
    ({"strides": [2, 2], "pads": [3, 0, 0, 2]}, 1, 2),  # pads past the kernel: the upsampled input is cropped
    ({"strides": [3, 2], "pads": [1, 0, 0, 1]}, 2, 2),
    ({"strides": [2], "pads": [1, 0], "output_padding": [1]}, 1, 1),
])
def test_conv_transpose_rows_reproduce_onnx_runtime(attrs, groups, dims):
    """AdaRound sees a ConvTranspose as a Conv over its zero-upsampled input with the kernel flipped: the rows it
    samples, multiplied by the weight matrix, give ONNX Runtime's ConvTranspose output at those positions."""
    from onnx import helper

    import torch

    from converter.quant.adaround import _Layer, _product, _sample_rows

    rng = np.random.default_rng(0)
    c_in, c_out, kernel = 4, 6, (3, 2)[:dims]
    w = rng.normal(0, 1, (c_in, c_out // groups, *kernel)).astype(np.float32)
    x = rng.normal(0, 1, (2, c_in, *(5, 4)[:dims])).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="ct", group=groups, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "W")])
    y = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": x})[0]
    layer = _Layer(node, "W", None, groups=groups, weight_shape=w.shape)
    assert layer.outputs == c_out
    px, where = _sample_rows(layer, x, 10**6, rng, kernel)
    py = y[where[0], :, where[1]] if dims == 1 else y[where[0], :, where[1], where[2]]  # ORT's output there
    assert len(px) == y.size // c_out  # every output position
    got = _product(layer, torch.from_numpy(w), torch.from_numpy(np.ascontiguousarray(px.transpose(1, 0, 2))))
    np.testing.assert_allclose(got.numpy(), py, rtol=1e-4, atol=1e-4)


def test_adaround_rounds_conv_transpose_weights(tmp_path):
    """A 4-bit decoder (Conv -> Relu -> ConvTranspose stride 2 -> Relu -> ConvTranspose): AdaRound takes the
    ConvTranspose layers too, and the output error on held-out data falls below nearest rounding's."""
    rng = np.random.default_rng(0)
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4,8,8] x) => (float[N,3,16,16] y) {
      h = Conv <pads: ints = [1, 1, 1, 1]> (x, W, B)
      r = Relu(h)
      u = ConvTranspose <strides: ints = [2, 2], pads: ints = [1, 1, 1, 1], output_padding: ints = [1, 1]> (r, T, TB)
      v = Relu(u)
      y = ConvTranspose <pads: ints = [1, 1, 1, 1]> (v, U, UB)
    }""", W=rng.normal(0, 0.5, (16, 4, 3, 3)).astype(np.float32), B=rng.normal(0, 0.1, 16).astype(np.float32),
                  T=(rng.normal(0, 0.3, (16, 8, 3, 3)) * rng.uniform(0.2, 2, (1, 8, 1, 1))).astype(np.float32),
                  TB=rng.normal(0, 0.1, 8).astype(np.float32),
                  U=rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), UB=np.zeros(3, np.float32))
    held_out = batches(7, 1)[0]
    ref = run(model, held_out)[0]
    err, reports = {}, {}
    for on in (False, True):
        r = quantize(model, batches(1), config(100, adaround=on), output_dir=tmp_path / str(on), name="m")
        err[on] = float(np.mean((run(r.model_path, held_out)[0] - ref) ** 2))
        reports[on] = r.report
    layers = reports[True]["adaround"]["layers"]
    transposed = [lay for lay in layers if lay["node"].startswith("ConvTranspose")]
    assert len(transposed) == 2, [lay["node"] for lay in layers]
    for lay in transposed:  # the layer's own reconstruction loss falls
        assert min(lay["loss_adaround"], lay.get("loss_search", np.inf)) < 0.8 * lay["loss_nearest"], lay
    assert err[True] < 0.6 * err[False], err  # measured 0.57 vs 1.86 (the ConvTranspose losses 0.69 -> 0.32 Adam
    # -> 0.22 search, 1.06 -> 0.71 -> 0.40)


def _output_error(model, path, data) -> float:
    """The output check's measure: sum (q - f)^2 / sum f^2 over the samples (one float output)."""
    num = den = 0.0
    for feeds in data:
        f, q = run(model, feeds)[0].astype(np.float64), run(path, feeds)[0].astype(np.float64)
        num, den = num + float(np.square(q - f).sum()), den + float(np.square(f).sum())
    return num / den


def test_centered_rounding_is_checked_at_the_model_outputs(tmp_path):
    """With bias correction after it, AdaRound's losses are centered; the technique checks that trust at the
    model's outputs (centered rounding + bias correction against nearest + bias correction) and keeps the better.
    The check's figure is the shipped model's error: bias correction runs next exactly as the check applied it."""
    model, data = layer_model(), batches(1)  # 4 x 16 = 64 samples: all of them checked
    r = quantize(model, data, config(0, adaround=True, bias_correction=True), output_dir=tmp_path / "c", name="m")
    check = r.report["adaround"]["check"]
    assert check["chosen"] == "centered" and set(check["output_error"]) == {"centered", "nearest"}, check
    errors = check["output_error"]
    assert 0 < errors["centered"] < errors["nearest"], errors  # the search + correction beats nearest + correction
    assert _output_error(model, r.model_path, data) == pytest.approx(errors["centered"], rel=1e-3)
    nearest = quantize(model, data, config(0, bias_correction=True), output_dir=tmp_path / "n", name="m")
    assert _output_error(model, nearest.model_path, data) == pytest.approx(errors["nearest"], rel=1e-3)
    plain = quantize(model, data, config(0, adaround=True), output_dir=tmp_path / "p", name="m")
    assert "check" not in plain.report["adaround"]  # nothing centered without bias correction: nothing to check


def test_a_centered_rounding_worse_than_nearest_is_rounded_again(tmp_path, monkeypatch):
    """Fault injected: the centered rounding comes back sign-flipped (on the grid, so it passes as a rounding).
    The check sees the larger output error, rounds again with plain losses, and the shipped model is the better
    of that and nearest rounding, as measured."""
    import converter.techniques.adaround as technique

    real = technique.adaround

    def sign_flipped_when_centered(model, plan, idx, *args, center=frozenset(), float_weights=None, **kw):
        out = real(model, plan, idx, *args, center=center, float_weights=float_weights, **kw)
        if center:
            for w, values in float_weights.items():
                enc = plan.encodings[w]
                idx.initializers[w].CopyFrom(numpy_helper.from_array(
                    enc.dequantize(enc.quantize(-values)).astype(values.dtype), w))
        return out

    monkeypatch.setattr(technique, "adaround", sign_flipped_when_centered)
    model, data = layer_model(), batches(1)
    r = quantize(model, data, config(0, adaround=True, bias_correction=True), output_dir=tmp_path, name="m")
    check = r.report["adaround"]["check"]
    errors = check["output_error"]
    assert errors["centered"] > 2 * errors["nearest"], errors
    assert check["chosen"] == min(("uncentered", "nearest"), key=errors.get), check
    shipped = _output_error(model, r.model_path, data)
    assert shipped == pytest.approx(min(errors["uncentered"], errors["nearest"]), rel=1e-3)
    assert shipped < errors["centered"] / 2
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(r.report["outputs"]["float_model"]).graph.initializer}
    enc = read_encodings(r.encodings_path)
    for w in ("W", "D", "F"):  # no sign-flipped weight left anywhere
        assert np.corrcoef(weights[w].ravel(), layer_model_weights()[w].ravel())[0, 1] > 0.9, w
        assert enc.params[w].bitwidth == 4


def layer_model_weights() -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in layer_model().graph.initializer}
