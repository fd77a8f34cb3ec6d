"""calib_method auto (converter/techniques/calib_choice.py): each activation's range chosen from histogram candidates
by the error at the layer reading it. Measured on small models with outlier-heavy activations: the held-out output
error against minmax for every tensor, the report's record of the choice, the frozen overrides reproducing the
model, and the errors a user can cause."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml

from converter import QuantConfig, quantize
from converter.cli import main
from converter.errors import ConfigError

from .conftest import parse, run

BASE = QuantConfig(smoothquant=False, threads=1)  # SmoothQuant would move the outlier channel into the weights


def _outlier_channel_model() -> onnx.ModelProto:
    """x (64 channels, channel 0 about 50x the others, as a LayerNorm output of a trained transformer) -> MatMul whose
    weights read channel 0 at 1/100 -> Relu -> MatMul. Min/max spends x's grid on channel 0, which the layer barely
    reads; a clipping range loses little there and gains resolution for the 63 others."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.2, (64, 32)).astype(np.float32)
    w1[0] *= 0.01
    return parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,64] x) => (float[N,8] y) {
      h = MatMul(x, W1)
      a = Add(h, B1)
      r = Relu(a)
      y = MatMul(r, W2)
    }""", W1=w1, B1=rng.normal(0, 0.1, 32).astype(np.float32), W2=rng.normal(0, 0.3, (32, 8)).astype(np.float32))


def _outlier_data(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_t(4, (16, 64)).astype(np.float32)
        x[:, 0] *= 50.0
        out.append({"x": x})
    return out


def _conv_model() -> onnx.ModelProto:
    """Conv -> Tanh -> Conv -> Relu -> GlobalAveragePool on heavy-tailed (Student-t, 2 degrees of freedom) images:
    the first Conv's outliers saturate the Tanh, so a range clipping them costs nothing at the Tanh's output (their
    own squared error, which ``mse`` weighs, is large) and gains resolution near 0, where Tanh is steep."""
    rng = np.random.default_rng(1)
    return parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,12,12] x) => (float[N,8,1,1] y) {
      h1 = Conv <pads: ints = [1, 1, 1, 1]> (x, W1, B1)
      r1 = Tanh(h1)
      h2 = Conv <pads: ints = [1, 1, 1, 1]> (r1, W2, B2)
      r2 = Relu(h2)
      y = GlobalAveragePool(r2)
    }""", W1=rng.normal(0, 1.0, (8, 3, 3, 3)).astype(np.float32), B1=rng.normal(0, 0.1, 8).astype(np.float32),
        W2=rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), B2=rng.normal(0, 0.1, 8).astype(np.float32))


def _heavy_images(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_t(2, (8, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


CASES = {"outlier_channel": (_outlier_channel_model, _outlier_data), "heavy_tailed_conv": (_conv_model, _heavy_images)}


def _held_out_error(model: onnx.ModelProto, qdq_path, held: list[dict[str, np.ndarray]]) -> float:
    num = den = 0.0
    for feed in held:
        ref = run(model, feed)[0].astype(np.float64)
        got = run(qdq_path, feed)[0].astype(np.float64)
        num += float(((got - ref) ** 2).sum())
        den += float((ref**2).sum())
    return num / den


@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_lowers_the_held_out_error_against_minmax(case, tmp_path):
    build, data = CASES[case]
    model, calib, held = build(), data(8, 1), data(8, 99)  # held-out: other samples of the same distribution
    errors = {}
    for method in ("minmax", "auto"):
        res = quantize(model, calib, BASE.replace(calib_method=method), tmp_path / method, "m")
        errors[method] = _held_out_error(model, res.model_path, held)
    assert errors["auto"] < 0.8 * errors["minmax"], errors
    choice = res.report["calib_choice"]
    assert any(c["choice"] != "minmax" for c in choice["tensors"].values())


def test_the_report_records_candidates_errors_and_choice(tmp_path):
    model, calib = _outlier_channel_model(), _outlier_data(8, 1)
    config = BASE.replace(calib_method="auto", calib_auto_samples=16)
    res = quantize(model, calib, config, tmp_path, "m")
    choice = res.report["calib_choice"]
    assert choice["candidates"] == list(config.calib_auto_candidates) and choice["samples"] == 16
    acts = {n for n, t in res.report["tensors"].items() if t.get("role") == "activation"}
    assert set(choice["tensors"]) == acts and set(choice["calib_overrides"]) == acts
    for name, c in choice["tensors"].items():
        assert set(c["errors"]) == set(config.calib_auto_candidates)
        assert c["errors"][c["choice"]] == min(c["errors"].values())  # the least error wins
        assert choice["calib_overrides"][name] == c["choice"]
        assert res.report["tensors"][name]["calib_method"] == c["choice"]  # and the encodings use it
    # x is scored at the MatMul -> Add -> Relu layer, not by its own error; its outlier channel is clipped there
    assert choice["tensors"]["x"]["layer"] == ["r"]
    assert choice["tensors"]["x"]["choice"] != "minmax"
    assert choice["tensors"]["x"]["errors"]["minmax"] > 2 * choice["tensors"]["x"]["errors"][choice["tensors"]["x"]
                                                                                              ["choice"]]


def test_frozen_overrides_reproduce_the_model_byte_for_byte(tmp_path):
    model, calib = _outlier_channel_model(), _outlier_data(8, 1)
    auto = quantize(model, calib, BASE.replace(calib_method="auto"), tmp_path / "auto", "m")
    overrides = auto.report["calib_choice"]["calib_overrides"]
    # the block pasted into a config file, as a user freezes it
    cfg = tmp_path / "frozen.yaml"
    cfg.write_text(yaml.safe_dump({"smoothquant": False, "threads": 1, "calib_method": "minmax",
                                   "calib_overrides": overrides}))
    frozen = quantize(model, calib, QuantConfig.from_file(cfg), tmp_path / "frozen", "m")
    assert "calib_choice" not in frozen.report  # nothing left to choose
    assert frozen.model_path.read_bytes() == auto.model_path.read_bytes()
    kept = quantize(model, calib, BASE.replace(calib_method="auto", calib_overrides=overrides), tmp_path / "kept", "m")
    assert kept.model_path.read_bytes() == auto.model_path.read_bytes()
    assert kept.encodings_path.read_bytes() == auto.encodings_path.read_bytes()


def test_auto_per_tensor_in_overrides_chooses_only_those(tmp_path):
    model, calib = _outlier_channel_model(), _outlier_data(8, 1)
    res = quantize(model, calib, BASE.replace(calib_overrides={"x": "auto", "r": "percentile:99.9"}), tmp_path, "m")
    assert set(res.report["calib_choice"]["tensors"]) == {"x"}
    assert res.report["tensors"]["r"]["calib_method"] == "percentile:99.9"


@pytest.mark.parametrize("field,value,needle", [
    ("calib_auto_candidates", ("minmax", "percentile:101"), "percentile:101"),
    ("calib_auto_candidates", ("minmax", "median"), "median"),
    ("calib_auto_candidates", ("minmax", "auto"), "auto"),
    ("calib_auto_candidates", ("mse", "mse"), "twice"),
    ("calib_auto_candidates", (), "non-empty"),
    ("calib_auto_samples", 0, "calib_auto_samples"),
    ("calib_auto_evals", -1, "calib_auto_evals"),
    ("calib_overrides", {"x": "entropy:99"}, "entropy:99"),
])
def test_a_bad_candidate_spec_is_one_clear_error(field, value, needle):
    with pytest.raises(ConfigError) as exc:
        BASE.replace(calib_method="auto", **{field: value})
    assert needle in exc.value.message and exc.value.fix


def test_cli_calib_method_auto_and_a_bad_candidate(tmp_path, capsys):
    model, calib = _outlier_channel_model(), _outlier_data(4, 1)
    onnx.save(model, tmp_path / "m.onnx")
    data = tmp_path / "calib"
    data.mkdir()
    for i, b in enumerate(calib):
        np.save(data / f"{i}.npy", b["x"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("calib_auto_candidates: [minmax, 'percentile:abc']\n")
    rc = main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(data), "--calib-method", "auto", "--config",
               str(bad), "--output-dir", str(tmp_path / "bad_out")])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "percentile:abc" in err and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "bad_out").exists()
    rc = main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(data), "--calib-method", "auto", "--no-smoothquant",
               "--threads", "1", "--output-dir", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "m.report.json").read_text())
    assert report["config"]["calib_method"] == "auto" and report["calib_choice"]["calib_overrides"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_model_output_refinement_is_faithful_and_no_worse_than_one_method(case, tmp_path):
    """The refinement's model error (float fake-quantizers) is the exported QDQ model's error on the same samples,
    and the choice's error is at most the best single method's (every method is one of its starts)."""
    build, data = CASES[case]
    model, calib = build(), data(8, 1)
    samples = sum(b["x"].shape[0] for b in calib)
    config = BASE.replace(calib_auto_samples=samples)
    errors = {}
    for method in config.calib_auto_candidates + ("auto",):
        name, _, pct = method.partition(":")  # percentile:<p>: the percentile method at p for every tensor
        one = config.replace(calib_method=name, **({"percentile": float(pct)} if pct else {}))
        res = quantize(model, calib, one, tmp_path / method.replace(":", "_"), "m")
        errors[method] = _held_out_error(model, res.model_path, calib)
    prop = res.report["calib_choice"]["propagated"]
    assert prop["model_error"] == pytest.approx(errors["auto"], rel=0.05), (prop, errors)
    assert prop["evaluations"] <= config.calib_auto_evals
    assert set(prop["starts"]) == {"layer", *config.calib_auto_candidates}
    assert errors["auto"] <= 1.02 * min(v for k, v in errors.items() if k != "auto"), errors


def test_calib_auto_evals_zero_keeps_the_layer_level_choice(tmp_path):
    model, calib = _outlier_channel_model(), _outlier_data(8, 1)
    res = quantize(model, calib, BASE.replace(calib_method="auto", calib_auto_evals=0), tmp_path, "m")
    choice = res.report["calib_choice"]
    assert "propagated" not in choice and "refined" not in choice["error"]
    assert all("layer_choice" not in c for c in choice["tensors"].values())
