"""Calibration benchmark: ours vs ONNX Runtime's quantize_static, per method, wall time / peak RSS / accuracy.

Every run (ours, ORT's, and one plain FP32 ORT pass over the same samples: the floor) is a CHILD
process of this script, started fresh, so its peak RSS is its own (``os.wait4`` rusage). A child
is capped: RLIMIT_AS (cap + 4 GiB, a backstop) and the parent polls its RSS and kills it past the
cap; such runs read ``killed > cap``. ORT's histogram calibrators keep every activation of every
sample (tens of MiB per sample), so expect them to hit the cap at 512 samples.

Pairs compared (ours / ORT): minmax / MinMax, percentile / Percentile, entropy / Entropy,
mse / Distribution (ORT has no MSE calibrator; Distribution is its remaining histogram method).
Ours also runs minmax_ema. ORT runs with its defaults (QDQ, per-channel int8 weights, uint8
activations; Percentile 99.999 like ours), which is what its users get. Note that ORT's Entropy
defaults (num_bins = num_quantized_bins = 128) leave its KL search a single candidate, the whole
histogram: its ranges are min/max ones, so its Entropy accuracy matches its MinMax.

Times are those of the measured call only (the FP32 pass, ``quantize``, ``quantize_static``). The
calibration samples are decoded before the timer starts (JPEG decoding and the CIFAR npz would
otherwise add the same fixed time to every tool); each batch's preprocessing stays inside.

Models (assets under ``--assets DIR``, else $CONVERTER_ASSETS, else /work/shared/assets):
  effnet   EfficientNet-Lite0; calibration = the first 100 ImageNet sample images, cycled to N;
           accuracy = top-1 on the other 900 images
  resnet8  MLPerf Tiny ResNet-8 CIFAR-10; calibration = the first 1000 test images (cycled);
           accuracy = top-1 on the other 9000
  minilm   all-MiniLM-L6-v2 (ONNX made by the assets' minilm-sts/export.py, path via --minilm-onnx);
           calibration = STS-B test sentences, padded to 128 tokens; memory scaling only

Usage: python -m tools.bench_calibration --models effnet,resnet8,minilm --samples 32,512
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .benchlib.assets import (
    add_assets_argument,
    assets_or_exit,
    cifar10_test,
    effnet_input,
    imagenet_samples,
    resnet8_input,
)
from .benchlib.measure import session
from .benchlib.ort_baseline import ort_quantize_static
from .benchlib.tasks import ROOT, child_env
from .benchlib.measure import quantize_any_speed


ASSETS = Path()  # main sets it: --assets, passed on to every child
OURS = ("minmax", "minmax_ema", "percentile", "entropy", "mse")
PEER = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy", "mse": "Distribution"}
BATCH = 16


# --- data (children and parent) ---------------------------------------------------------------------

def _effnet_images(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = imagenet_samples(ASSETS, stop)
    return x[start:], y[start:]


def _effnet_feed(u8: np.ndarray) -> dict[str, np.ndarray]:
    return {"input": effnet_input(u8)}


def _cifar(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    return cifar10_test(ASSETS, stop, start)  # class-interleaved: the file is sorted by class


def _cifar_feed(u8: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_1": resnet8_input(u8)}


class WordPiece:
    """Minimal BERT uncased WordPiece (basic split + greedy longest match), enough for calibration data."""

    def __init__(self, vocab: Path) -> None:
        self.vocab = {w.rstrip("\n"): i for i, w in enumerate(vocab.open(encoding="utf-8"))}

    def encode(self, text: str, length: int = 128) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            start = 0
            while start < len(word):
                end = len(word)
                while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
                    end -= 1
                if end == start:
                    ids.append(self.vocab["[UNK]"])
                    break
                ids.append(self.vocab[("##" if start else "") + word[start:end]])
                start = end
        ids = ids[:length - 1] + [self.vocab["[SEP]"]]
        return ids + [0] * (length - len(ids))


def _minilm_tokens(count: int) -> np.ndarray:
    folder = ASSETS / "minilm-sts"
    tok = WordPiece(folder / "vocab.txt")
    rows = [line.rstrip("\n").split("\t") for line in (folder / "sts-test.csv").open(encoding="utf-8")]
    sentences = [s for r in rows for s in (r[5], r[6])][:count]
    return np.array([tok.encode(s) for s in sentences], dtype=np.int64)


def _minilm_feed(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}


def calibration_pool(model: str) -> np.ndarray:
    """The model's calibration samples, decoded (JPEGs, the CIFAR npz, tokenized sentences): loaded before
    any timer starts, so that no tool's time includes reading the asset files."""
    if model == "effnet":
        return _effnet_images(0, 100)[0]
    if model == "resnet8":
        return _cifar(0, 1000)[0]
    return _minilm_tokens(1000)


def calibration_batches(model: str, n: int, pool: np.ndarray):
    """``pool`` cycled to ``n`` samples, in batches of BATCH, each fed through the model's preprocessing lazily."""
    feed = {"effnet": _effnet_feed, "resnet8": _cifar_feed}.get(model, _minilm_feed)
    for i in range(0, n, BATCH):
        idx = np.arange(i, min(i + BATCH, n)) % len(pool)
        yield feed(pool[idx])


# --- child jobs ----------------------------------------------------------------------------------------

def model_path(model: str, minilm: str) -> str:
    return {"effnet": str(ASSETS / "efficientnet-lite0" / "efficientnet-lite0_opset13.onnx"),
            "resnet8": str(ASSETS / "cifar10-resnet8" / "resnet8_cifar10.onnx"), "minilm": minilm}[model]


def child(job: dict) -> dict:
    """Runs one job in this (child) process; returns {'seconds': ...} (time of the measured call only)."""
    path, n, out = model_path(job["model"], job["minilm"]), job["n"], Path(job["out"])
    pool = calibration_pool(job["model"])
    if job["tool"] == "fp32":
        t = time.perf_counter()
        sess = session(path, "all")
        for feeds in calibration_batches(job["model"], n, pool):
            sess.run(None, feeds)
        return {"seconds": time.perf_counter() - t}
    if job["tool"] == "ours":
        from converter.config import QuantConfig

        config = QuantConfig(calib_method=job["method"], weight_calib=job.get("weight_calib", "minmax"),
                             batch_size=BATCH, histogram_subsample=job.get("subsample", 16384))
        t = time.perf_counter()
        result = quantize_any_speed(path, calibration_batches(job["model"], n, pool), config, output_dir=out.parent,
                          name=out.name.removesuffix(".qdq.onnx"))
        return {"seconds": time.perf_counter() - t, "calib_seconds": result.report["timings"]["calibration_s"]}
    from onnxruntime.quantization import CalibrationMethod

    method = getattr(CalibrationMethod, job["method"])
    extra = {"CalibPercentile": 99.999} if job["method"] == "Percentile" else {}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # ORT writes its augmented model next to the CWD otherwise
        os.chdir(tmp)  # (the baseline also copies the model, upgraded to opset 13 if older, into its own folder)
        ort_quantize_static(path, calibration_batches(job["model"], n, pool), out, calibrate_method=method,
                            extra_options=extra)
    return {"seconds": time.perf_counter() - t}


def spawn(job: dict, cap: int) -> dict:
    """Run ``job`` in a child process with an RSS cap; returns its result plus peak RSS (bytes)."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap + (4 << 30), cap + (4 << 30)))

    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        proc = subprocess.Popen([sys.executable, "-m", "tools.bench_calibration", "--assets", str(ASSETS),
                                 "--child", json.dumps(job)], stdout=fout, stderr=ferr, preexec_fn=limits,
                                env=child_env(), cwd=ROOT, text=True)
        killed, status_file = False, Path(f"/proc/{proc.pid}/status")
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss = int(re.search(r"VmRSS:\s+(\d+)", status_file.read_text()).group(1)) * 1024
            except (OSError, AttributeError):
                rss = 0
            if rss > cap and not killed:
                killed = True
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.05)
        proc.returncode = status
        fout.seek(0), ferr.seek(0)
        out, err = fout.read(), ferr.read()
    res = {"peak_rss": usage.ru_maxrss * 1024, "killed": killed, "ok": False}
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if lines and not killed:
        res.update(json.loads(lines[-1][7:]), ok=True)
    elif not killed:
        res["error"] = (err.strip().splitlines() or ["exit status %d" % status])[-1][:160]
    return res


# --- accuracy (parent) ---------------------------------------------------------------------------------

def accuracy(model: str, path: str) -> str:
    try:
        return _accuracy(model, path)
    except Exception as exc:  # an invalid quantized model is a result too
        return f"model fails: {str(exc).splitlines()[0][:80]}"


def _accuracy(model: str, path: str) -> str:
    if model == "minilm":
        return "-"
    x, y = _effnet_images(100, 1000) if model == "effnet" else _cifar(1000, 10000)
    feed = _effnet_feed if model == "effnet" else _cifar_feed
    sess = session(path, "all")
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: next(iter(feed(x[i:i + 100]).values()))})[0].argmax(1)
                           for i in range(0, len(x), 100)])
    return f"{int((pred == y).sum())}/{len(y)}"


# --- parent ----------------------------------------------------------------------------------------------

def mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def fmt(res: dict, cap: int) -> tuple[str, str]:
    if res["killed"]:
        return f"killed > {cap / 2**30:.0f} GiB", f">{mib(cap)}"
    if not res["ok"]:
        return "failed: " + res.get("error", "?"), mib(res["peak_rss"])
    return f"{res['seconds']:.1f} s", mib(res["peak_rss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="effnet,resnet8,minilm")
    ap.add_argument("--samples", default="32,512")
    ap.add_argument("--methods", default=",".join(OURS))
    ap.add_argument("--cap-gib", type=float, default=8.0, help="RSS cap per child (GiB)")
    ap.add_argument("--minilm-onnx", default="/tmp/minilm/all-MiniLM-L6-v2_opset14.onnx")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-peer", action="store_true", help="skip ONNX Runtime's runs")
    ap.add_argument("--weight-calib", choices=["minmax", "mse"], default="minmax",
                    help="our weight ranges (ORT's are always max |w| per channel)")
    ap.add_argument("--subsample", type=int, default=16384,
                    help="our histogram values per sample and tensor (0: every value)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    add_assets_argument(ap)
    args = ap.parse_args()
    global ASSETS
    ASSETS = assets_or_exit(args.assets)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    cap = int(args.cap_gib * 2**30)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_calib_")).resolve()  # children run from the root
    work.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    counts = [int(s) for s in args.samples.split(",")]
    for model in args.models.split(","):
        if model == "minilm" and not Path(args.minilm_onnx).is_file():
            print(f"\n## {model}: {args.minilm_onnx} missing (cd {ASSETS}/minilm-sts && python export.py OUT legacy)")
            continue
        print(f"\n## {model}  ({model_path(model, args.minilm_onnx)}; our weights: {args.weight_calib}; "
              f"histogram values per sample and tensor: {args.subsample or 'all'})", flush=True)
        results: dict[tuple, dict] = {}
        for n in counts:
            base = dict(model=model, n=n, minilm=args.minilm_onnx, weight_calib=args.weight_calib,
                        subsample=args.subsample)
            results[("fp32", "", n)] = spawn({**base, "tool": "fp32", "method": "", "out": str(work / "fp32")}, cap)
            for m in methods:  # interleave ours and the peer's so load changes hit both
                out = work / f"{model}_{n}_ours_{m}.qdq.onnx"  # what quantize writes for that name
                results[("ours", m, n)] = {**spawn({**base, "tool": "ours", "method": m, "out": str(out)}, cap),
                                           "path": str(out)}
                if m in PEER and not args.no_peer:
                    out = work / f"{model}_{n}_ort_{PEER[m]}.onnx"
                    results[("ort", m, n)] = {**spawn({**base, "tool": "ort", "method": PEER[m], "out": str(out)}, cap),
                                              "path": str(out)}
                print(f"  done n={n} {m}", file=sys.stderr, flush=True)
        report(model, results, methods, counts, cap)


def report(model: str, results: dict, methods: list[str], counts: list[int], cap: int) -> None:
    print(f"\nwall time and peak RSS (child process), {model}")
    print("(time: the whole quantize call; ours/floor: our calibration pass alone vs the plain FP32 pass)")
    head = ("| method | N | ours time | ours RSS | ORT method | ORT time | ORT RSS | time ours/ORT | RSS ours/ORT "
            "| ours calib / FP32 floor |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for n in counts:
        floor = results[("fp32", "", n)]
        ft, fr = fmt(floor, cap)
        print(f"| FP32 pass (floor) | {n} | {ft} | {fr} | | | | | | |")
        for m in methods:
            ours = results[("ours", m, n)]
            peer = results.get(("ort", m, n))
            ot, orr = fmt(ours, cap)
            pt, pr = fmt(peer, cap) if peer else ("", "")
            t_ratio = f"{ours['seconds'] / peer['seconds']:.3f}" if peer and ours["ok"] and peer["ok"] else \
                (f"< {ours['seconds'] / 1:.0f} s vs killed" if peer and peer["killed"] else "-")
            r_ratio = f"{ours['peak_rss'] / peer['peak_rss']:.2f}" if peer and ours["ok"] and peer["ok"] else \
                (f"< {ours['peak_rss'] / cap:.2f}" if peer and peer["killed"] and ours["ok"] else "-")
            f_ratio = f"{ours['calib_seconds'] / floor['seconds']:.2f}" if ours["ok"] and floor["ok"] else "-"
            print(f"| {m} | {n} | {ot} | {orr} | {PEER.get(m, '') if peer else ''} | {pt} | {pr} | {t_ratio} | "
                  f"{r_ratio} | {f_ratio} |")
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        print(f"\npeak RSS at N={hi} / N={lo}, {model}")
        print("| method | ours | ORT |")
        print("|---|---|---|")
        for m in methods:
            row = []
            for tool in ("ours", "ort"):
                a, b = results.get((tool, m, hi)), results.get((tool, m, lo))
                if a is None or b is None:
                    row.append("")
                elif a["killed"]:
                    row.append(f"> {cap / b['peak_rss']:.1f} (killed at cap)")
                else:
                    row.append(f"{a['peak_rss'] / b['peak_rss']:.2f}" if a["ok"] and b["ok"] else "-")
            print(f"| {m} | {row[0]} | {row[1]} |")
    if model == "minilm":
        return
    print(f"\naccuracy (top-1 on held-out data), {model}")
    print("| method | N | ours | ORT |")
    print("|---|---|---|---|")
    fp = accuracy(model, model_path(model, ""))
    print(f"| FP32 | - | {fp} | {fp} |")
    for n in counts:
        for m in methods:
            ours, peer = results[("ours", m, n)], results.get(("ort", m, n))
            a = accuracy(model, ours["path"]) if ours["ok"] else fmt(ours, cap)[0]
            b = "" if peer is None else accuracy(model, peer["path"]) if peer["ok"] else fmt(peer, cap)[0]
            print(f"| {m} / {PEER.get(m, '-')} | {n} | {a} | {b} |", flush=True)


if __name__ == "__main__":
    main()
