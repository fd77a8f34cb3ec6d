"""Calibration methods, streaming histograms, per-tensor overrides and the memory-bounded runner."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from converter.calib import ranges
from converter.calib.observers import (HistogramObserver, MinMaxObserver, ObserverSettings, make_observer,
                                       observer_range)
from converter.calib.readers import model_inputs, open_calibration
from converter.calib.runner import collect
from converter.config import QuantConfig
from converter.errors import ConfigError
from converter.pipeline import quantize

from .conftest import parse

METHODS = ("minmax", "minmax_ema", "percentile", "entropy", "mse")


def _outliers(rng, n=400_000, big=60.0):
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.choice(n, 2, replace=False)] = [big, -big]
    return x


def _observe(x, method="percentile", chunks=8):
    obs = make_observer(method)
    for part in np.array_split(x, chunks):
        obs.update(part)
        obs.end_batch()
    return obs


# --- known answers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False])
def test_histogram_methods_clip_outliers_minmax_does_not(rng, symmetric):
    x = _outliers(rng)
    obs = _observe(x)
    lo, hi = observer_range(obs, "minmax", symmetric=symmetric)
    assert (lo, hi) == (float(x.min()), float(x.max())) == (-60.0, 60.0)
    for method in ("percentile", "entropy"):
        lo, hi = observer_range(obs, method, 99.99, symmetric=symmetric)
        assert 2.0 < max(-lo, hi) < 8.0, (method, lo, hi)  # outliers clipped, the Gaussian body kept
    # MSE weighs the two outliers' squared clipping error against the rounding noise of 400k values:
    # optimum t = 60 * 2 / (2 + n / (12 * 127**2) * 2) ~ 30 (symmetric; the asymmetric grid is alike)
    lo, hi = observer_range(obs, "mse", symmetric=symmetric)
    assert 20.0 < max(-lo, hi) < 40.0, (lo, hi)


def test_mse_close_to_analytic_optimum(rng):
    # uniform(-1, 1) plus a 1% tail of uniform(1, 21) on |x|: the optimum trades rounding against clipping
    n = 2_000_000
    x = rng.uniform(-1, 1, n).astype(np.float32)
    tail = rng.random(n) < 0.01
    x[tail] = (np.sign(x[tail]) * rng.uniform(1, 21, tail.sum())).astype(np.float32)
    obs = _observe(x, "mse")
    t_hist = observer_range(obs, "mse", symmetric=True, bits=4)[1]
    # analytic expected error for threshold t (int4 symmetric: 7 levels per side)
    ts = np.linspace(0.5, 21, 4000)
    a = np.abs(x.astype(np.float64))
    srt = np.sort(a)
    cost = []
    for t in ts:
        k = np.searchsorted(srt, t)
        cost.append(k * (t / 7) ** 2 / 12 + ((srt[k:] - t) ** 2).sum())
    t_best = ts[int(np.argmin(cost))]
    assert abs(t_hist - t_best) / t_best < 0.05, (t_hist, t_best)


def test_percentile_symmetric_matches_numpy(rng):
    x = _outliers(rng)
    t = observer_range(_observe(x), "percentile", 99.9, symmetric=True)[1]
    ref = np.percentile(np.abs(x), 99.9)
    assert abs(t - ref) / ref < 0.01


def _reference_entropy_bins(hist: np.ndarray, nq: int, start: int = 128) -> int:
    """pytorch-quantization's _compute_amax_entropy, literally (loops and scipy-style KL)."""
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    divergences, arguments = [], []
    for i in range(start, len(bins) + 1):
        space = np.linspace(0, i, num=nq + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        new_counts = np.zeros(nq)
        for idx, d in enumerate(digitized):
            if d != -1:
                new_counts[d] += bins[idx]
        counter = Counter(digitized)
        for key, val in counter.items():
            if key != -1:
                new_counts[key] /= val
        q = np.array([new_counts[d] if d != -1 else 0.0 for d in digitized])
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty window: q = 0/0, KL inf below
            p, q = p / p.sum(), q / q.sum()
            terms = np.where(p > 0, p * np.log(p / q), 0.0)
        divergences.append(terms.sum() if np.all(q[p > 0] > 0) else np.inf)
        arguments.append(i)
    d = np.array(divergences)
    return arguments[len(d) - 1 - int(np.argmin(d[::-1]))]


@pytest.mark.parametrize("nq", [128, 256])
def test_entropy_matches_reference_algorithm(rng, nq):
    a = np.abs(np.concatenate([rng.standard_normal(200_000), rng.laplace(0, 1, 20_000), [14.0, -15.0]]))
    hist, _ = np.histogram(a, bins=400, range=(0, a.max()))
    hist[0] += 30_000  # ReLU zeros: the reference's zero-bin rule applies
    assert ranges.entropy_bins(hist, nq) == _reference_entropy_bins(hist, nq)


def test_entropy_skips_windows_holding_one_spike(rng):
    """A sigmoid that never goes below 0.06 (PP-OCR rec): the reference algorithm keeps [0, 0.06] (KL 0: P and Q
    are the same spike in the last bin) and clips nearly every value; ours keeps the range."""
    x = np.clip(1 / (1 + np.exp(-rng.normal(1.0, 0.8, 200_000))), 0.15, 0.868)
    hist, _ = np.histogram(x, bins=1000, range=(0, 0.868))  # no candidate striding below 1024 bins
    first = int(np.flatnonzero(hist)[0])
    assert 128 < first < 200  # nothing below 0.15
    assert _reference_entropy_bins(hist, 256) == first + 1  # the degenerate pick: one spike, KL 0
    assert ranges.entropy_bins(hist, 256) > 0.9 * len(hist)
    obs = make_observer("entropy")
    obs.update(x.astype(np.float32), 0.0, float(x.max()))
    assert observer_range(obs, "entropy")[1] > 0.8


def test_minmax_ema_follows_batches():
    obs = MinMaxObserver(momentum=0.5)
    for lo, hi in [(-1, 1), (-3, 5), (-1, 1)]:
        obs.update(np.array([lo, hi], np.float32))
        obs.end_batch()
    assert obs.range() == (-3.0, 5.0)
    assert obs.ema_range() == pytest.approx((-1.5, 2.0))  # -1 -> -2 -> -1.5 ; 1 -> 3 -> 2


# --- streaming histogram -----------------------------------------------------------------------------

def test_histogram_growth_is_exact(rng):
    obs = HistogramObserver(bins=256)
    parts = [rng.standard_normal(10_000) * s for s in (0.01, 0.3, 5.0, 1.0, 80.0, 0.2)]
    parts.append(np.zeros(100))
    for p in parts:
        obs.update(p.astype(np.float32))
    x = np.concatenate(parts).astype(np.float32)
    ref, _ = np.histogram(x, bins=len(obs.counts), range=(obs.lo, obs.hi))
    assert obs.hi == 2.0 ** np.ceil(np.log2(np.abs(x).max()))  # grown by doubling from the first part's range
    np.testing.assert_array_equal(obs.counts, ref)
    assert obs.counts.sum() == x.size


def test_observer_state_does_not_grow_with_samples(rng):
    sizes = {}
    for n in (10, 1000):
        obs = make_observer("entropy")
        for _ in range(n):
            obs.update(rng.standard_normal(256).astype(np.float32) * rng.uniform(0.5, 4))
            obs.end_batch()
        sizes[n] = obs.state_nbytes()
    assert sizes[10] == sizes[1000]


# --- runner and pipeline -----------------------------------------------------------------------------

def _tiny_model():
    w1 = (np.random.default_rng(1).standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (np.random.default_rng(2).standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)
    return parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
            c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
            r1 = Relu (c1)
            c2 = Conv (r1, w2)
            y = Sigmoid (c2)
        }""", w1=w1, w2=w2)


def _samples(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((3, 8, 8)).astype(np.float32) * (1 + 3 * (i % 5 == 0))} for i in range(n)]


def _encodings(model, method, budget=1 << 30, subsample=16384, n=48, percentile=99.99):
    data = open_calibration(_samples(n), model_inputs(model), batch_size=16)
    tensors = ["x", "r1", "c2", "y"]
    res = collect(model, tensors, data, method, ["CPUExecutionProvider"], settings=ObserverSettings(subsample=subsample),
                  memory_budget=budget)
    return res, {t: observer_range(res.observers[t], method, percentile) for t in tensors}


@pytest.mark.parametrize("method", METHODS)
def test_group_splitting_gives_the_single_pass_encodings(method):
    model = _tiny_model()
    single, ranges_single = _encodings(model, method, subsample=0)
    split, ranges_split = _encodings(model, method, budget=16, subsample=0)  # bytes: every tap alone is over
    assert single.passes == 1 and split.passes > 1 and split.run_batch is not None
    assert ranges_split == ranges_single
    assert single.samples == split.samples == 48


def test_runner_minmax_matches_numpy():
    model = _tiny_model()
    res, got = _encodings(model, "minmax")
    x = np.stack([s["x"] for s in _samples()])
    assert got["x"] == (float(x.min()), float(x.max()))
    assert got["r1"][0] == 0.0  # Relu output: known non-negative, min not measured
    assert res.samples == 48 and res.batches == 3


def test_subsampled_histogram_close_to_exact():
    model = _tiny_model()
    _, exact = _encodings(model, "percentile", subsample=0, percentile=99.0)
    _, sub = _encodings(model, "percentile", subsample=64, percentile=99.0)
    for t in exact:
        assert sub[t] == pytest.approx(exact[t], rel=0.25, abs=0.05), t


def test_per_op_type_override_in_quantize(tmp_path):
    model = _tiny_model()
    cfg = QuantConfig(calib_method="minmax", calib_overrides={"op:Relu": "percentile", "c2": "entropy"},
                      percentile=90.0)
    res = quantize(model, _samples(), cfg, output_dir=tmp_path, name="ov")
    tensors = res.report["tensors"]
    relu_out = next(n for n in tensors if n == "r1")
    # percentile 90 clips the top 5 % of the Relu output: its encoding max is below the observed max
    assert tensors[relu_out]["encoding_max"] < 0.8 * tensors[relu_out]["observed_max"]
    # the input stays minmax: its encoding covers the observed range
    assert tensors["x"]["encoding_max"] >= tensors["x"]["observed_max"] * 0.99
    plain = quantize(model, _samples(), QuantConfig(), output_dir=tmp_path, name="plain").report["tensors"]
    assert plain[relu_out]["encoding_max"] >= plain[relu_out]["observed_max"] * 0.99


def test_override_config_errors():
    with pytest.raises(ConfigError, match="calib_overrides"):
        QuantConfig(calib_overrides={"op:Conv": "kl"})
    with pytest.raises(ConfigError, match="not a quantized activation"):
        from converter.calib.observers import resolve_methods

        resolve_methods(["a"], {"a": "Conv"}, "minmax", {"nope": "mse"})


@pytest.mark.parametrize("method", METHODS)
def test_every_method_quantizes_end_to_end(tmp_path, method):
    model = _tiny_model()
    res = quantize(model, _samples(), QuantConfig(calib_method=method), output_dir=tmp_path, name=method)
    x = np.stack([s["x"] for s in _samples(32, seed=7)])
    import onnxruntime as ort

    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(res.model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - ref).mean() < 0.02 and np.abs(got - ref).max() < 0.15, method  # sigmoid outputs
    assert res.report["calibration"]["method"] == method


# --- weights ------------------------------------------------------------------------------------------

def _weight_sq_error(w, scale, axis):
    shape = [1] * w.ndim
    shape[axis] = -1
    s = np.asarray(scale, dtype=np.float32).reshape(shape)
    q = np.clip(np.rint(w / s), -127, 127) * s
    return np.square(q - w).sum(axis=tuple(i for i in range(w.ndim) if i != axis))


@pytest.mark.parametrize("axis", [0, 1])
def test_weight_mse_per_channel_beats_minmax_and_matches_brute_force(rng, axis):
    from converter.quant.encode import _MSE_RATIOS, weight_encoding

    # channel 0: 65536 uniform(-1, 1) values and one at 1.3. Min/max rounding noise n * (1.3/127)**2 / 12 = 0.57;
    # clipping at ~1.0 costs 0.09 for the outlier and leaves 0.36 of noise: the MSE optimum clips.
    rows = rng.laplace(size=(6, 65536)).astype(np.float32) * 0.1
    rows[0] = rng.uniform(-1, 1, 65536)
    rows[0, 7] = 1.3
    w = np.moveaxis(rows.reshape(6, 256, 256, 1), 0, axis).copy()
    mm, mse = weight_encoding(w, 8, axis, "minmax"), weight_encoding(w, 8, axis, "mse")
    assert mm.axis == mse.axis == axis and len(mse.scale) == 6
    e_mm, e_mse = _weight_sq_error(w, mm.scale, axis), _weight_sq_error(w, mse.scale, axis)
    assert np.all(e_mse <= e_mm * (1 + 1e-6))  # never worse, channel by channel
    assert mse.scale[0] < 0.85 * mm.scale[0] and e_mse[0] < 0.8 * e_mm[0]
    assert np.all(np.asarray(mse.scale) <= np.asarray(mm.scale) * (1 + 1e-6))  # it only ever clips
    for c, row in enumerate(rows):  # brute force over the same candidate bounds, channel by channel
        bounds = np.abs(row).max() * _MSE_RATIOS
        errs = [_weight_sq_error(row[None], [b / 127], 0)[0] for b in bounds]
        assert mse.scale[c] == pytest.approx(bounds[int(np.argmin(errs))] / 127, rel=1e-5)


def test_weight_calib_mse_end_to_end(tmp_path):
    model = _tiny_model()
    cfg = QuantConfig(weight_calib="mse")
    res = quantize(model, _samples(), cfg, output_dir=tmp_path, name="wmse")
    base = quantize(model, _samples(), QuantConfig(), output_dir=tmp_path, name="wmm")
    assert res.report["config"]["weight_calib"] == "mse"
    w_mse, w_mm = res.report["tensors"]["w1"], base.report["tensors"]["w1"]
    assert w_mse["channels"] == w_mm["channels"] == 8 and w_mse["scale_max"] <= w_mm["scale_max"]
    x = np.stack([s["x"] for s in _samples(32, seed=7)])
    import onnxruntime as ort

    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(res.model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - ref).mean() < 0.02
    with pytest.raises(ConfigError, match="weight_calib"):
        QuantConfig(weight_calib="entropy")


def test_samples_of_different_sizes_are_batched_by_size(tmp_path):
    """Text lines of natural width (PP-OCR rec): batches hold samples of one size; nothing fails to stack."""
    w = (np.random.default_rng(1).standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 8, W] x) => (float[N, 4, 8, W] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            y = Relu (c)
        }""", w=w)
    rng = np.random.default_rng(0)
    widths = [16, 16, 24, 24, 24, 16, 40]
    for i, width in enumerate(widths):
        np.savez(tmp_path / f"{i:03d}.npz", x=rng.standard_normal((1, 3, 8, width)).astype(np.float32))
    data = open_calibration(str(tmp_path), model_inputs(model), batch_size=16)
    assert [b["x"].shape for b in data] == [(2, 3, 8, 16), (3, 3, 8, 24), (1, 3, 8, 16), (1, 3, 8, 40)]
    res = quantize(model, str(tmp_path), QuantConfig(batch_size=16), output_dir=tmp_path / "out")
    assert res.report["calibration"]["samples"] == len(widths)
    x = np.concatenate([np.load(tmp_path / f"{i:03d}.npz")["x"].ravel() for i in range(len(widths))])
    assert res.report["tensors"]["x"]["observed_min"] == pytest.approx(float(x.min()))


def test_report_gives_clipped_fraction_and_warns(tmp_path, caplog):
    model = _tiny_model()
    with caplog.at_level("WARNING", logger="converter"):
        res = quantize(model, _samples(), QuantConfig(calib_method="percentile", percentile=90.0), output_dir=tmp_path)
    tensors = res.report["tensors"]
    x = np.stack([s["x"] for s in _samples()])
    lo, hi = tensors["x"]["encoding_min"], tensors["x"]["encoding_max"]
    exact = float(((x < lo) | (x > hi)).mean())
    # from the histogram (values spread evenly within a bin): within a bin's worth of the exact fraction
    assert 0.05 < tensors["x"]["clipped_fraction"] and abs(exact - tensors["x"]["clipped_fraction"]) < 0.01
    assert "more than 1% of their calibration values clipped" in caplog.text and "percentile" in caplog.text
    plain = quantize(model, _samples(), QuantConfig(), output_dir=tmp_path / "minmax").report["tensors"]
    assert "clipped_fraction" not in plain["x"]  # minmax never clips
    relu6 = np.minimum(np.abs(np.random.default_rng(0).normal(0, 4, 10_000)), 6.0).astype(np.float32)
    obs = make_observer("entropy")
    obs.update(relu6, 0.0, 6.0)
    assert (relu6 == 6.0).mean() > 0.1 and obs.clipped_fraction(0.0, 6.0) == 0.0  # the spike at the cap is kept
    assert obs.clipped_fraction(0.0, 5.0) == pytest.approx((relu6 > 5.0).mean(), abs=1e-3)
