"""AdaQuant and block reconstruction (converter.quant.reconstruction): each lowers the held-out output error of a
small residual CNN at 4 bits against nearest rounding; the blocks are the graph's residual / linear-output pieces;
the torch work falls back to the CPU with one log line where torch sees no GPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from converter import QuantConfig, quantize
from converter.cli import main
from converter.errors import ConfigError

from .conftest import parse, run


def residual_model():
    """Stem Conv + Relu, then an inverted-residual block (expand 1x1 + Relu, depthwise 3x3 + Relu, project 1x1,
    Add of the block's input), then a linear 1x1 Conv, pooling and a Gemm head."""
    rng = np.random.default_rng(0)

    def w(*shape, scale=1.0):
        fan_in = int(np.prod(shape[1:]))
        return (rng.normal(0, scale / np.sqrt(fan_in), shape)
                * rng.uniform(0.3, 1.5, (shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)

    def b(n):
        return rng.normal(0, 0.1, n).astype(np.float32)

    return parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,10] y) {
      s = Conv <pads: ints = [1, 1, 1, 1]> (x, W0, B0)
      r0 = Relu(s)
      e = Conv (r0, W1, B1)
      r1 = Relu(e)
      d = Conv <pads: ints = [1, 1, 1, 1], group: int = 32> (r1, W2, B2)
      r2 = Relu(d)
      p = Conv (r2, W3, B3)
      a = Add(p, r0)
      c = Conv (a, W4, B4)
      gp = GlobalAveragePool(c)
      f = Flatten(gp)
      y = Gemm <transB: int = 1> (f, F, FB)
    }""", W0=w(8, 3, 3, 3, scale=2), B0=b(8), W1=w(32, 8, 1, 1, scale=2), B1=b(32), W2=w(32, 1, 3, 3, scale=2),
                 B2=b(32), W3=w(8, 32, 1, 1), B3=b(8), W4=w(16, 8, 1, 1), B4=b(16), F=w(10, 16, scale=3), FB=b(10))


def batches(seed, n=4):
    """Inputs correlated across the image, as images are."""
    rng = np.random.default_rng(seed)
    return [{"x": (rng.normal(0, 1, (16, 3, 1, 1)) + 0.4 * rng.normal(0, 1, (16, 3, 8, 8))).astype(np.float32)}
            for _ in range(n)]


def config(**kw):
    return QuantConfig(**{"weight_bits": 4, "threads": 1, "fast_bias_correction": False,
                          "reconstruction_iterations": 300, "device": "cpu", **kw})


def _held_out_error(tmp_path, name, cfg, model, held_out, ref):
    r = quantize(model, batches(1), cfg, output_dir=tmp_path / name, name="m")
    return float(np.mean((run(r.model_path, held_out)[0] - ref) ** 2)), r.report


def test_blocks_follow_residual_adds_and_linear_outputs():
    from converter.pipeline import prepare
    from converter.quant.plan import build_plan
    from converter.quant.reconstruction import find_units

    state = prepare(residual_model())
    plan = build_plan(state.model, QuantConfig(weight_bits=4), state.idx)
    plan.encodings.update({t: _enc() for t in plan.tensors if plan.tensors[t].role == "weight"})
    blocks = find_units(state.model, plan, state.idx, blocks=True)
    layers = find_units(state.model, plan, state.idx, blocks=False)
    # stem + the inverted-residual block up to its Add; the linear 1x1 Conv; the Gemm
    assert [[lay.node.op_type for lay in u.layers] for u in blocks] == [["Conv"] * 4, ["Conv"], ["Gemm"]]
    assert blocks[0].output == "a" and blocks[0].input == "x"
    assert len(layers) == 6 and all(len(u.layers) == 1 for u in layers)


def _enc():
    from converter.quant.encoding import Encoding

    return Encoding(4, True, True, (0.1,), (0,))


def test_adaquant_and_block_reconstruction_beat_nearest_rounding_at_4_bits(tmp_path):
    model = residual_model()
    held_out = batches(7, 1)[0]
    ref = run(model, held_out)[0]
    err, rep = {}, {}
    for name, cfg in (("nearest", config()), ("adaquant", config(adaquant=True)),
                      ("blocks", config(block_reconstruction=True))):
        err[name], rep[name] = _held_out_error(tmp_path, name, cfg, model, held_out, ref)
    # measured on data the optimization did not see: nearest 0.1225, AdaQuant 0.1196, blocks 0.041 on the machine
    # these were first measured on, 0.070 on an AMD EPYC (the same wheels: 300 Adam steps of soft rounding follow
    # the CPU's float sums to different roundings; 600 steps there: 0.049). Each unit reconstructs its own float
    # output on its quantized input, so AdaQuant's learned biases no longer absorb the mean shifts of the layers
    # before it (its margin here was 0.080 with the float prefix as the target; on ResNet-8 and PP-OCR's classifier
    # that change raised it: docs/results.md); a block learns its layers together: well ahead of both
    assert err["adaquant"] < err["nearest"], err
    assert err["blocks"] < 0.7 * err["nearest"] and err["blocks"] < 0.7 * err["adaquant"], err
    units = rep["blocks"]["block_reconstruction"]["units"]
    assert [len(u["layers"]) for u in units] == [4, 1, 1]
    assert all(u["kept"] and u["loss_learned"] < u["loss_nearest"] for u in units[:1]), units
    aq = rep["adaquant"]["adaquant"]
    assert len(aq["units"]) == 6 and aq["adaquant"] and not aq["blocks"]
    assert any(u["scale_change"] > 0 for u in aq["units"])  # the scales moved


def test_reconstructed_weights_lie_on_the_written_encodings(tmp_path):
    """AdaQuant's learned scales reach the encodings file; the weights in the float model written beside it are
    exactly grid values of those encodings (the QDQ model's weights are then the learned ones)."""
    import json

    import onnx
    from onnx import numpy_helper

    r = quantize(residual_model(), batches(1), config(adaquant=True, bias_correction=True), output_dir=tmp_path,
                 name="m")
    float_model = onnx.load(r.report["outputs"]["float_model"])
    enc = json.loads(r.encodings_path.read_text())
    params = {e["name"]: e for e in enc["param_encodings"]} if isinstance(enc["param_encodings"], list) else {
        k: {"scale": [c["scale"] for c in v]} for k, v in enc["param_encodings"].items()}
    inits = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    checked = 0
    for name, e in params.items():
        if name not in inits or inits[name].ndim < 2:
            continue
        scale = np.asarray(e["scale"], np.float32).reshape((-1,) + (1,) * (inits[name].ndim - 1))
        if scale.size != inits[name].shape[0]:
            continue
        offset = np.asarray(e.get("offset", 0), np.float32).reshape(scale.shape) if "offset" in e else 0
        q = inits[name] / scale - (-offset if isinstance(offset, np.ndarray) else 0)
        np.testing.assert_allclose(q, np.rint(q), atol=1e-3)
        checked += 1
    assert checked >= 4


def test_qdrop_changes_what_is_learned(tmp_path):
    """QDrop (activations randomly kept float while training) learns other weights; at 8-bit activations its block
    loss is measured no better than without it (why it is off by default)."""
    import onnx
    from onnx import numpy_helper

    reps, weights = {}, {}
    for on in (False, True):
        r = quantize(residual_model(), batches(1), config(block_reconstruction=True, reconstruction_qdrop=on),
                     output_dir=tmp_path / str(on), name="m")
        reps[on] = r.report["block_reconstruction"]
        fm = onnx.load(r.report["outputs"]["float_model"])
        weights[on] = {t.name: numpy_helper.to_array(t) for t in fm.graph.initializer}
    assert reps[True]["qdrop"] is True and reps[False]["qdrop"] is False
    assert any(not np.array_equal(weights[True][k], weights[False][k]) for k in ("W1", "W2", "W3"))
    assert reps[False]["units"][0]["loss_learned"] < reps[False]["units"][0]["loss_nearest"]


def test_device_auto_falls_back_to_cpu_with_one_log_line(tmp_path, caplog, monkeypatch):
    import torch

    from converter.quant.reconstruction import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine: no GPU
    with caplog.at_level(logging.INFO, logger="converter"):
        assert resolve_device("auto") == "cpu"
    assert [r.getMessage() for r in caplog.records] == [
        "device auto: torch sees no CUDA GPU; the torch-side techniques run on the CPU"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="converter"):
        assert resolve_device("cpu") == "cpu"
    assert not caplog.records
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="converter"):
        r = quantize(residual_model(), batches(1), config(block_reconstruction=True, device="auto",
                                                          reconstruction_iterations=5),
                     output_dir=tmp_path, name="m")
    fell_back = [x for x in caplog.records if "torch sees no CUDA GPU" in x.getMessage()]
    assert len(fell_back) == 1 and r.report["block_reconstruction"]["units"]


def test_bad_device_and_iterations_are_config_errors():
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda"):
        QuantConfig(device="tpu")
    with pytest.raises(ConfigError, match="reconstruction_iterations"):
        QuantConfig(reconstruction_iterations=-1)


def test_cli_block_reconstruction(tmp_path, capsys):
    import json

    import onnx

    model_path = tmp_path / "m.onnx"
    onnx.save(residual_model(), model_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, b in enumerate(batches(1, 2)):
        np.save(calib / f"{i}.npy", b["x"])
    code = main(["quantize", str(model_path), "--calib", str(calib), "--weight-bits", "4", "--block-reconstruction",
                 "--adaquant", "--reconstruction-iterations", "10", "--device", "cpu", "--threads", "1", "--output-dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "out" / "m.report.json").read_text())
    entry = report["block_reconstruction"]
    assert entry["adaquant"] and entry["blocks"] and entry["iterations"] == 10 and "adaquant" not in report
