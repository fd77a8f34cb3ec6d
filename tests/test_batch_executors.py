"""The executor behind ``qconvert batch``: the same summary, outputs, resume and exit codes from every
executor (local processes; Ray where the ``ray`` extra is installed), per-job resources and threads,
data shared through Ray's object store, and a clear error without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from datetime import datetime

import pytest

from converter.batch import load_job_file, run_batch
from converter.cli import main
from converter.errors import ConfigError
from converter.executors import materialize, pack_data
from converter.resources import BASE_MEMORY, BASE_MEMORY_TORCH, MODEL_MEMORY_FACTOR

from .test_batch import DIGITS, GOOD_JOB, _jobs, _summary, _write, workdir  # noqa: F401  (workdir: a fixture)

# Ray where it is installed (pip install '.[ray]'); tools/batch_executors.py states the comparison otherwise
EXECUTORS = ["local"] + (["ray"] if importlib.util.find_spec("ray") else [])

FIRST_RUN: dict[str, dict] = {}  # executor -> summary of its first run (local runs first)
SHARED_RUN: dict[str, bytes] = {}  # executor -> good1's QDQ model in test_resources_threads_shared_data_retry


@pytest.fixture(scope="module")
def ray_session():
    """One Ray for the module's Ray runs (starting one costs ~10 s); the executors made here share it."""
    from converter.executors import RayExecutor

    owner = RayExecutor()
    yield owner
    owner.close()


def _executor(request, executor: str, **options):
    if executor == "local":
        return "local"
    from converter.executors import RayExecutor

    request.getfixturevalue("ray_session")
    return RayExecutor(**options)  # on the module's Ray: it does not start or stop one

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
def test_executor_contract(workdir, executor, request, capsys):  # noqa: F811
    jobs = _jobs(workdir, f"contract-{executor}", CONTRACT_JOBS)
    out = workdir / f"contract-{executor}"
    runner = _executor(request, executor, retries=0)  # (retries: test_resources_threads_shared_data_retry)
    batch = run_batch(jobs, jobs=2, executor=runner)
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
    again = run_batch(jobs, jobs=2, executor=runner, resume=True)
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
    assert main(["batch", str(jobs), "--ray-data", "copy"]) == 2
    assert "--ray-data is for --executor ray" in capsys.readouterr().err
    assert not (workdir / "noray" / "good").exists()


PROBES = """
import os, pathlib, signal
from nets import build

def threads_probe():    # what the worker's process was given
    pathlib.Path("omp.txt").write_text(os.environ.get("OMP_NUM_THREADS", ""))
    return build()

def killed_once():      # a worker killed mid-job (the OOM killer, a preempted node) the first time only
    marker = pathlib.Path(os.environ["PROBE_MARKER"])
    if not marker.exists():
        marker.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return build()
"""


@pytest.mark.parametrize("executor", EXECUTORS)
def test_resources_threads_shared_data_retry(workdir, executor, request, monkeypatch):  # noqa: F811
    """num_cpus sets each worker's threads; Ray: data goes into the object store once per content and is
    read from a node-local copy (data="copy": as on a node that does not see the path), outputs stay
    byte-identical; jobs that together exceed the cluster's CPUs do not run at once; a job no node can
    hold fails without starting; a worker killed once is retried. Local: memory is ignored."""
    (workdir / "probes.py").write_text(PROBES)
    monkeypatch.setenv("PROBE_MARKER", str(workdir / f"killed-once-{executor}"))
    ncpu = os.cpu_count()
    ray = executor != "local"
    good = "".join(GOOD_JOB.replace("name: good", f"name: good{i}") + f"    num_cpus: {ncpu}\n"
                   for i in ((1, 2) if ray else (1,)))
    jobs = _jobs(workdir, f"shared-{executor}", good + f"""
  - name: probe
    model: "probes.py:threads_probe"
    input_shape: [1, 1, 8, 8]
    calib: {DIGITS}
    num_cpus: 2
  - name: huge
    model: digits.onnx
    calib: {DIGITS}
    memory: 64TiB
""" + (f"""
  - name: flaky
    model: "probes.py:killed_once"
    input_shape: [1, 1, 8, 8]
    calib: {DIGITS}
""" if ray else ""))  # (the local executor does not retry: test_executor_contract's killed job)
    out = workdir / f"shared-{executor}"
    runner = _executor(request, executor, data="copy", cache=workdir / f"data-cache-{executor}")
    run_batch(jobs, jobs=4, executor=runner)
    rows = _summary(out)
    expected = {"good1": ("ok", ""), "probe": ("ok", ""), "huge": ("ok", "")}  # local: memory is not its business
    if ray:
        expected.update(good2=("ok", ""), flaky=("ok", ""), huge=("failed", "resources"))
    assert {n: (r["status"], r["stage"]) for n, r in rows.items()} == expected
    # threads: OpenMP and ONNX Runtime's intra-op threads = the job's num_cpus (rounded up)
    assert (out / "probe" / "omp.txt").read_text() == "2"
    assert json.loads((out / "probe" / "probe.report.json").read_text())["config"]["threads"] == 2
    assert json.loads((out / "good1" / "good1.report.json").read_text())["config"]["threads"] == ncpu
    SHARED_RUN[executor] = (out / "good1" / "good1.qdq.onnx").read_bytes()
    if not ray:
        return
    # read from the object store's copy: the same bytes as the local executor's, and as each other
    assert SHARED_RUN["ray"] == SHARED_RUN["local"] == (out / "good2" / "good2.qdq.onnx").read_bytes()
    # one object per distinct content: the calibration folder, the eval folder, the labels file
    eval_files = [p for p in (workdir / "eval").iterdir() if p.is_file()]
    assert runner.puts == 3 and runner.put_bytes == sum(p.stat().st_size for p in
                                                        [*DIGITS.iterdir(), *eval_files, workdir / "labels.npy"])
    log = (out / "good1" / "job.log").read_text()
    assert f"calib {DIGITS} read from Ray's object store copy {workdir / 'data-cache-ray'}" in log
    assert "retry 1 of 2" in (out / "flaky" / "job.log").read_text()
    assert "no node of the Ray cluster has that much" in rows["huge"]["error"]
    # back-pressure: each good job holds every CPU of the cluster, so they ran one after the other
    spans = sorted((datetime.fromisoformat(rows[n]["started_at"]), datetime.fromisoformat(rows[n]["finished_at"]))
                   for n in ("good1", "good2"))
    assert spans[0][1] <= spans[1][0]


def test_job_resources_defaults_and_overrides(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x" * 1000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.npy").write_bytes(b"y" * 500)
    jf = load_job_file(_write(tmp_path / "jobs.yaml", """
        defaults: {num_cpus: 2, calib_method: minmax}
        jobs:
          - {name: derived, model: m.onnx, calib: d}
          - {name: given, model: m.onnx, calib: d, num_cpus: 0.5, memory: 1.5GiB, num_gpus: 1}
          - {name: gpu, model: m.onnx, calib: d, config: {providers: cuda}}
          - {name: torch, model: "nets.py:build", input_shape: [1, 2], calib: d, memory: 300MB}
        """))
    r = {j.name: j.resources for j in jf.jobs}
    assert (r["derived"].num_cpus, r["derived"].memory, r["derived"].num_gpus) == (
        2.0, BASE_MEMORY + MODEL_MEMORY_FACTOR * 1000 + 500, 0.0)
    assert r["derived"].given == ("num_cpus",) and r["derived"].threads == 2
    assert (r["given"].num_cpus, r["given"].memory, r["given"].num_gpus, r["given"].threads) == (0.5, 3 << 29, 1.0, 1)
    assert r["gpu"].num_gpus == 1.0
    assert r["torch"].memory == 300 * 10**6 and BASE_MEMORY_TORCH > BASE_MEMORY
    assert jf.jobs[0].config.calib_method == "minmax" and jf.jobs[0].config.threads == 0


@pytest.mark.parametrize("body, message", [
    ("jobs:\n  - model: m.onnx\n    calib: d\n    num_cpus: 0\n",
     r"'num_cpus' in .*bad.yaml, line 4 \(job 'm'\) must be > 0"),
    ("jobs:\n  - model: m.onnx\n    calib: d\n    num_gpus: many\n",
     r"'jobs\[0\].num_gpus' in .*bad.yaml, line 4 must be a number of GPUs"),
    ("jobs:\n  - model: m.onnx\n    calib: d\n    memory: lots\n",
     r"'memory' in .*bad.yaml, line 4 \(job 'm'\) must be a size"),
    ("jobs:\n  - model: m.onnx\n    calib: d\n    memory: 4GX\n", r"unknown unit 'gx'"),
    ("defaults:\n  memory: 4096\njobs:\n  - model: m.onnx\n    calib: d\n",
     r"'memory' in .*bad.yaml, line 2 is 4096 bytes, less than 1 MiB"),
    ("defaults:\n  num_gpus: -1\njobs:\n  - model: m.onnx\n    calib: d\n",
     r"'num_gpus' in .*bad.yaml, line 2 must be >= 0"),
])
def test_resource_errors_name_key_file_and_line(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_job_file(_write(tmp_path / "bad.yaml", body))


def test_shared_data_materializes_once_where_the_path_is_not_visible(tmp_path):
    src = tmp_path / "calib"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.npy").write_bytes(bytes([i]) * (100 + i))
    info, blobs = pack_data(src)
    fetches = []

    def fetch():
        fetches.append(1)
        return blobs

    cache = tmp_path / "cache"
    assert materialize(info, fetch, cache=cache) == str(src) and not fetches  # visible: the path itself
    gone = {**info, "path": str(tmp_path / "elsewhere" / "calib")}  # as on a node that does not see it
    local = materialize(gone, fetch, cache=cache)
    assert local == str(cache / info["digest"] / "calib") and len(fetches) == 1
    assert {p.name: p.read_bytes() for p in sorted((cache / info["digest"] / "calib").iterdir())} == blobs
    assert materialize(gone, fetch, cache=cache) == local and len(fetches) == 1  # the node's copy is reused
    assert materialize(info, fetch, copy=True, cache=cache) == local and len(fetches) == 1
    (src / "0.npy").write_bytes(b"changed")  # other bytes: another digest, not the stale copy
    assert pack_data(src)[0]["digest"] != info["digest"]
    one, one_blobs = pack_data(src / "1.npy")
    path = materialize({**one, "path": str(tmp_path / "x" / "1.npy")}, lambda: one_blobs, cache=cache)
    assert path.endswith("1.npy") and open(path, "rb").read() == one_blobs["1.npy"]
    assert not list(cache.glob(".tmp-*"))
