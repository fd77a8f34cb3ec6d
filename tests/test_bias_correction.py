"""Empirical bias correction removes a planted mean shift from a quantized layer's output."""

from __future__ import annotations

import numpy as np

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

