"""Demo of ``qconvert batch`` over every model in the shared assets, plus two broken jobs.

Prepares, in a work folder, calibration data and held-out verification data (with labels where the
asset has them) for each asset model, writes ``jobs.yaml``, runs ``qconvert batch jobs.yaml``
exactly as a user would, prints its summary table, then runs ``qconvert batch jobs.yaml --resume``
and times it (finished jobs must do no work, failed ones run again), and last a ``--resume`` of a
job file listing only the jobs that succeeded (nothing to run).

==================  ============================================================================
resnet8, -large     CIFAR-10 test: calibrate on images 0..199, verify (labels) on 200..1199
efficientnet-lite0  ImageNet samples (JPEGs + preprocess.yaml): calibrate on 100, verify on 200 more
minilm              STS-B sentences (padded to 64 tokens): calibrate on 100, verify on 200 more;
                    ONNX made by the asset's export.py (opset 14) into the work folder (+ minilm-a16)
ppocr-rec           rendered text lines, natural width (batch size 1): calibrate 0..19, verify 20..119
ppocr-rec-a16       the same with 16-bit activations (target qnn): the remedy when 8 bits fail the gate
ppocr-cls           the same lines upright and rotated 180 deg (labels 0/1)
silero-vad (x3)     real speech, streamed 512-sample chunks with the FP32 state fed back
                    (+ silero-vad-16k-op15-a16: 16-bit activations)
corrupt             a truncated copy of resnet8_cifar10.onnx
wrong-input-data    resnet8 with the 224x224 ImageNet images as calibration data
wrong-input-shape   models/efficientnet_lite0.py:build exported with input_shape [1, 1, 224, 224] (1 channel, not 3)
==================  ============================================================================

Usage::

    python -m tools.batch_assets [--assets DIR] [--work DIR] [--jobs 2] [--only name,...]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from .benchlib.assets import (
    add_assets_argument,
    assets_or_exit,
    cifar10_test,
    feeds,
    minilm_export,
    read_wav,
    resnet8_input,
    stream,
    stsb_rows,
    tokenizer,
)
from .benchlib.measure import session
from .benchlib.tasks import ROOT


# The CI policy of this demo: mean cosine >= 0.99 on every output (verify's default); classifiers also
# top-1 agreement >= 95% and accuracy drop <= 1 point (verify's default agreement, 99%, is stricter).
CLASSIFIER = {"min_agreement": 0.95, "max_top1_drop": 0.01}
# What a user does when 8-bit activations fail the gate (minilm, ppocr-rec, silero 16k): 16-bit activations (QNN)
A16 = {"target": "qnn", "activation_bits": 16}
EFFNET_SPEC = {"resize": 256, "center_crop": 224, "color": "RGB", "layout": "NCHW", "scale": 1.0,
               "mean": [127.0] * 3, "std": [128.0] * 3, "dtype": "float32"}


def save_npz(folder: Path, samples: list[dict[str, np.ndarray]]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        np.savez(folder / f"{i:05d}.npz", **s)
    return str(folder)


def save_labels(path: Path, labels) -> str:
    np.save(path, np.asarray(labels, np.int64))
    return str(path)


# --- per-asset data preparation: each returns the job entries for that asset ----------------------------

def resnet8(assets: Path, work: Path) -> list[dict]:
    images, cifar_labels = cifar10_test(assets, 1200)  # class-interleaved: the file is sorted by class
    x = resnet8_input(images)
    calib, data = work / "cifar-calib", work / "cifar-eval"
    calib.mkdir(exist_ok=True)
    data.mkdir(exist_ok=True)
    np.save(calib / "000.npy", x[:200])
    for i in range(200, 1200, 250):
        np.save(data / f"{i:05d}.npy", x[i:i + 250])
    labels = save_labels(work / "cifar-labels.npy", cifar_labels[200:1200])
    verify = {"data": str(data), "labels": labels, **CLASSIFIER}
    return [{"name": name, "model": str(assets / "cifar10-resnet8" / f), "calib": str(calib), "verify": dict(verify)}
            for name, f in (("resnet8", "resnet8_cifar10.onnx"), ("resnet8-large", "resnet8_large_cifar10.onnx"))]


def effnet(assets: Path, work: Path) -> list[dict]:
    h = assets / "imagenet-samples"
    rows = [r.split("\t") for r in (h / "labels.tsv").read_text().splitlines()[1:]]
    calib, data = work / "imagenet-calib", work / "imagenet-eval"
    for folder, part in ((calib, rows[:100]), (data, rows[100:300])):
        folder.mkdir(exist_ok=True)
        (folder / "preprocess.yaml").write_text(yaml.safe_dump(EFFNET_SPEC))
        for r in part:
            (folder / r[0]).unlink(missing_ok=True)
            (folder / r[0]).symlink_to(h / "images" / r[0])
    labels = save_labels(work / "imagenet-labels.npy", [int(r[1]) for r in sorted(rows[100:300])])
    model = assets / "efficientnet-lite0" / "efficientnet-lite0_opset13.onnx"
    return [{"name": "efficientnet-lite0", "model": str(model),
             "calib": str(calib), "verify": {"data": str(data), "labels": labels, **CLASSIFIER}},
            {"name": "wrong-input-data", "model": str(assets / "cifar10-resnet8" / "resnet8_cifar10.onnx"),
             "calib": str(calib)}]


def minilm(assets: Path, work: Path) -> list[dict]:
    model = minilm_export(assets, work / "minilm_opset14.onnx")
    tok = tokenizer(assets, fixed=True, length=64)
    sentences = [s for r in stsb_rows(assets)[:150] for s in (r[5], r[6])]
    calib = save_npz(work / "sts-calib", [feeds(tok, sentences[i:i + 10]) for i in range(0, 100, 10)])
    data = save_npz(work / "sts-eval", [feeds(tok, sentences[i:i + 10]) for i in range(100, 300, 10)])
    job = {"name": "minilm", "model": str(model), "calib": calib, "verify": {"data": data, "min_agreement": None}}
    return [job, {**job, "name": "minilm-a16", "config": A16}]


def _ocr_input(img_bgr: np.ndarray, h: int = 48, width: int | None = None, min_w: int = 320) -> np.ndarray:
    """The asset check.py's norm() with PIL instead of cv2: keep aspect, right-pad, (x/255 - 0.5)/0.5."""
    from PIL import Image

    ih, iw = img_bgr.shape[:2]
    w = int(math.ceil(h * iw / ih))
    full = width or max(w, min_w)
    w = min(w, full)
    x = np.asarray(Image.fromarray(img_bgr).resize((w, h), Image.BILINEAR)).astype(np.float32) / 127.5 - 1.0
    out = np.zeros((3, h, full), np.float32)
    out[:, :, :w] = x.transpose(2, 0, 1)
    return out[None]


def ppocr(assets: Path, work: Path) -> list[dict]:
    from PIL import Image

    h = assets / "rapidocr"
    files = [r.split("\t")[0] for r in (h / "rendered_lines" / "labels.tsv").read_text().splitlines()[1:]]
    imgs = [np.asarray(Image.open(h / "rendered_lines" / f).convert("RGB"))[:, :, ::-1].copy() for f in files]
    rec_calib = save_npz(work / "rec-calib", [{"x": _ocr_input(im)} for im in imgs[:20]])
    rec_data = save_npz(work / "rec-eval", [{"x": _ocr_input(im)} for im in imgs[20:]])
    both = lambda ims: [(lab, im if lab == 0 else im[::-1, ::-1].copy()) for im in ims for lab in (0, 1)]  # noqa: E731
    cls_calib = save_npz(work / "cls-calib", [{"x": _ocr_input(im, width=192)} for _, im in both(imgs[:20])])
    cls_data = save_npz(work / "cls-eval", [{"x": _ocr_input(im, width=192)} for _, im in both(imgs[20:])])
    labels = save_labels(work / "cls-labels.npy", [lab for lab, _ in both(imgs[20:])])
    rec = {"name": "ppocr-rec", "model": str(h / "models" / "ch_PP-OCRv4_rec_infer.onnx"), "calib": rec_calib,
           "config": {"batch_size": 1}, "verify": {"data": rec_data, "batch_size": 1, "min_agreement": None}}
    return [rec, {**rec, "name": "ppocr-rec-a16", "config": {**rec["config"], **A16}},
            {"name": "ppocr-cls", "model": str(h / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
             "calib": cls_calib, "verify": {"data": cls_data, "labels": labels, **CLASSIFIER}}]


def _vad_feeds(model: Path, audio: np.ndarray, every: int) -> list[dict[str, np.ndarray]]:
    """Stream ``audio`` through the FP32 model; keep every ``every``-th chunk with the state at that point."""
    kept: list[dict[str, np.ndarray]] = []
    stream(session(model, "all"), audio, kept, every)
    return kept


def silero(assets: Path, work: Path) -> list[dict]:
    h = assets / "silero-vad"
    wavs = sorted((h / "audio").glob("*.wav"))
    jobs = []
    for f in ("silero_vad.onnx", "silero_vad_16k_op15.onnx", "silero_vad_op18_ifless.onnx"):
        name = Path(f).stem.replace("_", "-")
        samples = [s for w in wavs[:2] for s in _vad_feeds(h / f, read_wav(w)[:16000 * 20], 8)]
        calib = save_npz(work / f"{name}-calib", samples)
        data = save_npz(work / f"{name}-eval", _vad_feeds(h / f, read_wav(wavs[2])[:16000 * 20], 4))
        jobs.append({"name": name, "model": str(h / f), "calib": calib, "config": {"batch_size": 1},
                     "verify": {"data": data, "batch_size": 1}})
        if "16k" in f:  # 8 bits fail the cosine gate on this variant; the remedy job uses 16-bit activations
            jobs.append({**jobs[-1], "name": name + "-a16", "config": {"batch_size": 1, **A16}})
    return jobs


def broken(assets: Path, work: Path) -> list[dict]:
    corrupt = work / "corrupt.onnx"
    corrupt.write_bytes((assets / "cifar10-resnet8" / "resnet8_cifar10.onnx").read_bytes()[:100_000])
    calib = str(work / "cifar-calib")
    return [{"name": "corrupt", "model": str(corrupt), "calib": calib},
            {"name": "wrong-input-shape", "model": f"{ROOT / 'models' / 'efficientnet_lite0.py'}:build",
             "input_shape": [1, 1, 224, 224], "calib": str(work / "imagenet-calib")}]


PREPARE = {"resnet8": resnet8, "effnet": effnet, "minilm": minilm, "ppocr": ppocr, "silero": silero,
           "broken": broken}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_assets_argument(ap)
    ap.add_argument("--work", help="work folder (default: a new temporary folder, kept)")
    ap.add_argument("--jobs", default="2", help="worker processes")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(PREPARE))
    ap.add_argument("--timeout", default="1200", help="seconds per job")
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    assets = Path(args.assets)
    work = Path(args.work or tempfile.mkdtemp(prefix="batch_assets-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    jobs = [j for key in (args.only.split(",") if args.only else PREPARE) for j in PREPARE[key](assets, work)]
    print(f"prepared data for {len(jobs)} jobs in {work} ({time.perf_counter() - t:.0f} s)", flush=True)
    job_file = work / "jobs.yaml"
    spec = {"defaults": {"target": "ort-cpu", "calib_method": "minmax"}, "output_dir": "out",
            "timeout": float(args.timeout), "jobs": jobs}
    job_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [sys.executable, "-m", "converter", "batch", str(job_file), "--jobs", args.jobs]
    codes = []
    for label, extra in (("first run", []), ("--resume rerun", ["--resume"])):
        print(f"\n$ qconvert batch {job_file} --jobs {args.jobs} {' '.join(extra)}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd + extra, stdout=subprocess.PIPE, text=True)
        print(proc.stdout, end="")
        print(f"[{label}: exit code {proc.returncode}, wall {time.perf_counter() - t:.1f} s]", flush=True)
        codes.append(proc.returncode)
    # --resume where every listed job already succeeded: nothing to run at all
    summary = json.loads((work / "out" / "summary.json").read_text())
    done = {j["name"] for j in summary["jobs"] if j["status"] in ("ok", "skipped")}
    ok_file = work / "jobs_ok.yaml"
    ok_file.write_text(yaml.safe_dump({**spec, "jobs": [j for j in jobs if j["name"] in done]}, sort_keys=False))
    print(f"\n$ qconvert batch {ok_file} --resume   (the {len(done)} jobs that succeeded, same output_dir)", flush=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "converter", "batch", str(ok_file), "--resume"],
                          stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="")
    print(f"[resume of finished jobs only: exit code {proc.returncode}, wall {time.perf_counter() - t:.1f} s "
          "including Python start-up]", flush=True)
    return 0 if codes[0] == codes[1] != 0 and proc.returncode == 0 else 1  # broken jobs fail both times


if __name__ == "__main__":
    sys.exit(main())
