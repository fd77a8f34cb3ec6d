"""The executor behind ``qconvert batch``: the same summary, outputs, resume and exit codes from every
executor (local processes; Ray where the ``ray`` extra is installed), and a clear error without Ray."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from converter.batch import run_batch
from converter.cli import main

from .test_batch import DIGITS, GOOD_JOB, _jobs, _summary, workdir  # noqa: F401  (workdir: a fixture)

# Ray where it is installed (pip install '.[ray]'); tools/batch_executors.py states the comparison otherwise
EXECUTORS = ["local"] + (["ray"] if importlib.util.find_spec("ray") else [])

FIRST_RUN: dict[str, dict] = {}  # executor -> summary of its first run (local runs first)

CONTRACT_JOBS = GOOD_JOB + f"""
  - name: killed
    model: "nets.py:sigkill"
    input_shape: [1, 1, 8, 8]
    calib: {DIGITS}
  - name: corrupt
    model: corrupt.onnx
    calib: {DIGITS}
"""


@pytest.mark.parametrize("executor", EXECUTORS)
def test_executor_contract(workdir, executor, capsys):  # noqa: F811
    jobs = _jobs(workdir, f"contract-{executor}", CONTRACT_JOBS)
    out = workdir / f"contract-{executor}"
    batch = run_batch(jobs, jobs=2, executor=executor)
    rows = _summary(out)
    assert {n: (r["status"], r["stage"]) for n, r in rows.items()} == {
        "good": ("ok", ""), "killed": ("failed", "worker"), "corrupt": ("failed", "quantize")}
    assert "SIGKILL" in rows["killed"]["error"] and batch.exit_code != 0
    FIRST_RUN[executor] = {n: (r["status"], r["stage"], r["error"].replace(str(out), "OUT"))
                           for n, r in rows.items()}
    if executor != "local":  # byte-identical to the local executor's outputs, the same summary
        local = workdir / "contract-local" / "good"
        assert local.is_dir()
        for f in ("good.qdq.onnx", "good.encodings"):
            assert (out / "good" / f).read_bytes() == (local / f).read_bytes()
        assert FIRST_RUN[executor] == FIRST_RUN["local"]
    # resume: the successful job is skipped, the failed ones run again
    again = run_batch(jobs, jobs=2, executor=executor, resume=True)
    assert {r.name: r.status for r in again.results} == {"good": "skipped", "killed": "failed", "corrupt": "failed"}
    assert again.exit_code == batch.exit_code


def test_ray_executor_without_ray_is_one_clear_error(workdir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra looks like
    jobs = _jobs(workdir, "noray", GOOD_JOB)
    code = main(["batch", str(jobs), "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --executor ray needs Ray" in err and "pip install '.[ray]'" in err
    assert "Traceback" not in err
    assert main(["batch", str(jobs), "--address", "10.0.0.1:6379"]) == 2
    assert "--address is for --executor ray" in capsys.readouterr().err
    assert not (workdir / "noray" / "good").exists()
