"""``qconvert batch``: isolated jobs, clear failure reasons, summaries, --resume, job-file validation,
and determinism (same inputs + config -> byte-identical model and encodings)."""

from __future__ import annotations

import csv
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from converter import QuantConfig, quantize
from converter.batch import input_hash, load_job_file, run_batch
from converter.cli import main
from converter.errors import ConfigError

from .test_verify import make_digits_assets

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "calib_data" / "digits"

FACTORIES = '''
import os, signal, time
import torch

def build():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 8 * 8, 10))

def sigkill():          # what the kernel's OOM killer does
    os.kill(os.getpid(), signal.SIGKILL)

def hard_exit():        # a native library calling exit() from under us
    os._exit(7)

def hang():
    time.sleep(600)
'''


@pytest.fixture(scope="module")
def workdir(digits, tmp_path_factory):
    """A job folder: the digits CNN as ONNX + held-out data, a corrupt ONNX file, crashing factories."""
    base = tmp_path_factory.mktemp("batch")
    make_digits_assets(digits, base)
    shutil.copy(digits["path"], base / "digits.onnx")
    (base / "corrupt.onnx").write_bytes(digits["path"].read_bytes()[:3000])
    (base / "nets.py").write_text(FACTORIES)
    return base


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


GOOD_JOB = f"""
  - name: good
    model: digits.onnx
    calib: {DIGITS}
    verify: {{data: eval, labels: labels.npy, min_agreement: 0.98}}
"""


def _jobs(workdir: Path, out: str, jobs: str, defaults: str = "{calib_method: minmax}") -> Path:
    return _write(workdir / f"{out}.yaml", f"defaults: {defaults}\noutput_dir: {out}\njobs:{jobs}")


def _summary(out: Path) -> dict[str, dict]:
    return {j["name"]: j for j in json.loads((out / "summary.json").read_text())["jobs"]}


def test_failures_are_isolated_and_reported(workdir, capsys):
    jobs = _jobs(workdir, "mixed", GOOD_JOB + f"""
  - name: corrupt
    model: corrupt.onnx
    calib: {DIGITS}
  - name: wrong-input
    model: nets.py:build
    input_shape: [1, 3, 8, 8]
    calib: {DIGITS}
  - name: killed
    model: nets.py:sigkill
    input_shape: [1, 1, 8, 8]
    calib: {DIGITS}
  - name: exits
    model: nets.py:hard_exit
    input_shape: [1, 1, 8, 8]
    calib: {DIGITS}
  - name: hangs
    model: nets.py:hang
    input_shape: [1, 1, 8, 8]
    calib: {DIGITS}
    timeout: 4
""")
    code = main(["batch", str(jobs), "--jobs", "2"])
    out, _ = capsys.readouterr()
    assert code == 1
    assert out.rstrip().splitlines()[-1] == "FAILED: corrupt, wrong-input, killed, exits, hangs"
    res = _summary(workdir / "mixed")
    good = res["good"]
    assert good["status"] == "ok" and good["quantize"]["quantized"].endswith("/6/6")  # activations/weights/biases
    assert good["verify"]["passed"] and good["verify"]["min_agreement"] >= 0.98
    assert sorted(good["outputs"].values()) == ["good.encodings", "good.qdq.onnx", "good.report.json", "good.verify.json"]
    for f in good["outputs"].values():
        assert (workdir / "mixed" / "good" / f).stat().st_size > 0
    expect = {
        "corrupt": ("quantize", "cannot read", "corrupt.onnx as an ONNX model"),
        "wrong-input": ("export", "torch.export failed on Sequential", "to have 1 channels"),
        "killed": ("worker", "worker killed by SIGKILL", "out of memory?"),
        "exits": ("worker", "worker exited with code 7 without a result", ""),
        "hangs": ("timeout", "timed out after 4 s", ""),
    }
    for name, (stage, *needles) in expect.items():
        assert res[name]["status"] == "failed" and res[name]["stage"] == stage, res[name]
        assert all(n in res[name]["error"] for n in needles), res[name]["error"]
        job_dir = workdir / "mixed" / name
        assert json.loads((job_dir / "job.json").read_text())["status"] == "failed"
        assert not list(job_dir.glob("*.onnx"))  # nothing half-written
    rows = list(csv.DictReader((workdir / "mixed" / "summary.csv").open()))
    assert [r["job"] for r in rows] == list(res) and rows[0]["status"] == "ok"
    assert not [p for p in (workdir / "mixed").iterdir() if p.name.startswith(".")]  # no staging left behind
    table = out.split("\n\n")[0]
    assert "good" in table and "failed (timeout)" in table and "97." in table


SIN_ONLY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 1, 8, 8] input) => (float[N, 1, 8, 8] y) { y = Sin(input) }
"""


def test_resume_skips_unchanged_and_reruns_changed(workdir, capsys):
    onnx.save(onnx.parser.parse_model(SIN_ONLY), workdir / "sin.onnx")
    jobs = _jobs(workdir, "resume", GOOD_JOB + f"""
  - name: corrupt
    model: corrupt.onnx
    calib: {DIGITS}
  - model: sin.onnx
    calib: {DIGITS}
""")
    first = run_batch(jobs, jobs=2)
    assert [r.status for r in first.results] == ["ok", "failed", "ok"]
    assert first.results[2].note.startswith("nothing was quantized (1 node(s) left in float)")
    job_json = workdir / "resume" / "good" / "job.json"
    before = job_json.read_bytes(), job_json.stat().st_mtime_ns
    corrupt_before = json.loads((workdir / "resume" / "corrupt" / "job.json").read_text())["started_at"]

    stale = workdir / "resume" / ".staging-good-999999999"  # left by a batch process that was killed
    stale.mkdir()
    assert main(["batch", str(jobs), "--resume"]) == 1
    assert not stale.exists()
    out, _ = capsys.readouterr()
    second = _summary(workdir / "resume")
    assert second["good"]["status"] == "skipped" and second["corrupt"]["status"] == "failed"
    assert second["sin"]["status"] == "skipped"
    assert (job_json.read_bytes(), job_json.stat().st_mtime_ns) == before  # not re-run
    assert json.loads((workdir / "resume" / "corrupt" / "job.json").read_text())["started_at"] != corrupt_before
    assert "2 skipped (unchanged), 1 failed" in out and "nothing was quantized" in out

    # a changed config changes the hash: the job runs again
    _jobs(workdir, "resume", GOOD_JOB, defaults="{calib_method: minmax, per_channel: false}")
    third = run_batch(jobs, resume=True)
    assert [r.status for r in third.results] == ["ok"] and third.exit_code == 0
    assert json.loads(job_json.read_text())["input_hash"] != json.loads(before[0])["input_hash"]
    assert json.loads(job_json.read_text())["started_at"] != json.loads(before[0])["started_at"]


def test_outputs_are_byte_identical_across_runs(workdir, tmp_path):
    """Determinism: the batch job above and direct runs into two folders give the same bytes."""
    for config in (QuantConfig(), QuantConfig(calib_method="percentile", per_channel=False, target="tensorrt")):
        a = quantize(workdir / "digits.onnx", DIGITS, config, tmp_path / "a", name="m")
        b = quantize(workdir / "digits.onnx", DIGITS, config, tmp_path / "b", name="m")
        assert a.model_path.read_bytes() == b.model_path.read_bytes()
        assert a.encodings_path.read_bytes() == b.encodings_path.read_bytes()
    c = quantize(workdir / "digits.onnx", DIGITS, QuantConfig(), tmp_path / "c", name="good")
    batch_dir = workdir / "mixed" / "good"
    if batch_dir.is_dir():  # written by test_failures_are_isolated_and_reported in its worker process
        assert (batch_dir / "good.qdq.onnx").read_bytes() == c.model_path.read_bytes()
        assert (batch_dir / "good.encodings").read_bytes() == c.encodings_path.read_bytes()


@pytest.mark.parametrize("body, message", [
    ("jobs:\n  - model: m.onnx\n    calib: d\n    modle: x.onnx\n",
     r"unknown key 'jobs\[0\].modle' in .*bad.yaml, line 4"),
    ("jobs:\n  - model: m.onnx\n    calib: d\n    input_shape: 1x3\n",
     r"'jobs\[0\].input_shape' in .*bad.yaml, line 4 must be a list of positive integers"),
    ("jobs:\n  - model: m.onnx\n    calib: d\n    config:\n      per_chanel: false\n",
     r"unknown config key 'per_chanel' in .*bad.yaml \(job 'm'\), line 5"),
    ("defaults:\n  batch_size: many\njobs:\n  - model: m.onnx\n    calib: d\n",
     r"config key 'batch_size' in .*bad.yaml \(defaults\), line 2 must be an integer"),
    ("jobs:\n  - model: m.onnx\n    calib: d\n    verify: {min_cosine: high}\n",
     r"'jobs\[0\].verify.min_cosine' in .*bad.yaml, line 4 must be a number or null"),
    ("jobs:\n  - model: nets.py:build\n    calib: d\n",
     r"jobs\[0\] \(nets\) in .*bad.yaml, line 2: the PyTorch model 'nets.py:build' needs input_shape"),
    ("jobs:\n  - model: a/m.onnx\n    calib: d\n  - model: b/m.onnx\n    calib: d\n",
     r"job name 'm' is used twice in .*bad.yaml, line 4"),
    ("jobs:\n  - calib: d\n", r"jobs\[0\] in .*bad.yaml, line 2 has no 'model'"),
    ("jobs:\n  - model: m.onnx\n    calib: d\n    input_shape: [1, 3]\n",
     r"jobs\[0\] \(m\) in .*bad.yaml, line 4: input_shape is for PyTorch models"),
    ("output_dir: 3\njobs: []\n", r"'output_dir' in .*bad.yaml, line 1 must be a folder path"),
    ("jobz: []\n", r"unknown key 'jobz' in .*bad.yaml, line 1"),
])
def test_job_file_errors_name_key_file_and_line(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_job_file(_write(tmp_path / "bad.yaml", body))


def test_job_file_paths_and_cli_exit_code(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    jf = _write(tmp_path / "sub" / "jobs.yaml", """
        defaults: {target: tensorrt}
        timeout: 30
        jobs:
          - model: ../models/net.onnx
            calib: calib/
            config: {per_channel: false}
            verify: true
          - name: torchnet
            model: nets.py:build
            input_shape: [1, 1, 8, 8]
            calib: /abs/calib
    """)
    spec = load_job_file(jf)
    a, b = spec.jobs
    assert spec.output_dir == jf.parent.resolve() / "jobs-out" and spec.timeout == 30
    assert a.name == "net" and a.model == str(tmp_path / "sub" / ".." / "models" / "net.onnx")
    assert a.config.target == "tensorrt" and a.config.per_channel is False
    assert a.verify.data == a.calib and a.verify.thresholds.min_cosine == 0.99
    assert b.is_torch and b.model == f"{tmp_path / 'sub' / 'nets.py'}:build" and b.input_shape == (1, 1, 8, 8)
    assert input_hash(a) != input_hash(b)
    bad = _write(tmp_path / "bad.yaml", "jobs:\n  - model: m.onnx\n    calib: d\n    verify: {max_top1_drop: 0.1}\n")
    assert main(["batch", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "needs labels" in err and "line 4" in err and "fix:" in err


def test_a_job_whose_model_is_slower_than_its_latency_limit_fails_with_its_outputs_kept(tmp_path):
    """A plain quantize job whose written model breaks its latency limit (the job's max_latency_ratio, here one no
    model can meet) is a failed job at its quantize stage, with the gate's message and fix, and its model,
    encodings and report (latency_gate) kept in the output folder."""
    rng = np.random.default_rng(0)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    c = 64  # 604 M MACs: well over the 1 ms below which a model is not timed (no ratio, no gate), on any CPU
    graph = helper.make_graph(
        [conv], "wide", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", c, 128, 128])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", c, 128, 128])],
        [numpy_helper.from_array(rng.normal(0, 0.04, (c, c, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(c, np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "wide.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "x.npy", rng.normal(0, 1, (4, c, 128, 128)).astype(np.float32))
    jobs = _jobs(tmp_path, "out", "\n  - name: wide\n    model: wide.onnx\n    calib: calib\n"
                 "    config: {max_latency_ratio: 0.001}\n")
    assert main(["batch", str(jobs)]) == 1
    job = _summary(tmp_path / "out")["wide"]
    assert job["status"] == "failed" and job["stage"] == "quantize", job
    assert "slower than allowed" in job["error"] and "--max-latency-ratio" in job["fix"], job
    folder = tmp_path / "out" / "wide"
    report = json.loads((folder / job["outputs"]["report"]).read_text())
    assert report["latency_gate"]["passed"] is False and report["latency_gate"]["max_latency_ratio"] == 0.001
    assert (folder / job["outputs"]["model"]).is_file() and (folder / job["outputs"]["encodings"]).is_file()
