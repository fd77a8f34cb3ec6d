"""One validator (converter/schema.py) for config files, job files (top level, jobs, verify blocks), the analysis
options and verify's thresholds: a bad key, a wrong type and a bad choice or range in each kind of file give one
error naming the key, the file and the line, and exit 2 from the CLI with nothing written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from converter.analysis.analyzer import AnalysisConfig
from converter.batch import VERIFY_KEYS, load_job_file
from converter.cli import main
from converter.errors import ConfigError
from converter.verify import THRESHOLD_KEYS, Thresholds


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A one-MatMul float model and four calibration samples: real inputs every command below accepts."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], rng.normal(size=12).astype(np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for i in range(4):
        np.save(tmp_path / "calib" / f"{i}.npy", rng.normal(size=(1, 4)).astype(np.float32))
    return tmp_path


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\n  fix: " in err and "Traceback" not in err
    return err


# --- config files (qconvert quantize --config) ------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ("weights:\n  bitz: 4\n", r"unknown config key 'weights.bitz' in .*bad.yaml, line 2"),  # bad key
    ("calibration:\n  method: minmax\n  batch_size: many\n",
     r"config key 'batch_size' in .*bad.yaml, line 3 must be an integer, got 'many'"),  # wrong type
    ("target: ort-cpu\nweights:\n  calib: best\n",
     r"config key 'weight_calib' in .*bad.yaml, line 3 must be one of minmax, mse; got 'best'"),  # bad choice
    ("target: tensorrtx\n", r"config key 'target' in .*bad.yaml, line 1 must be one of ort-cpu, tensorrt, qnn"),
    ("search:\n  metric: cosine\n  eval: e\n  ranking: fastest\n",
     r"config key 'search.ranking' in .*bad.yaml, line 4 must be one of propagated"),
    ("search:\n  metric: cosine\n  eval: e\n  max_drop: -0.5\n",  # out of range
     r"config key 'search.max_drop' in .*bad.yaml, line 4 must be >= 0, got -0.5"),
])
def test_config_file_errors_name_key_file_and_line(model_dir, capsys, body, message):
    cfg = _write(model_dir / "bad.yaml", body)
    out = model_dir / "out"
    err = _cli_error(capsys, ["quantize", str(model_dir / "m.onnx"), "--calib", str(model_dir / "calib"),
                              "--config", str(cfg), "-o", str(out), "-q"])
    assert re.search(message, err), err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


# --- job files (qconvert batch): top level, a job entry, its verify block ------------------------------------

JOB = "jobs:\n  - model: m.onnx\n    calib: calib\n"


@pytest.mark.parametrize("body, message", [
    # top level
    ("jobz: []\n", r"unknown key 'jobz' in .*jobs.yaml, line 1"),
    ("timeout: soon\n" + JOB, r"'timeout' in .*jobs.yaml, line 1 must be seconds per job, got 'soon'"),
    ("timeout: 0\n" + JOB, r"'timeout' in .*jobs.yaml, line 1 must be > 0, got 0"),
    # a job entry
    (JOB + "    modle: x.onnx\n", r"unknown key 'jobs\[0\].modle' in .*jobs.yaml, line 4"),
    (JOB + "    timeout: -5\n", r"'jobs\[0\].timeout' in .*jobs.yaml, line 4 must be > 0, got -5"),
    (JOB + "    calib_spec: [a, b]\n", r"'jobs\[0\].calib_spec' in .*jobs.yaml, line 4 must be an image "),
    # its verify block
    (JOB + "    verify:\n      min_cosin: 0.9\n", r"unknown key 'jobs\[0\].verify.min_cosin' in .*jobs.yaml, line 5"),
    (JOB + "    verify:\n      batch_size: 0\n",
     r"'jobs\[0\].verify.batch_size' in .*jobs.yaml, line 5 must be >= 1, got 0"),
    (JOB + "    verify:\n      labels: l.npy\n      max_top1_drop: 5\n",
     r"'jobs\[0\].verify.max_top1_drop' in .*jobs.yaml, line 6 must be in \[0, 1\], got 5"),
    (JOB + "    verify:\n      min_agreement: high\n",
     r"'jobs\[0\].verify.min_agreement' in .*jobs.yaml, line 5 must be a number, auto or null, got 'high'"),
])
def test_job_file_errors_name_key_file_and_line_from_the_cli(model_dir, capsys, body, message):
    jobs = _write(model_dir / "jobs.yaml", body)
    err = _cli_error(capsys, ["batch", str(jobs)])
    assert re.search(message, err), err
    assert not (model_dir / "jobs-out").exists()


def test_verify_block_takes_what_thresholds_take(model_dir):
    """The verify block's threshold rows are Thresholds' own rows: 'auto' is valid in both, 'high' in neither."""
    assert all(VERIFY_KEYS[k] is THRESHOLD_KEYS[k] for k in THRESHOLD_KEYS)
    spec = load_job_file(_write(model_dir / "jobs.yaml", JOB + "    verify: {min_agreement: auto, min_cosine: 0.5}\n"))
    assert spec.jobs[0].verify.thresholds == Thresholds(min_agreement="auto", min_cosine=0.5)
    with pytest.raises(ConfigError, match=r"threshold 'min_agreement' in the verify thresholds must be a number"):
        Thresholds(min_agreement="high")
    with pytest.raises(ConfigError, match=r"threshold 'min_cosine' .* must be in \[-1, 1\], got 2"):
        Thresholds(min_cosine=2.0)


# --- the analysis options (Python API and qconvert analyze) ------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"worst": 0}, r"analysis option 'worst' .* must be >= 1, got 0"),
    ({"batch_size": "8"}, r"analysis option 'batch_size' .* must be an integer, got '8'"),
    ({"layer_metric": "l2"}, r"analysis option 'layer_metric' .* must be one of same, cosine"),
    ({"tolerance": float("nan")}, r"analysis option 'tolerance' .* must be >= 0"),
])
def test_analysis_options_errors_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AnalysisConfig(**kwargs)


def test_analyze_cli_bad_option_exits_2(model_dir, capsys):
    out = model_dir / "analysis"
    err = _cli_error(capsys, ["analyze", str(model_dir / "m.onnx"), "--calib", str(model_dir / "calib"),
                              "-o", str(out), "--eval-samples", "-1"])
    assert "analysis option 'eval_samples'" in err and "must be >= 0, got -1" in err
    assert not out.exists()
