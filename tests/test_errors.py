"""Every error a user can cause: one clear message with a fix, exit code 2, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter.cli import main

from .conftest import ROOT, parse

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
m (float[N,3,4,4] x) => (float[N,2,4,4] y) {
  c = Conv(x, W)
  y = Relu(c)
}
"""


@pytest.fixture()
def model_path(tmp_path):
    m = parse(MODEL, W=np.random.default_rng(0).normal(0, 0.3, (2, 3, 1, 1)).astype(np.float32))
    p = tmp_path / "m.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def calib_dir(tmp_path, arrays: dict[str, np.ndarray], suffix=".npy") -> Path:
    d = tmp_path / "calib"
    d.mkdir(exist_ok=True)
    for name, a in arrays.items():
        if suffix == ".npy":
            np.save(d / f"{name}.npy", a)
        else:
            np.savez(d / f"{name}.npz", **a)
    return d


def quantize_cli(capsys, model, calib, out, *extra) -> tuple[int, str]:
    code = main(["quantize", str(model), "--calib", str(calib), "-o", str(out), *extra])
    return code, capsys.readouterr().err


def assert_clean(out: Path) -> None:
    """No model, encodings, report or temp file left behind."""
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


GOOD = np.zeros((3, 4, 4), np.float32)


def test_missing_model_file(tmp_path, capsys):
    code, err = quantize_cli(capsys, tmp_path / "nope.onnx", tmp_path, tmp_path / "out")
    assert code == 2 and "model file not found" in err and "fix:" in err
    assert_clean(tmp_path / "out")


def test_corrupt_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    code, err = quantize_cli(capsys, bad, calib_dir(tmp_path, {"a": GOOD}), tmp_path / "out")
    assert code == 2 and "bad.onnx" in err and ("corrupt" in err or "not ONNX" in err or "no graph" in err)
    assert "Traceback" not in err
    assert_clean(tmp_path / "out")


@pytest.mark.parametrize("arrays,suffix,message", [
    ({"a": {"wrong_name": GOOD}}, ".npz", "the model expects ['x']"),
    ({"a": np.zeros((3, 5, 4), np.float32)}, ".npy", "axis 2: 5 != 4"),
    ({"a": np.zeros((4, 4), np.float32)}, ".npy", "has shape [4, 4]"),
    ({"a": GOOD.astype(np.int32)}, ".npy", "dtype int32, the model expects float32"),
    ({"a": np.full((3, 4, 4), np.nan, np.float32)}, ".npy", "NaN/Inf"),
])
def test_bad_calibration_arrays(model_path, tmp_path, capsys, arrays, suffix, message):
    code, err = quantize_cli(capsys, model_path, calib_dir(tmp_path, arrays, suffix), tmp_path / "out")
    assert code == 2, err
    assert message in err and "fix:" in err
    assert_clean(tmp_path / "out")


def test_empty_calibration_directory(model_path, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = quantize_cli(capsys, model_path, tmp_path / "empty", tmp_path / "out")
    assert code == 2 and "no calibration samples" in err
    assert_clean(tmp_path / "out")


def test_missing_calibration_directory(model_path, tmp_path, capsys):
    code, err = quantize_cli(capsys, model_path, tmp_path / "nothing", tmp_path / "out")
    assert code == 2 and "error: calibration data not found: " in err, err  # the data's error, no technique's name
    assert_clean(tmp_path / "out")


def test_images_without_spec(model_path, tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.jpg").write_bytes((ROOT / "calib_data" / "photos" / "coffee.jpg").read_bytes())
    code, err = quantize_cli(capsys, model_path, d, tmp_path / "out")
    assert code == 2 and "preprocess.yaml" in err


def test_unwritable_output_dir(model_path, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = quantize_cli(capsys, model_path, calib_dir(tmp_path, {"a": GOOD}), blocker / "out")
    assert code == 2 and f"below {blocker}, which is an existing file" in err and "fix:" in err
    assert "permissions" not in err
    code, err = quantize_cli(capsys, model_path, calib_dir(tmp_path, {"a": GOOD}), blocker)  # -o is the file itself
    assert code == 2 and f"{blocker} is an existing file, not a folder" in err and "permissions" not in err
    assert blocker.read_text() == "not a directory"


def test_bad_config_names_key_and_line(model_path, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("target: ort-cpu\ncalib_methd: minmax\n")
    code, err = quantize_cli(capsys, model_path, calib_dir(tmp_path, {"a": GOOD}), tmp_path / "out", "--config",
                             str(cfg))
    assert code == 2 and "'calib_methd'" in err and "line 2" in err and "cfg.yaml" in err
    cfg.write_text("per_channel: 3\n")
    code, err = quantize_cli(capsys, model_path, calib_dir(tmp_path, {"a": GOOD}), tmp_path / "out", "--config",
                             str(cfg))
    assert code == 2 and "per_channel" in err and "true or false" in err


def test_encodings_for_another_model(model_path, tmp_path, capsys):
    enc = tmp_path / "other.encodings"
    enc.write_text('{"version": "1.0.0", "activation_encodings": [{"name": "not_here", "enc_type": "PER_TENSOR", '
                   '"dtype": "INT", "bw": 8, "is_sym": false, "scale": [0.1], "offset": [-10]}], '
                   '"param_encodings": []}')
    code = main(["apply-encodings", str(model_path), str(enc), "-o", str(tmp_path / "o" / "q.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "'not_here' is not in the model" in err
    assert not (tmp_path / "o" / "q.onnx").exists()


def test_encodings_for_a_missing_model_file(model_path, tmp_path, capsys):
    """The quantize report beside the encodings records the model they were made for; a model path that does not
    exist is still one clear error (it used to end in a traceback from the report check)."""
    code, err = quantize_cli(capsys, model_path, calib_dir(tmp_path, {"a": GOOD}), tmp_path / "out")
    assert code == 0, err
    out = tmp_path / "o" / "q.onnx"
    code = main(["apply-encodings", str(tmp_path / "gone.onnx"), str(tmp_path / "out" / "m.encodings"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "model file not found" in err and "Traceback" not in err
    assert not out.exists()


def test_success_leaves_only_the_three_outputs(model_path, tmp_path, capsys):
    code, err = quantize_cli(capsys, model_path, calib_dir(tmp_path, {"a": GOOD + 1}), tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.encodings", "m.qdq.onnx", "m.report.json"]
