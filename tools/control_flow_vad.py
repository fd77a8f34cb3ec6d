"""Silero VAD (16 kHz) with the compute inside its If branches quantized: the measured effect.

silero_vad.onnx keeps all its compute (STFT Conv, 4 encoder Convs, LSTM, decoder Conv) inside the branches of
a top-level If on the sample rate (and nested Ifs below it). The tool

1. builds calibration samples by streaming the FP32 model over the first ``--calib-seconds`` of each WAV
   (512-sample chunks with 64 samples of context, the recurrent state fed back: the states the model really
   sees), batch size 1; the frames after the first ``--calib-seconds`` of each file are held out from both
   calibration and the search's evaluator (5,000 chunks of real speech and silence);
2. quantizes with ``converter.quantize`` twice: all int8 (default config), and with the STFT magnitude kept
   in float and the first encoder Conv at 16 bits (hand-picked, see CONFIGS for why);
3. runs the accuracy-target search (``converter.search.auto_quantize``, default ranking, strategy and
   budget, no hand-picked node) once per ``--search-targets`` preset (default ``ort-cpu,qnn``; the fallback
   is the target's default: float on ort-cpu, float or 16 bits per layer on qnn, which runs 16 bits) with a
   streaming evaluator: min(speech-probability cosine, frame agreement at p > 0.5) against FP32 over the
   first ``--eval-seconds`` of each WAV (``--search-metric cosine``: the cosine alone), target ``--target``
   (0.99); the latency gate on at 1.0x FP32 (explicitly: a chunk runs well under the default gate's 1 ms floor; a
   model slower than FP32 on ORT CPU exits 1: reported, with its trade-offs);
4. quantizes with ONNX Runtime's ``quantize_static`` (QDQ, same calibration samples): the peer, which
   skips subgraphs;
5. streams every bundled WAV through the FP32 and each QDQ model (each with its own state) and prints, per
   file, the speech-probability cosine, frame agreement at p > 0.5 and max |dp|; the count of quantized
   nodes and Q/DQ inside the subgraphs; and a summary table with the per-chunk latency (1 thread: this
   thread's CPU time, which a loaded shared machine does not inflate, and wall time).

The calibration samples are shuffled (fixed seed) once and every row gets the same list: the search ranks
layers on its first ``--sensitivity-samples`` items, which should not all be the first second of one file.

Usage: python -m tools.control_flow_vad [--assets DIR] [--calib-seconds 20] [--eval-seconds 20] [--target 0.99]
       [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from converter import AccuracyTarget, QuantConfig, TargetNotMetError, auto_quantize
from converter.graph.scopes import scopes
from converter.quant.control_flow import quantized_nodes_in_bodies, subgraph_qdq_counts

from .benchlib.assets import CHUNK, add_assets_argument, assets_or_exit, read_wav, stream
from .benchlib.measure import session as bench_session
from .benchlib.ort_baseline import ort_quantize_static as _ort_quantize_static
from .benchlib.measure import quantize_any_speed


def session(model) -> ort.InferenceSession:
    return bench_session(model, "all", threads=1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def latencies(sessions: dict[str, ort.InferenceSession], x: np.ndarray,
              rounds: int = 5) -> dict[str, tuple[float, float]]:
    """Per session, the best (wall, CPU) milliseconds per chunk streaming ``x``. The sessions take turns each
    round, so a load spike on a shared machine does not land on one model only; the CPU time is this
    thread's (a 1-thread session runs in the calling thread), which other processes on the machine do not
    inflate the way they inflate wall time."""
    best = {k: (np.inf, np.inf) for k in sessions}
    for _ in range(rounds):
        for k, sess in sessions.items():
            t, c = time.perf_counter(), time.thread_time()
            n = len(stream(sess, x))
            wall, cpu = (time.perf_counter() - t) / n * 1e3, (time.thread_time() - c) / n * 1e3
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    return best

_P = "If_0_then_branch__Inline_0__/"  # the 16 kHz branch
CONFIGS = {
    # every rule-covered op inside the branches at int8 (the LSTM has no rule: float)
    "int8": QuantConfig(batch_size=1),
    # the STFT (Conv on the audio, |X| = Sqrt(re^2 + im^2)) in float and the first encoder Conv, which reads the
    # magnitude spectrum, at 16 bits: the squared spectrum spans ~6 decades, which no linear 8- or 16-bit grid
    # holds (int16 on the STFT nodes instead of float: lower cosine and agreement, docs/results.md "Silero VAD")
    "int8+float-stft+int16-enc0": QuantConfig(
        batch_size=1, exclude_nodes=tuple(_P + f"stft/{n}" for n in ("Conv", "Pow", "Pow_1", "Add", "Sqrt")),
        int16_nodes=(_P + "encoder/0/reparam_conv/Conv",)),
}


COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU")


def compute_share(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(compute ops with 8-bit data and weight, with a 16-bit one, all compute ops) over the main graph and every
    body: an operand is n-bit when a DequantizeLinear of an n-bit tensor produces it."""
    graphs = [model.graph] + [sc.graph for sc in scopes(model)]
    bits: dict[str, int] = {}
    inits = {t.name: t for g in graphs for t in g.initializer}
    for g in graphs:
        for n in g.node:
            if n.op_type == "DequantizeLinear":
                zp = inits.get(n.input[2]) if len(n.input) > 2 else None
                src = inits.get(n.input[0])
                dtype = (zp or src).data_type if (zp or src) is not None else onnx.TensorProto.UINT8
                bits[n.output[0]] = 16 if dtype in (onnx.TensorProto.INT16, onnx.TensorProto.UINT16) else 8
    n8 = n16 = total = 0
    for g in graphs:
        for n in g.node:
            if n.op_type in COMPUTE:
                total += 1
                b = [bits.get(t) for t in n.input[:2]]
                if None not in b:
                    n8 += max(b) == 8
                    n16 += max(b) == 16
    return n8, n16, total


def dq_readers(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for scope in scopes(model):
        dq = {o for n in scope.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        for n in scope.graph.node:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq & set(n.input):
                counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


class StreamingEvaluator:
    """``evaluate(model_path) -> float`` for the search: min(cosine, frame agreement at p > 0.5) of the
    streamed speech probabilities against FP32 over the first ``seconds`` of each WAV."""

    def __init__(self, fp32: ort.InferenceSession, wavs: list[str], seconds: float, cosine_only: bool = False) -> None:
        self.cosine_only = cosine_only
        self.clips = [read_wav(w)[: int(seconds * 16000)] for w in wavs]
        self.ref = np.concatenate([stream(fp32, x) for x in self.clips])

    def __call__(self, model_path: str) -> float:
        sess = session(model_path)
        got = np.concatenate([stream(sess, x) for x in self.clips])
        cos = cosine(self.ref, got)
        return cos if self.cosine_only else min(cos, float(np.mean((self.ref > 0.5) == (got > 0.5))))


def compare(path: Path, fp32: ort.InferenceSession, wavs: list[str], calib_seconds: float) -> dict:
    """Counts inside the subgraphs and the per-file comparison (held-out: the frames after the first
    ``calib_seconds`` of each file, which calibration never saw)."""
    model = onnx.load(str(path))
    reading = {k: v for k, v in quantized_nodes_in_bodies(model).items() if v}
    q_nodes = sum(reading.values())
    print(f"nodes inside subgraphs reading dequantized inputs: {q_nodes} "
          f"({', '.join(f'{k}: {v}' for k, v in reading.items())}); by op: {dq_readers(model)}; "
          f"Q/DQ inside subgraphs: {subgraph_qdq_counts(model)}")
    qdq = session(path)
    print(f"{'file':14s} {'frames':>6s} {'cosine':>8s} {'agree@0.5':>9s} {'max|dp|':>8s}")
    all_ref, all_got = [], []
    for w in wavs:
        x = read_wav(w)
        ref, got = stream(fp32, x), stream(qdq, x)
        all_ref.append(ref)
        all_got.append(got)
        print(f"{os.path.basename(w):14s} {len(ref):6d} {cosine(ref, got):8.4f} "
              f"{np.mean((ref > 0.5) == (got > 0.5)):9.4f} {np.abs(ref - got).max():8.4f}")
    n8, n16, total = compute_share(model)
    print(f"compute ops (Conv, MatMul, Gemm, LSTM; main graph and bodies): {n8}/{total} INT8, {n16} at 16 bits, "
          f"{total - n8 - n16} float")
    row = {"quantized_body_nodes": q_nodes, "session": qdq, "compute": f"{n8}+{n16}/{total}"}
    for label, start in (("ALL", 0), ("held-out", int(calib_seconds * 16000) // CHUNK)):
        ref, got = np.concatenate([r[start:] for r in all_ref]), np.concatenate([g[start:] for g in all_got])
        cos, agree = cosine(ref, got), float(np.mean((ref > 0.5) == (got > 0.5)))
        print(f"{label:14s} {len(ref):6d} {cos:8.4f} {agree:9.4f} {np.abs(ref - got).max():8.4f}")
        row[label] = (cos, agree)
    return row


def ort_quantize_static(model_path: Path, calib: list, out: Path) -> Path:
    """The peer: ONNX Runtime's static QDQ quantizer on the same calibration samples (int8 weights per channel,
    uint8 activations, MinMax)."""
    _ort_quantize_static(model_path, calib, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_assets_argument(ap)
    ap.add_argument("--calib-seconds", type=float, default=20.0,
                    help="seconds of each WAV streamed for calibration samples (default: 20)")
    ap.add_argument("--eval-seconds", type=float, default=20.0,
                    help="seconds of each WAV the search's evaluator streams (default: 20, the calibration part; "
                         "the held-out rows are the rest)")
    ap.add_argument("--target", type=float, default=0.99,
                    help="the search's target: cosine and frame agreement both >= this (default: 0.99)")
    ap.add_argument("--search-targets", default="ort-cpu,qnn",
                    help="target presets the search runs for, one row each (default: ort-cpu,qnn)")
    ap.add_argument("--search-metric", choices=["min", "cosine"], default="min",
                    help="the search's metric: min(cosine, frame agreement) (default) or the cosine alone")
    ap.add_argument("--sensitivity-samples", type=int, default=64,
                    help="calibration samples the search's ranking runs on (default: 64)")
    ap.add_argument("--latency-rounds", type=int, default=10, help="latency rounds, best kept (default: 10)")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip (int8, hand-picked, search, ort)")
    ap.add_argument("--out", help="folder for the quantized models (default: a temporary folder)")
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    skip = set(filter(None, args.skip.split(",")))
    root = Path(args.assets) / "silero-vad"
    model_path = root / "silero_vad.onnx"
    wavs = sorted(glob.glob(str(root / "audio" / "*.wav")))
    fp32 = session(model_path)

    calib: list[dict] = []
    for w in wavs:
        stream(fp32, read_wav(w)[: int(args.calib_seconds * 16000)], calib)
    order = np.random.default_rng(0).permutation(len(calib))
    calib = [calib[i] for i in order]
    print(f"calibration: {len(calib)} chunks ({args.calib_seconds:g} s of each of {len(wavs)} WAVs), shuffled")

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp())
    rows: dict[str, dict] = {}
    for label, config in CONFIGS.items():
        key = "int8" if label == "int8" else "hand-picked"
        if key in skip:
            continue
        print(f"\n== quantize: {label}")
        t = time.perf_counter()
        res = quantize_any_speed(str(model_path), calib, config, out_dir, f"silero_vad_16k_{label.replace('+', '_')}")
        print(f"quantized in {time.perf_counter() - t:.1f} s -> {res.model_path}")
        kept = f"{len(config.exclude_nodes)} float, {len(config.int16_nodes)} int16 (hand-picked)"
        rows[f"quantize {label}"] = {**compare(res.model_path, fp32, wavs, args.calib_seconds),
                                     "kept": "-" if label == "int8" else kept}

    evaluator = StreamingEvaluator(fp32, wavs, args.eval_seconds, args.search_metric == "cosine") \
        if "search" not in skip else None
    for tgt in [t.strip() for t in args.search_targets.split(",") if t.strip()] if evaluator else []:
        what = "cosine" if args.search_metric == "cosine" else "min(cosine, agreement)"
        print(f"\n== auto_quantize --target {tgt}: {what} >= {args.target:g} on the first "
              f"{args.eval_seconds:g} s of each WAV (default ranking, fallback, strategy, budget)")
        t = time.perf_counter()
        name = f"silero_vad_16k_search_{tgt}"
        try:
            res = auto_quantize(str(model_path), calib, evaluator, AccuracyTarget(max_drop=None, min_value=args.target),
                                QuantConfig(batch_size=1, target=tgt), out_dir, name,
                                sensitivity_samples=args.sensitivity_samples, max_latency_ratio=1.0)
            path, report = res.model_path, res.report
        except TargetNotMetError as exc:
            print(f"exit 1: {exc.message}")
            path = out_dir / f"{name}.qdq.onnx"
            report = json.loads((out_dir / f"{name}.report.json").read_text())
        s = report["search"]
        c = s["evaluation_counts"]
        print(f"searched in {time.perf_counter() - t:.1f} s: {c['full']} full evaluations (budget "
              f"{s['max_evaluations']}{', spent' if s['budget_exhausted'] else ''}), {c['subset']} subset, "
              f"{c['ranking_runs']} ranking runs; sensitivity {report['timings'].get('sensitivity_s', 0):.1f} s "
              f"-> {path}")
        print(f"body layers searched: {sum(len(v) for v in s['subgraph_layers'].values())} in "
              f"{len(s['subgraph_layers'])} bodies; ranking (worst first): "
              + ", ".join(f"{r['name'].replace(_P, '')} {r['cosine']:.4f}" for r in s["ranking"][:6]))
        for e in s["evaluations"]:
            print(f"  {e['label']:40s} metric {e['metric']:.4f} {'pass' if e['passed'] else 'fail'}")
        kept = s["fallback_layers"]
        wide = set(s.get("int16_layers") or [])
        lat = s.get("latency") or {}
        print(f"met {s['met']} ({s.get('stop_reason') or 'ok'}); kept out of INT8 ({s['fallback']}): {len(kept)} "
              f"layer(s), {s['float_mac_fraction']:.1%} of the (estimated) MACs; the search's latency (ORT CPU, "
              f"batch 1): {lat.get('final_vs_fp32')}x FP32, all-INT8 {lat.get('all_int8_vs_fp32')}x")
        for k in kept:
            print(f"  {'int16' if k['name'] in wide else 'float'}: {k['name']} ({k['op_type']}) in "
                  f"{k['subgraph'] or 'the main graph'}")
        for p in s.get("pareto", []):
            print(f"  trade-off: {p['label']:40s} metric {p['metric']:.4f} latency {p['vs_fp32']:.2f}x FP32")
        rows[f"search {tgt}"] = {**compare(path, fp32, wavs, args.calib_seconds),
                                 "kept": f"{len(kept) - len(wide)} float {len(wide)} int16" +
                                         ("" if s["met"] else f" ({s.get('stop_reason')})")}

    if "ort" not in skip:
        print("\n== onnxruntime.quantization.quantize_static (QDQ, per-channel, MinMax)")
        t = time.perf_counter()
        try:
            path = ort_quantize_static(model_path, calib, out_dir / "silero_vad_16k_ort.qdq.onnx")
            print(f"quantized in {time.perf_counter() - t:.1f} s -> {path}")
            main_q = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)
            print(f"QuantizeLinear in the main graph: {main_q}")
            rows["ORT quantize_static"] = {**compare(path, fp32, wavs, args.calib_seconds), "kept": "-"}
        except Exception as exc:  # the peer's failure is a result too
            print(f"ORT quantize_static failed: {type(exc).__name__}: {exc}")

    x = read_wav(wavs[0])[: 10 * 16000]
    lat = latencies({"FP32": fp32, **{label: r["session"] for label, r in rows.items()}}, x, args.latency_rounds)
    print(f"\n== summary (held-out = frames after the first {args.calib_seconds:g} s; latency per 32 ms chunk, "
          f"1 thread, best of {args.latency_rounds} rounds over 10 s, the models taking turns: thread CPU time, "
          "then wall time)")
    print(f"{'row':36s} {'kept':>34s} {'compute':>8s} {'q-nodes':>7s} {'cos ALL':>8s} {'agr ALL':>8s} {'cos held':>8s} "
          f"{'agr held':>8s} {'cpu ms':>7s} {'x FP32':>6s} {'wall ms':>7s} {'x FP32':>6s}")
    f_wall, f_cpu = lat["FP32"]
    print(f"{'FP32':36s} {'':>34s} {'':>8s} {0:7d} {1:8.4f} {1:8.4f} {1:8.4f} {1:8.4f} {f_cpu:7.3f} {1:6.2f} {f_wall:7.3f} "
          f"{1:6.2f}")
    for label, r in rows.items():
        wall, cpu = lat[label]
        print(f"{label:36s} {r['kept']:>34s} {r['compute']:>8s} {r['quantized_body_nodes']:7d} {r['ALL'][0]:8.4f} {r['ALL'][1]:8.4f} "
              f"{r['held-out'][0]:8.4f} {r['held-out'][1]:8.4f} {cpu:7.3f} {cpu / f_cpu:6.2f} {wall:7.3f} "
              f"{wall / f_wall:6.2f}")

if __name__ == "__main__":
    main()
