"""Silero VAD (16 kHz) with the compute inside its If branches quantized: the measured effect.

silero_vad.onnx keeps all its compute (STFT Conv, 4 encoder Convs, LSTM, decoder Conv) inside the branches of
a top-level If on the sample rate (and nested Ifs below it). The tool

1. builds calibration samples by streaming the FP32 model over the first ``--calib-seconds`` of each WAV
   (512-sample chunks with 64 samples of context, the recurrent state fed back: the states the model really
   sees), batch size 1;
2. quantizes with ``converter.quantize`` twice: all int8 (default config), and with the STFT magnitude kept
   in float and the first encoder Conv at 16 bits (see CONFIGS for why);
3. streams every bundled WAV through the FP32 and the QDQ model (each with its own state) and prints, per
   file, the speech-probability cosine, frame agreement at p > 0.5 and max |dp|; then the count of quantized
   nodes and Q/DQ inside the subgraphs and the per-chunk latency of both models (1 thread).

Usage: python tools/control_flow_vad.py [--assets DIR] [--calib-seconds 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's converter, not an installed one
from converter.config import QuantConfig
from converter.pipeline import quantize

CHUNK, CTX = 512, 64


def read_wav(path: str) -> np.ndarray:
    w = wave.open(path)
    assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
    return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


def session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def stream(sess: ort.InferenceSession, x: np.ndarray, keep: list | None = None) -> np.ndarray:
    """Speech probability per 32 ms chunk; ``keep`` collects the feeds (calibration samples)."""
    x = np.pad(x, (0, (-len(x)) % CHUNK))
    state = np.zeros((2, 1, 128), np.float32)
    ctx = np.zeros((1, CTX), np.float32)
    sr = np.array(16000, np.int64)
    out = []
    for i in range(0, len(x), CHUNK):
        inp = np.concatenate([ctx, x[None, i:i + CHUNK]], 1)
        feeds = {"input": inp, "state": state, "sr": sr}
        if keep is not None:
            keep.append(feeds)
        p, state = sess.run(None, feeds)
        out.append(float(p[0, 0]))
        ctx = inp[:, -CTX:]
    return np.array(out)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def latency_ms(sess: ort.InferenceSession, x: np.ndarray, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        n = len(stream(sess, x))
        best = min(best, (time.perf_counter() - t) / n * 1e3)
    return best


_P = "If_0_then_branch__Inline_0__/"  # the 16 kHz branch
CONFIGS = {
    # every rule-covered op inside the branches at int8 (the LSTM has no rule: float)
    "int8": QuantConfig(batch_size=1),
    # the STFT (Conv on the audio, |X| = Sqrt(re^2 + im^2)) in float and the first encoder Conv, which reads the
    # magnitude spectrum, at 16 bits: the squared spectrum spans ~6 decades, which no linear 8- or 16-bit grid
    # holds (int16 on the STFT nodes instead of float measured cosine 0.9969, agreement 0.985)
    "int8+float-stft+int16-enc0": QuantConfig(
        batch_size=1, exclude_nodes=tuple(_P + f"stft/{n}" for n in ("Conv", "Pow", "Pow_1", "Add", "Sqrt")),
        int16_nodes=(_P + "encoder/0/reparam_conv/Conv",)),
}


def dq_readers(path) -> dict[str, int]:
    from converter.graph.scopes import scopes

    counts: dict[str, int] = {}
    for scope in scopes(onnx.load(str(path))):
        dq = {o for n in scope.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        for n in scope.graph.node:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq & set(n.input):
                counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def evaluate(model_path: Path, calib: list, config: QuantConfig, out_dir: Path, label: str,
             fp32: ort.InferenceSession, wavs: list[str], calib_seconds: float) -> ort.InferenceSession:
    """Quantize with ``config``, print the counts and the per-file comparison (held-out: the frames after the
    first ``calib_seconds`` of each file, which calibration never saw)."""
    t = time.perf_counter()
    res = quantize(str(model_path), calib, config, out_dir, f"silero_vad_16k_{label.replace('+', '_')}")
    print(f"quantized in {time.perf_counter() - t:.1f} s -> {res.model_path}")
    summary = res.report["summary"]
    reached = [s for s in summary["subgraphs"] if s["quantized_tensors"]]
    q_nodes = sum(s["quantized_nodes"] for s in reached)
    print(f"subgraphs with quantized tensors: {len(reached)} of {len(summary['subgraphs'])} planned; "
          f"quantized nodes inside subgraphs: {q_nodes}; Q/DQ inside subgraphs: {summary['subgraph_qdq_ops']}; "
          f"main graph: {summary['qdq_model_ops']}")
    for s in reached:
        print(f"  {s['subgraph']}: {s['quantized_nodes']} nodes planned quantized/fused of {s['nodes']}, "
              f"{s['quantized_tensors']} tensors encoded")
    reading = summary["subgraph_nodes_reading_dq"]
    print(f"nodes inside subgraphs reading dequantized (int8/int16) inputs in the QDQ model: {sum(reading.values())} "
          f"({', '.join(f'{k}: {v}' for k, v in reading.items())}); by op: {dq_readers(res.model_path)}")
    qdq = session(res.model_path)
    print(f"{'file':14s} {'frames':>6s} {'cosine':>8s} {'agree@0.5':>9s} {'max|dp|':>8s}")
    all_ref, all_got = [], []
    for w in wavs:
        x = read_wav(w)
        ref, got = stream(fp32, x), stream(qdq, x)
        all_ref.append(ref)
        all_got.append(got)
        print(f"{os.path.basename(w):14s} {len(ref):6d} {cosine(ref, got):8.4f} "
              f"{np.mean((ref > 0.5) == (got > 0.5)):9.4f} {np.abs(ref - got).max():8.4f}")
    for label, start in (("ALL", 0), ("held-out", int(calib_seconds * 16000) // CHUNK)):
        ref, got = np.concatenate([r[start:] for r in all_ref]), np.concatenate([g[start:] for g in all_got])
        print(f"{label:14s} {len(ref):6d} {cosine(ref, got):8.4f} {np.mean((ref > 0.5) == (got > 0.5)):9.4f} "
              f"{np.abs(ref - got).max():8.4f}")
    return qdq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("CONVERTER_ASSETS", "/work/shared/assets"),
                    help="assets folder holding silero-vad/ (default: $CONVERTER_ASSETS or /work/shared/assets)")
    ap.add_argument("--calib-seconds", type=float, default=20.0,
                    help="seconds of each WAV streamed for calibration samples (default: 20)")
    ap.add_argument("--out", help="folder for the quantized model (default: a temporary folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    root = Path(args.assets) / "silero-vad"
    model_path = root / "silero_vad.onnx"
    wavs = sorted(glob.glob(str(root / "audio" / "*.wav")))
    fp32 = session(model_path)

    calib: list[dict] = []
    for w in wavs:
        stream(fp32, read_wav(w)[: int(args.calib_seconds * 16000)], calib)
    print(f"calibration: {len(calib)} chunks ({args.calib_seconds:g} s of each of {len(wavs)} WAVs)")

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp())
    sessions = {}
    for label, config in CONFIGS.items():
        print(f"\n== {label}")
        sessions[label] = evaluate(model_path, calib, config, out_dir, label, fp32, wavs,
                                   args.calib_seconds)
    x = read_wav(wavs[0])[: 10 * 16000]
    print(f"\nlatency per 32 ms chunk (1 thread, best of 3 over 10 s): FP32 {latency_ms(fp32, x):.3f} ms, "
          + ", ".join(f"{label} {latency_ms(s, x):.3f} ms" for label, s in sessions.items()))


if __name__ == "__main__":
    main()
