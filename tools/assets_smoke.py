"""`qconvert validate` + `qconvert quantize` on every model in the shared assets, accuracy vs FP32.

For each asset model this script writes a calibration directory (.npz files named after the
model's inputs), runs the CLI exactly as a user would (``validate``, then ``quantize``), loads the
QDQ model in ONNX Runtime and measures it against the FP32 model with the asset's own ``check.py``
logic (held-out data, never the calibration samples):

==================  ===========================================================================
efficientnet-lite0  ImageNet samples: calibrate on images 0..99, top-1 on the next ``--n-eval``
resnet8 (2 sizes)   CIFAR-10 test, class-interleaved order: calibrate on the first 200, top-1 on the next 4n
minilm              STS-B test: calibrate on 100 sentences, Spearman + embedding cosine vs FP32
                    on the other pairs (the ONNX comes from the asset's export.py, opset 14)
ppocr-rec           rendered text lines: calibrate on lines 0..19, exact lines + CER on the rest
ppocr-cls           same lines upright/rotated 180: accuracy on the rest
silero-vad (x3)     real speech: calibrate on streamed chunks of two files (states fed back),
                    frame agreement (p > 0.5) and max |dp| vs FP32 on the other files
==================  ===========================================================================

ORT sessions use ORT_ENABLE_ALL (the fused integer kernels ORT really runs). Also prints, per
model, the QDQ op counts and how many Conv/MatMul/Gemm ORT fused into QLinear*/QGemm kernels.

Usage::

    python -m tools.assets_smoke [--assets DIR] [--target ort-cpu] [--only NAME,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from converter.cli import main as qconvert

from .benchlib.assets import (
    add_assets_argument,
    assets_or_exit,
    cifar10_test,
    effnet_input,
    imagenet_samples,
    minilm_export,
    read_wav,
    resnet8_input,
    stream,
    stsb_rows,
    tokenizer,
)
from .benchlib.measure import session as bench_session


def session(path, optimized_path: str | None = None) -> ort.InferenceSession:
    """ORT CPU, all optimizations; with ``optimized_path``: level extended, its optimized graph saved there."""
    if optimized_path:
        return bench_session(path, "extended", save_optimized=optimized_path)
    return bench_session(path, "all")


def write_calib(samples: list[dict[str, np.ndarray]], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        np.savez(folder / f"{i:05d}.npz", **s)
    return folder


# --- images -------------------------------------------------------------------------------------------

def imagenet(assets: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = imagenet_samples(assets, n)
    return effnet_input(x), y


def effnet(assets: Path, n_eval: int):
    x, y = imagenet(assets, 100 + n_eval)
    calib = [{"input": x[i:i + 1]} for i in range(100)]

    def evaluate(fp32, q):
        xe, ye = x[100:], y[100:]
        lf = np.concatenate([fp32.run(None, {"input": xe[i:i + 50]})[0] for i in range(0, len(xe), 50)])
        lq = np.concatenate([q.run(None, {"input": xe[i:i + 50]})[0] for i in range(0, len(xe), 50)])
        return {"fp32_top1": int((lf.argmax(1) == ye).sum()), "int8_top1": int((lq.argmax(1) == ye).sum()),
                "n": len(ye), "agree": float((lf.argmax(1) == lq.argmax(1)).mean())}

    return assets / "efficientnet-lite0" / "efficientnet-lite0_opset13.onnx", calib, evaluate, {}


def resnet8(file: str):
    def make(assets: Path, n_eval: int):
        images, y = cifar10_test(assets, 200 + n_eval * 4)  # class-interleaved: the file is sorted by class
        x = resnet8_input(images)
        path = assets / "cifar10-resnet8" / file
        name = onnx.load(str(path)).graph.input[0].name
        calib = [{name: x[i:i + 1]} for i in range(200)]

        def evaluate(fp32, q):
            xe, ye = x[200:], y[200:]
            pf = np.concatenate([fp32.run(None, {name: xe[i:i + 500]})[0] for i in range(0, len(xe), 500)]).argmax(1)
            pq = np.concatenate([q.run(None, {name: xe[i:i + 500]})[0] for i in range(0, len(xe), 500)]).argmax(1)
            return {"fp32_top1": int((pf == ye).sum()), "int8_top1": int((pq == ye).sum()), "n": len(ye),
                    "agree": float((pf == pq).mean())}

        return path, calib, evaluate, {}
    return make


# --- MiniLM ---------------------------------------------------------------------------------------------

def minilm_onnx(assets: Path) -> Path:
    return minilm_export(assets, os.environ.get("MINILM_ONNX", Path(tempfile.gettempdir()) / "minilm_opset14.onnx"))


def minilm(assets: Path, n_eval: int):
    from scipy.stats import spearmanr
    tok = tokenizer(assets, fixed=False)
    rows = stsb_rows(assets)
    calib_rows, eval_rows = rows[:50], rows[50:50 + n_eval]

    def feeds(batch, length=None):
        tok.enable_padding(pad_id=0, pad_token="[PAD]", length=length)
        enc = tok.encode_batch(batch)
        return {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}

    sentences = [r[5] for r in calib_rows] + [r[6] for r in calib_rows]
    calib = []
    for i in range(0, len(sentences), 4):  # 4 sentences per file, padded together
        f = feeds(sentences[i:i + 4], length=64)
        calib.append(f)

    def evaluate(fp32, q):
        gold = np.array([float(r[4]) for r in eval_rows])

        def emb(sess, ss):
            return np.concatenate([sess.run(["sentence_embedding"], feeds(ss[i:i + 64]))[0]
                                   for i in range(0, len(ss), 64)])

        s1, s2 = [r[5] for r in eval_rows], [r[6] for r in eval_rows]
        ef1, ef2, eq1, eq2 = emb(fp32, s1), emb(fp32, s2), emb(q, s1), emb(q, s2)
        cos = np.concatenate([(ef1 * eq1).sum(1), (ef2 * eq2).sum(1)])  # embeddings are L2-normalised
        return {"fp32_spearman": round(float(spearmanr((ef1 * ef2).sum(1), gold).correlation), 4),
                "int8_spearman": round(float(spearmanr((eq1 * eq2).sum(1), gold).correlation), 4),
                "n": len(gold), "cos_mean": round(float(cos.mean()), 4), "cos_min": round(float(cos.min()), 4)}

    return minilm_onnx(assets), calib, evaluate, {"batch_size": 1}


# --- PP-OCR -----------------------------------------------------------------------------------------------

def _ocr_norm(img: np.ndarray, h: int, w_fixed: int | None = None, min_w: int = 0) -> np.ndarray:
    """check.py's norm() with PIL instead of cv2 (bilinear); img is BGR HWC uint8."""
    from PIL import Image

    ih, iw = img.shape[:2]
    w = int(math.ceil(h * iw / ih))
    width = w_fixed or max(w, min_w)
    w = min(w, width)
    x = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)).astype(np.float32) / 255.0
    x = (x - 0.5) / 0.5
    out = np.zeros((3, h, width), np.float32)
    out[:, :, :w] = x.transpose(2, 0, 1)
    return out[None]


def _ocr_lines(assets: Path):
    from PIL import Image

    h = assets / "rapidocr"
    rows = [line.rstrip("\n").split("\t") for line in open(h / "rendered_lines" / "labels.tsv", encoding="utf-8")][1:]
    imgs = [np.asarray(Image.open(h / "rendered_lines" / f).convert("RGB"))[:, :, ::-1].copy() for f, _, _ in rows]
    return rows, imgs


def _lev(a: str, b: str) -> int:
    d = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        p, d[0] = d[0], i
        for j, cb in enumerate(b, 1):
            p, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, p + (ca != cb))
    return d[-1]


def ppocr_rec(assets: Path, n_eval: int):
    path = assets / "rapidocr" / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    rows, imgs = _ocr_lines(assets)
    chars = ["blank"] + onnx.load(str(path)).metadata_props[0].value.splitlines() + [" "]
    calib = [{"x": _ocr_norm(im, 48, min_w=320)} for im in imgs[:20]]

    def evaluate(fp32, q):
        res = {}
        for tag, sess in (("fp32", fp32), ("int8", q)):
            exact = errs = tot = 0
            for (_, gt, _), im in list(zip(rows, imgs))[20:20 + n_eval]:
                ids = sess.run(None, {"x": _ocr_norm(im, 48, min_w=320)})[0][0].argmax(1)
                txt = "".join(chars[i] for k, i in enumerate(ids) if i != 0 and (k == 0 or i != ids[k - 1])).strip()
                exact += txt == gt
                errs += _lev(txt, gt)
                tot += len(gt)
            res[f"{tag}_exact"], res[f"{tag}_cer"] = exact, round(errs / tot, 4)
        res["n"] = len(rows[20:20 + n_eval])
        return res

    return path, calib, evaluate, {"batch_size": 1}


def ppocr_cls(assets: Path, n_eval: int):
    path = assets / "rapidocr" / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    rows, imgs = _ocr_lines(assets)
    calib = [{"x": _ocr_norm(im[::-k or None, ::-k or None] if k else im, 48, w_fixed=192)}
             for im in imgs[:20] for k in (0, 1)]

    def evaluate(fp32, q):
        res = {"fp32": 0, "int8": 0, "agree": 0, "n": 0}
        for im in imgs[20:20 + n_eval]:
            for lab, x in ((0, im), (1, im[::-1, ::-1].copy())):
                feed = {"x": _ocr_norm(x, 48, w_fixed=192)}
                pf, pq = fp32.run(None, feed)[0][0].argmax(), q.run(None, feed)[0][0].argmax()
                res["fp32"] += int(pf == lab)
                res["int8"] += int(pq == lab)
                res["agree"] += int(pf == pq)
                res["n"] += 1
        return res

    return path, calib, evaluate, {}


# --- Silero VAD -----------------------------------------------------------------------------------------

def _vad_stream(sess, x: np.ndarray, record: list | None = None, every: int = 1) -> np.ndarray:
    return stream(sess, x, record, every)


def silero(file: str):
    def make(assets: Path, n_eval: int):
        h = assets / "silero-vad"
        path = h / file
        wavs = sorted((h / "audio").glob("*.wav"))
        calib: list = []
        fp32 = session(path)
        for f in wavs[:2]:  # de, en: every 8th chunk of the stream, with the FP32 state at that point
            _vad_stream(fp32, read_wav(f)[:16000 * 20], calib, every=8)

        def evaluate(fp32, q):
            agree, dp, frames = [], 0.0, 0
            for f in wavs[2:2 + n_eval]:
                x = read_wav(f)[:16000 * 30]
                pf, pq = _vad_stream(fp32, x), _vad_stream(q, x)
                agree.append(((pf > 0.5) == (pq > 0.5)).mean())
                dp = max(dp, float(np.abs(pf - pq).max()))
                frames += len(pf)
            return {"frame_agree": round(float(np.mean(agree)), 4), "max_dp": round(dp, 4), "frames": frames}

        return path, calib, evaluate, {"batch_size": 1}
    return make


ASSETS: dict[str, Callable] = {
    "efficientnet-lite0": effnet,
    "resnet8": resnet8("resnet8_cifar10.onnx"),
    "resnet8-large": resnet8("resnet8_large_cifar10.onnx"),
    "minilm": minilm,
    "ppocr-rec": ppocr_rec,
    "ppocr-cls": ppocr_cls,
    "silero-vad": silero("silero_vad.onnx"),
    "silero-vad-16k-op15": silero("silero_vad_16k_op15.onnx"),
    "silero-vad-op18-ifless": silero("silero_vad_op18_ifless.onnx"),
}


@dataclass
class Row:
    name: str
    validate_rc: int | None = None
    findings: dict | None = None
    quantize_rc: int | None = None
    seconds: float = 0.0
    loads: bool = False
    accuracy: dict | None = None
    ops: dict | None = None
    fused: dict | None = None
    fp32_ops: dict | None = None
    error: str = ""


FUSED_KEYS = ("Conv", "QLinearConv", "MatMul", "QLinearMatMul", "MatMulIntegerToFloat", "Gemm", "QGemm", "QLinearAdd",
              "LayerNormalization", "SkipLayerNormalization", "Gelu", "BiasGelu", "QuantizeLinear", "DequantizeLinear")


def fused_counts(qdq_path: Path, work: Path) -> dict[str, int]:
    """Op counts of the model ORT really runs: saved after its graph optimisations (work/optimized.onnx)."""
    opt = work / "optimized.onnx"
    session(qdq_path, str(opt))
    c = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    return {k: c[k] for k in FUSED_KEYS if c[k]}


def run_one(name: str, assets: Path, target: str, n_eval: int, work: Path, extra: list[str]) -> Row:
    row = Row(name)
    path, calib, evaluate, opts = ASSETS[name](assets, n_eval)
    calib_dir = write_calib(calib, work / "calib")
    report = work / "validate.json"
    try:
        row.validate_rc = qconvert(["-q", "validate", str(path), "--json", str(report)])
    except SystemExit as exc:  # argparse: no such command
        row.validate_rc = exc.code
    if report.exists():
        found = json.loads(report.read_text())["findings"]
        row.findings = dict(Counter(f["severity"] for f in found))
    args = ["-q", "quantize", str(path), "--calib", str(calib_dir), "-o", str(work / "out"), "--name", "q",
            "--target", target, *extra]
    if "batch_size" in opts:
        args += ["--batch-size", str(opts["batch_size"])]
    t = time.perf_counter()
    row.quantize_rc = qconvert(args)
    row.seconds = round(time.perf_counter() - t, 1)
    qpath = work / "out" / "q.qdq.onnx"
    if row.quantize_rc not in (0, 1) or not qpath.exists():  # 1: a gate failed (slower than FP32, target not met)
        return row                                            # after writing the model: it is still measured
    q = session(qpath)
    row.loads = True
    row.ops = {k: v for k, v in Counter(n.op_type for n in onnx.load(str(qpath)).graph.node).items()
               if k in ("QuantizeLinear", "DequantizeLinear")}
    row.fused = fused_counts(qpath, work)
    row.fp32_ops = {k: v for k, v in Counter(n.op_type for n in onnx.load(str(path)).graph.node).items()
                    if k in ("Conv", "ConvTranspose", "MatMul", "Gemm")}
    row.accuracy = evaluate(session(path), q)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_assets_argument(ap)
    ap.add_argument("--target", default="ort-cpu")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(ASSETS))
    ap.add_argument("--n-eval", type=int, default=200, help="held-out samples per model (files for silero)")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--keep", help="keep the outputs in this folder")
    ap.add_argument("extra", nargs="*", help="extra `qconvert quantize` options (after --)")
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    names = args.only.split(",") if args.only else list(ASSETS)
    rows = []
    for name in names:
        n_eval = args.n_eval if not name.startswith("silero") else 2
        n_eval = min(n_eval, 99) if name.startswith("ppocr") else n_eval
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.keep) / name if args.keep else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            try:
                row = run_one(name, Path(args.assets), args.target, n_eval, work, args.extra)
            except Exception as exc:  # keep going: one broken asset must not hide the others
                row = Row(name, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
        print(json.dumps(row.__dict__), flush=True)
    print(f"\n{'model':24s} {'validate':>8s} {'quantize':>8s} {'s':>6s} loads  accuracy vs FP32")
    for r in rows:
        print(f"{r.name:24s} {str(r.validate_rc):>8s} {str(r.quantize_rc):>8s} {r.seconds:6.1f} {str(r.loads):5s}  "
              f"{r.accuracy or r.error}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return 0 if all(r.loads for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
