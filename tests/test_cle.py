"""Cross-layer equalization: FP32 outputs unchanged, per-channel weight ranges equalized, high biases absorbed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from converter import QuantConfig, export_torch, quantize
from converter.errors import ConfigError
from converter.pipeline import prepare
from converter.quant.cle import _in_ranges, _out_ranges, equalize

from .conftest import run


class DepthwiseNet(torch.nn.Module):
    """Conv -> BN -> act -> depthwise -> BN -> act -> 1x1 Conv: the MobileNet block CLE was made for."""

    def __init__(self, act: type[torch.nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.act1, self.act2 = act(), act()
        with torch.no_grad():  # BN scales 0.02..50 per channel: the ranges per-tensor weights cannot hold
            for bn in (self.bn1, self.bn2):
                bn.weight.copy_(torch.logspace(-1.7, 1.7, 8)[torch.randperm(8)])
                bn.running_var.uniform_(0.5, 2.0)
            self.bn2.bias.copy_(torch.linspace(0.5, 4.0, 8))  # positive pre-activations: bias to absorb

    def forward(self, x):
        return self.pw(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.conv(x)))))))


def export(tmp_path, act) -> onnx.ModelProto:
    path = tmp_path / "dw.onnx"
    export_torch(DepthwiseNet(act).eval(), torch.zeros(1, 3, 8, 8), path)
    return prepare(str(path)).model


def batches(seed, n=2):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def weights(model):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]


def spread(r):
    return float(r.max() / r.min())


def copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_cle_keeps_fp32_and_equalizes_per_channel_ranges(tmp_path):
    model = export(tmp_path, torch.nn.ReLU)
    name = model.graph.input[0].name
    feeds = [{name: b["x"]} for b in batches(1)]
    w_conv, w_dw, w_pw = weights(model)
    before = spread(_out_ranges(w_dw))
    eq = copy(model)
    result = equalize(eq, feeds)
    assert [(p.activation, p.channels) for p in result.pairs] == [("Relu", 8), ("Relu", 8)]
    assert result.relu6_replaced == [] and result.iterations < 50
    e_conv, e_dw, e_pw = weights(eq)
    # per channel, each layer's range now equals its neighbour's: conv out == dw, dw == pw in
    np.testing.assert_allclose(_out_ranges(e_conv), _out_ranges(e_dw), rtol=1e-3)
    np.testing.assert_allclose(_out_ranges(e_dw), _in_ranges(e_pw, "conv"), rtol=1e-3)
    assert spread(_out_ranges(e_dw)) < before / 5, (before, spread(_out_ranges(e_dw)))
    # high biases absorbed into the 1x1 Conv (no padding) where the pre-activation stays positive
    assert result.pairs[1].absorbed_channels > 0 and result.pairs[0].absorbed_channels == 0
    for f in feeds + [{name: batches(7, 1)[0]["x"]}]:
        np.testing.assert_allclose(run(eq, f)[0], run(model, f)[0], rtol=1e-4, atol=1e-4)


def test_relu6_kept_or_replaced(tmp_path):
    model = export(tmp_path, torch.nn.ReLU6)
    feed = {model.graph.input[0].name: batches(3, 1)[0]["x"] * 4}
    keep = copy(model)
    kept = equalize(keep, None, relu6="keep")
    assert kept.pairs == [] and kept.skipped_relu6_pairs == 2 and kept.to_dict()["fp32_changed"] is False
    np.testing.assert_allclose(run(keep, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)
    repl = copy(model)
    replaced = equalize(repl, None, relu6="replace")
    assert len(replaced.pairs) == 2 and len(replaced.relu6_replaced) == 2
    assert replaced.to_dict()["fp32_changed"] is True
    assert [n.op_type for n in repl.graph.node].count("Clip") == 0
    # min: Relu + Min by the per-channel bound 6 / s keeps the clip exactly, pairs equalized
    mins = copy(model)
    result = equalize(mins, None, relu6="min")
    assert len(result.pairs) == 2 and result.relu6_replaced == [] and result.to_dict()["fp32_changed"] is False
    ops = [n.op_type for n in mins.graph.node]
    assert ops.count("Clip") == 0 and ops.count("Min") == 2
    assert np.max(run(model, feed)[0]) > 0 and np.abs(run(repl, feed)[0] - run(model, feed)[0]).max() > 1e-2
    np.testing.assert_allclose(run(mins, feed)[0], run(model, feed)[0], rtol=1e-4, atol=1e-4)


def test_cle_lowers_per_tensor_error_and_is_reported(tmp_path):
    model = export(tmp_path, torch.nn.ReLU)
    name = model.graph.input[0].name
    calib = [{name: b["x"]} for b in batches(1)]
    x = {name: batches(9, 1)[0]["x"]}
    ref = run(model, x)[0]
    errs = {}
    for cle in (False, True):
        r = quantize(model, calib, QuantConfig(per_channel=False, cle=cle), output_dir=tmp_path / str(cle), name="m")
        errs[cle] = float(np.mean((run(r.model_path, x)[0] - ref) ** 2) / np.mean(ref**2))
        assert ("cle" in r.report) == cle
    assert errs[True] * 3 < errs[False], errs
    once = quantize(model, iter(calib), QuantConfig(per_channel=False, cle=True), output_dir=tmp_path / "it", name="m")
    assert once.report["calibration"]["samples"] == 16  # a one-shot iterator: CLE's read did not consume it
    pairs = r.report["cle"]["pairs"]
    assert len(pairs) == 2 and all(p["scale_max"] > p["scale_min"] > 0 for p in pairs)


def test_cle_relu6_choice_is_validated():
    with pytest.raises(ConfigError, match="cle_relu6"):
        QuantConfig(cle_relu6="drop")


def test_relu6_min_runs_every_conv_on_integers_in_ort(tmp_path):
    """cle_relu6=min: the Relu output gets its Q/DQ (the per-channel Min is a clamp sharing its encoding), so ORT
    fuses every Conv into a QLinearConv and the Min runs on uint8; FP32 outputs unchanged."""
    from converter.ort_session import optimized_op_counts

    model = export(tmp_path, torch.nn.ReLU6)
    name = model.graph.input[0].name
    calib = [{name: b["x"] * 4} for b in batches(1)]
    x = {name: batches(9, 1)[0]["x"] * 4}
    ref = run(model, x)[0]
    out = {}
    for mode in ("keep", "min"):
        r = quantize(model, calib, QuantConfig(per_channel=False, cle=True, cle_relu6=mode),
                     output_dir=tmp_path / mode, name="m")
        counts = optimized_op_counts(str(r.model_path))
        assert counts.get("QLinearConv") == 3 and counts.get("Conv", 0) + counts.get("FusedConv", 0) == 0, counts
        out[mode] = (counts, float(np.mean((run(r.model_path, x)[0] - ref) ** 2) / np.mean(ref**2)), r)
    counts, err, r = out["min"]
    assert counts.get("Min") == 2 and counts.get("DequantizeLinear", 0) == 1, counts  # no float DQ -> Min -> Q
    assert r.report["cle"]["relu6"] == "min" and r.report["cle"]["fp32_changed"] is False
    eq = copy(model)
    equalize(eq, None, relu6="min")  # without high-bias absorption (exact only where its bound holds): FP32 exact
    np.testing.assert_allclose(run(eq, x)[0], ref, rtol=1e-4, atol=1e-4)
    assert err * 2 < out["keep"][1], (err, out["keep"][1])  # equalized through the ReLU6: lower per-tensor error
