"""The same job file through ``qconvert batch`` with the local executor and with Ray, side by side.

Seven jobs on shared assets and the bundled models, sharing calibration / verification data, one
deliberately broken:

===================== =====================================================================
digits-cnn            models/digits_cnn.py:build (exported first), calib_data/digits, eval_data/digits
digits-cnn-percentile the same model and data, calib_method percentile
digits-detector       models/digits_detector.py:build, 64 canvases to calibrate, 128 to verify
resnet8, -large       CIFAR-10: the same 200 images calibrate both, 500 more verify both (labels)
efficientnet-lite0    ImageNet samples (JPEGs + preprocess.yaml): 32 calibrate, 64 verify (labels)
corrupt               a truncated copy of resnet8_cifar10.onnx (fails in quantize)
===================== =====================================================================

Runs, each ``python -m converter batch jobs.yaml --jobs J -o DIR`` as a user would run it:

1. ``local``;  2. ``--executor ray`` (a local Ray with this machine's CPUs);
3. ``--executor ray`` again, into a fresh folder, with the worker of ``efficientnet-lite0`` killed
   (SIGKILL to its process, from outside) once its job.log says calibration is done (``--kill-at``):
   the task starts it again, the batch completes;  4. run 3's command with ``--resume``: finished jobs are
   skipped, the broken one runs again;  5. ``--executor ray --ray-data copy``: every data path is read
   from the node-local copy of its object-store object (as on a node that does not see the path).

Checks: every QDQ model, encodings file and exported float model has the same SHA-256 in every run;
the summaries (status, stage, error, fix, figures; not the timings) are equal; exit codes equal.
Needs Ray (``pip install '.[ray]'``); prints one table.

Usage::

    python -m tools.batch_executors [--assets DIR] [--work DIR] [--jobs 2] [--kill-at TEXT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from .benchlib.assets import add_assets_argument, assets_or_exit, cifar10_test, resnet8_input
from .benchlib.tasks import ROOT, load_models_module


COMPARED = (".qdq.onnx", ".encodings", ".float.onnx")  # the outputs that must be byte-identical
KILL_JOB = "efficientnet-lite0"


def prepare(assets: Path, work: Path) -> dict:
    from .batch_assets import EFFNET_SPEC

    make_data = load_models_module("digits_detector").make_data

    det_c, det_e = work / "det-calib", work / "det-eval"
    for folder, (n, seed) in ((det_c, (64, 0)), (det_e, (128, 1))):
        folder.mkdir(exist_ok=True)
        np.save(folder / "x.npy", make_data(n, seed)[0])
    images, cifar_labels = cifar10_test(assets, 700)  # class-interleaved: the file is sorted by class
    x = resnet8_input(images)
    cif_c, cif_e = work / "cifar-calib", work / "cifar-eval"
    cif_c.mkdir(exist_ok=True)
    cif_e.mkdir(exist_ok=True)
    np.save(cif_c / "000.npy", x[:200])
    np.save(cif_e / "000.npy", x[200:700])
    np.save(work / "cifar-labels.npy", cifar_labels[200:700].astype(np.int64))
    h = assets / "imagenet-samples"
    rows = [r.split("\t") for r in (h / "labels.tsv").read_text().splitlines()[1:]]
    img_c, img_e = work / "imagenet-calib", work / "imagenet-eval"
    for folder, part in ((img_c, rows[:32]), (img_e, rows[32:96])):
        folder.mkdir(exist_ok=True)
        (folder / "preprocess.yaml").write_text(yaml.safe_dump(EFFNET_SPEC))
        for r in part:
            (folder / r[0]).unlink(missing_ok=True)
            (folder / r[0]).symlink_to(h / "images" / r[0])
    np.save(work / "imagenet-labels.npy", np.array([int(r[1]) for r in sorted(rows[32:96])], np.int64))
    corrupt = work / "corrupt.onnx"
    corrupt.write_bytes((assets / "cifar10-resnet8" / "resnet8_cifar10.onnx").read_bytes()[:100_000])
    digits = {"input_shape": [1, 1, 8, 8], "calib": str(ROOT / "calib_data" / "digits"),
              "verify": {"data": str(ROOT / "eval_data" / "digits"),
                         "labels": str(ROOT / "eval_data" / "digits_labels.txt"), "min_agreement": 0.95}}
    cifar = {"calib": str(cif_c), "verify": {"data": str(cif_e), "labels": str(work / "cifar-labels.npy"),
                                             "min_agreement": 0.9}}
    jobs = [
        {"name": "digits-cnn", "model": f"{ROOT / 'models' / 'digits_cnn.py'}:build", **digits},
        {"name": "digits-cnn-percentile", "model": f"{ROOT / 'models' / 'digits_cnn.py'}:build", **digits,
         "config": {"calib_method": "percentile"}},
        {"name": "digits-detector", "model": f"{ROOT / 'models' / 'digits_detector.py'}:build",
         "input_shape": [1, 1, 32, 32], "calib": str(det_c), "verify": {"data": str(det_e), "min_cosine": 0.98}},
        {"name": "resnet8", "model": str(assets / "cifar10-resnet8" / "resnet8_cifar10.onnx"), **cifar},
        {"name": "resnet8-large", "model": str(assets / "cifar10-resnet8" / "resnet8_large_cifar10.onnx"), **cifar},
        {"name": KILL_JOB, "model": str(assets / "efficientnet-lite0" / "efficientnet-lite0_opset13.onnx"),
         "calib": str(img_c), "verify": {"data": str(img_e), "labels": str(work / "imagenet-labels.npy"),
                                          "min_agreement": 0.9, "max_top1_drop": 0.05}},
        {"name": "corrupt", "model": str(corrupt), "calib": str(cif_c)},
    ]
    return {"defaults": {"target": "ort-cpu", "calib_method": "minmax"}, "output_dir": "out-default",
            "timeout": 1800, "jobs": jobs}


def worker_pid(job: str) -> int | None:
    """The pid of the batch worker (``python -m converter.batch worker.json``) running ``job``."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if b"converter.batch" in cmd and b"worker.json" in cmd and Path(cwd).name.startswith(f".staging-{job}-"):
            return int(d.name)
    return None


def killer(job: str, marker: str, note: dict) -> None:
    """SIGKILL ``job``'s first worker once its job.log shows ``marker`` (mid-job: calibration done)."""
    while not note.get("stop"):
        pid = worker_pid(job)
        if pid:
            try:
                log = Path(os.readlink(f"/proc/{pid}/cwd")) / "job.log"
                lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            except OSError:
                lines = []
            if any(marker in ln for ln in lines):
                os.kill(pid, signal.SIGKILL)
                note.update(pid=pid, last_line=lines[-1][:100])
                return
        time.sleep(0.05)


def run(job_file: Path, out: Path, extra: list[str], jobs: int, kill_at: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "converter", "batch", str(job_file), "--jobs", str(jobs), "-o", str(out), *extra]
    note: dict = {}
    thread = threading.Thread(target=killer, args=(KILL_JOB, kill_at, note), daemon=True) if kill_at else None
    if thread:
        thread.start()
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    note["stop"] = True
    store = [ln.partition("converter: ")[2] for ln in proc.stderr.splitlines() if "Ray object store" in ln]
    summary = json.loads((out / "summary.json").read_text())
    return {"cmd": " ".join(["qconvert", "batch", job_file.name, "--jobs", str(jobs), "-o", out.name, *extra]),
            "code": proc.returncode, "wall": wall, "stdout": proc.stdout, "stderr": proc.stderr, "out": out,
            "summary": summary, "kill": note, "store": store[0] if store else "",
            "kill_log": (out / KILL_JOB / "job.log").read_text(errors="replace") if kill_at else ""}


def digests(out: Path) -> dict[str, str]:
    return {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*/*")) if p.name.endswith(COMPARED)}


def comparable(summary: dict, out: Path) -> dict:
    """The summary without timings (and with the output folder's path neutral)."""
    drop = {"seconds", "started_at", "finished_at"}
    jobs = {}
    for j in summary["jobs"]:
        row = {k: v for k, v in j.items() if k not in drop}
        row["status"] = "ok" if row["status"] == "skipped" else row["status"]  # --resume: the run it skipped
        row["quantize"] = {k: v for k, v in (j.get("quantize") or {}).items() if k != "seconds"}
        jobs[j["name"]] = json.loads(json.dumps(row).replace(str(out), "OUT"))
    return {"jobs": jobs, "exit_code": summary["exit_code"]}


def ray_startup_s() -> float:
    code = ("import os, time, ray; t = time.perf_counter(); ray.init(num_cpus=os.cpu_count(), "
            "include_dashboard=False, log_to_driver=False); print(time.perf_counter() - t); ray.shutdown()")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_assets_argument(ap)
    ap.add_argument("--work", help="work folder (default: a new temporary folder, kept)")
    ap.add_argument("--jobs", type=int, default=2, help="jobs in flight (both executors)")
    ap.add_argument("--kill-at", default="converter: calibrated",
                    help=f"kill {KILL_JOB}'s worker when its job.log shows this (default: calibration is done)")
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    try:
        import ray
    except ImportError:
        print("this check needs Ray: pip install '.[ray]'", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="batch_executors-"))
    work.mkdir(parents=True, exist_ok=True)
    job_file = work / "jobs.yaml"
    job_file.write_text(yaml.safe_dump(prepare(Path(args.assets), work), sort_keys=False))
    print(f"{job_file}: 7 jobs; ray {ray.__version__}, {os.cpu_count()} CPUs", flush=True)
    runs = {}
    for label, out, extra, kill in (("local", "out-local", [], None),
                                    ("ray", "out-ray", ["--executor", "ray"], None),
                                    ("ray, worker killed", "out-ray-kill", ["--executor", "ray"], args.kill_at),
                                    ("ray --resume", "out-ray-kill", ["--executor", "ray", "--resume"], None),
                                    ("ray --ray-data copy", "out-ray-copy", ["--executor", "ray", "--ray-data",
                                                                             "copy"], None)):
        print(f"$ {label}: ...", end=" ", flush=True)
        runs[label] = r = run(job_file, work / out, extra, args.jobs, kill)
        print(f"exit {r['code']}, {r['wall']:.1f} s", flush=True)
    startup = ray_startup_s()

    local = runs["local"]
    ref_digests, ref_summary = digests(local["out"]), comparable(local["summary"], local["out"])
    print(f"\n{local['stdout']}")
    names = [j["name"] for j in local["summary"]["jobs"]]
    header = ["job"] + [f"{label}" for label in runs]
    rows = []
    for n in names:
        cells = [n]
        for r in runs.values():
            j = next(j for j in r["summary"]["jobs"] if j["name"] == n)
            cells.append(f"{j['status']}{' (' + j['stage'] + ')' if j['stage'] else ''} {j['seconds']:.1f} s")
        rows.append(cells)
    rows.append(["batch wall time (s)"] + [f"{r['wall']:.1f}" for r in runs.values()])
    rows.append(["exit code"] + [str(r["code"]) for r in runs.values()])
    checks = {}
    for label, r in runs.items():
        d = digests(r["out"])
        same = {k for k in ref_digests if d.get(k) == ref_digests[k]}
        checks[label] = (len(same), len(ref_digests), comparable(r["summary"], r["out"]) == ref_summary)
    rows.append(["outputs sha256 = local"] + [f"{a}/{b}" for a, b, _ in checks.values()])
    rows.append(["summary = local (no timings)"] + ["yes" if s else "NO" for *_, s in checks.values()])
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    kill = runs["ray, worker killed"]["kill"]
    kill_log = runs["ray, worker killed"]["kill_log"]
    print(f"\nRay start-up alone (ray.init + shutdown, {os.cpu_count()} CPUs): {startup:.1f} s")
    copied = [ln for ln in (runs["ray --ray-data copy"]["out"] / KILL_JOB / "job.log").read_text().splitlines()
              if "object store copy" in ln]
    print(f"--ray-data copy, {KILL_JOB}'s job.log: {copied}")
    for label in ("ray", "ray, worker killed", "ray --ray-data copy"):
        print(f"{label}: {runs[label]['store']}")
    print(f"killed {KILL_JOB}'s worker (pid {kill.get('pid')}) with SIGKILL at its log line "
          f"{kill.get('last_line')!r}; job.log says: "
          f"{[ln for ln in kill_log.splitlines() if 'retry' in ln]}")
    resumed = runs["ray --resume"]["summary"]["jobs"]
    print("--resume: " + ", ".join(f"{j['name']}={j['status']}" for j in resumed))
    for label, r in runs.items():
        for k, v in digests(r["out"]).items():
            if ref_digests.get(k) != v:
                print(f"DIFFERS in {label}: {k}")
        if checks[label][2] is False:
            a, b = ref_summary["jobs"], comparable(r["summary"], r["out"])["jobs"]
            for n in a:
                if a[n] != b.get(n):
                    print(f"summary differs in {label}, job {n}: {a[n]} vs {b.get(n)}")
    ok = all(a == b and s for a, b, s in checks.values()) and "pid" in kill \
        and any("retry 1 of" in ln for ln in kill_log.splitlines()) \
        and all(j["status"] == ("failed" if j["name"] == "corrupt" else "skipped") for j in resumed)
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
