"""Empirical bias correction removes a planted mean shift from a quantized layer's output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from converter import QuantConfig, quantize
from converter.pipeline import prepare

from .conftest import parse, run


def shifted_model():
    """Gemm whose per-tensor weight scale is set by one large weight: every other weight (0.38 of a step)
    rounds to 0, so on inputs with mean 5 each output channel loses ~2.4 on average: a planted mean shift."""
    w = np.full((8, 16), 0.03, np.float32)
    w[:, 1::2] = 0.02
    w[0, 0] = 10.0
    b = np.linspace(-1, 1, 8).astype(np.float32)
    return prepare(parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x) => (float[N,8] y) {
      h = Gemm <transB: int = 1> (x, W, B)
      y = Relu(h)
    }""", W=w, B=b)).model


def batches(seed, n=4):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(5, 1, (16, 16)).astype(np.float32)} for _ in range(n)]


def test_bias_correction_removes_planted_mean_shift(tmp_path):
    model = shifted_model()
    held_out = batches(9, 1)[0]
    ref = run(model, held_out)[0]
    shift = {}
    for on in (False, True):
        r = quantize(model, batches(1), QuantConfig(per_channel=False, bias_correction=on),
                     output_dir=tmp_path / str(on), name="m")
        shift[on] = np.abs((run(r.model_path, held_out)[0] - ref).mean(axis=0))[1:].mean()
        assert ("bias_correction" in r.report) == on
    assert shift[False] > 1.5, shift  # the planted shift is there without correction
    assert shift[True] < shift[False] / 20, shift  # and gone with it, on data it did not see
    [layer] = r.report["bias_correction"]["layers"]
    assert layer["node"] == "Gemm_0" and layer["channels"] == 8
    assert layer["mean_shift_before"] > 1.5 and layer["mean_shift_after"] < layer["mean_shift_before"] / 20



class BNNet(torch.nn.Module):
    """Conv -> BN -> ReLU -> 1x1 Conv whose per-tensor weight scale is set by one large weight: the others (0.02,
    0.03, under half a step) round to 0, so each output channel loses sum(w) * E[x] ~ 0.8 on average."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pw = torch.nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            w = torch.full((8, 8, 1, 1), 0.03)
            w[:, 1::2] = 0.02
            w[0, 0] = 10.0
            self.pw.weight.copy_(w)
            self.bn.weight.copy_(torch.linspace(0.5, 2.0, 8))
            self.bn.bias.copy_(torch.linspace(2.0, 5.0, 8))

    def forward(self, x):
        return self.pw(torch.relu(self.bn(self.conv(x))))


def bn_model(tmp_path, x: np.ndarray):
    """BNNet exported with its BatchNorm (running statistics set from ``x``: non-trivial, and what the data
    gives), as a user's ONNX file from an exporter that does not fold it."""
    net = BNNet().eval()
    with torch.no_grad():
        h = net.conv(torch.from_numpy(x))
        net.bn.running_mean.copy_(h.mean(dim=(0, 2, 3)))
        net.bn.running_var.copy_(h.var(dim=(0, 2, 3)))
    path = tmp_path / "bn.onnx"
    torch.onnx.export(net, (torch.from_numpy(x[:1]),), str(path), dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    model = onnx.load(str(path))
    assert "BatchNormalization" in [n.op_type for n in model.graph.node]
    return model


def bn_case(tmp_path):
    """The BatchNorm model, its calibration batches, held-out data and the float model's output on it."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    model = bn_model(tmp_path, x)
    held_out = {"x": rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)}
    return model, [{"x": x[i:i + 16]} for i in range(0, 64, 16)], held_out, run(model, held_out)[0]


def test_analytical_bias_correction_from_batchnorm_statistics(tmp_path):
    model, calib, held_out, ref = bn_case(tmp_path)
    shift, reports = {}, {}
    for mode in (None, "analytical", "auto"):
        config = QuantConfig(per_channel=False, bias_correction=mode is not None,
                             bias_correction_mode=mode or "empirical")
        r = quantize(model, calib, config, output_dir=tmp_path / str(mode), name="m")
        # per output channel (the one with the large weight aside), the mean output shift on unseen data
        shift[mode] = np.abs((run(r.model_path, held_out)[0] - ref).mean(axis=(0, 2, 3)))[1:].mean()
        reports[mode] = r.report.get("bias_correction")
    assert shift[None] > 0.5, shift  # the quantization-induced shift is there without correction (measured 0.60)
    assert shift["analytical"] < shift[None] / 10, shift  # computed from beta/gamma alone, it is gone (0.02)
    layers = {c["node"]: c["kind"] for c in reports["analytical"]["layers"]}
    assert list(layers.values()) == ["analytical"] and reports["analytical"]["samples"] == 0, reports
    [computed] = reports["analytical"]["layers"]
    assert 0.4 < computed["mean_shift_before"] < 1.0  # E[(W_q - W) x] (0.68), beside the measured shift above
    # auto: the layer BatchNorm statistics reach is corrected analytically, the first (reads the input) empirically
    kinds = sorted(c["kind"] for c in reports["auto"]["layers"])
    assert kinds == ["analytical", "empirical"], reports["auto"]
    assert shift["auto"] < shift[None] / 5, shift


def test_clipped_normal_mean_matches_sampling():
    from converter.quant.bias_correction import clipped_normal_mean

    rng = np.random.default_rng(1)
    mean, std = np.array([-1.0, 0.5, 3.0, 8.0]), np.array([1.0, 2.0, 0.5, 3.0])
    s = rng.normal(mean, std, (200000, 4))
    for lo, hi in ((-np.inf, np.inf), (0.0, np.inf), (0.0, 6.0)):
        np.testing.assert_allclose(clipped_normal_mean(mean, std, np.full(4, lo), np.full(4, hi)),
                                   np.clip(s, lo, hi).mean(axis=0), atol=0.02)


def test_analytical_statistics_follow_cle(tmp_path):
    """After CLE (channels scaled, high bias absorbed) the BatchNorm statistics are updated: the computed shift of
    the 1x1 Conv matches the one bias correction measures on data, and correcting it removes the output shift."""
    model, calib, held_out, ref = bn_case(tmp_path)
    shift, layers = {}, {}
    for mode in (None, "analytical", "empirical"):
        config = QuantConfig(per_channel=False, cle=True, bias_correction=mode is not None,
                             bias_correction_mode=mode or "empirical")
        r = quantize(model, calib, config, output_dir=tmp_path / str(mode), name="m")
        shift[mode] = np.abs((run(r.model_path, held_out)[0] - ref).mean(axis=(0, 2, 3))).mean()
        layers[mode] = {c["node"]: c for c in (r.report.get("bias_correction") or {"layers": []})["layers"]}
    assert len(r.report["cle"]["pairs"]) == 1
    computed, measured = layers["analytical"]["/pw/Conv"], layers["empirical"]["/pw/Conv"]
    assert computed["mean_shift_before"] == pytest.approx(measured["mean_shift_before"], rel=0.2)
    assert shift["analytical"] < shift[None] / 10, shift


@pytest.mark.parametrize("opset", [11, 17])  # ReduceSum's axes: an attribute before opset 13, an input from it
def test_channel_means_are_summed_inside_the_model(opset, monkeypatch):
    """Bias correction's per-channel means come from sums the model computes (the run fetches [C] vectors, not
    every layer's output): they match numpy's over the whole tensors, for 4-D and 2-D outputs and ragged batches."""
    import onnxruntime as ort
    from onnx import helper

    import converter.quant.bias_correction as bc

    fetched = []

    def recording(model, tensors, batches, providers):  # what the run hands back, per batch
        for values in real(model, tensors, batches, providers):
            fetched.extend(np.shape(values[t]) for t in tensors)
            yield values

    real = bc.iter_capture
    monkeypatch.setattr(bc, "iter_capture", recording)
    rng = np.random.default_rng(0)
    model = parse(f"""
    <ir_version: 7, opset_import: ["" : {opset}]>
    g (float[N,3,6,6] x) => (float[N,7] y) {{
      c = Conv <pads: ints = [1, 1, 1, 1]> (x, W)
      r = Relu(c)
      p = GlobalAveragePool(r)
      f = Flatten(p)
      y = Gemm <transB: int = 1> (f, G)
    }}""", W=rng.normal(size=(5, 3, 3, 3)).astype(np.float32), G=rng.normal(size=(7, 5)).astype(np.float32))
    data = [{"x": rng.normal(size=(n, 3, 6, 6)).astype(np.float32)} for n in (4, 3)]
    render = onnx.ModelProto()
    render.CopyFrom(model)  # _means adds its summing nodes to the model it is given
    got = bc._means(render, ["c", "y"], data, ["CPUExecutionProvider"])
    assert sorted(set(fetched)) == [(), (5,), (7,)], fetched  # channel sums and counts, never a whole tensor
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    whole.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [dict(zip(["y", "c"], sess.run(["y", "c"], b))) for b in data]
    for t in ("c", "y"):
        values = np.concatenate([np.moveaxis(o[t], 1, 0).reshape(o[t].shape[1], -1) for o in outs], axis=1)
        np.testing.assert_allclose(got[t], values.astype(np.float64).mean(axis=1), rtol=1e-5, atol=1e-6)
