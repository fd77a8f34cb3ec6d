"""Stream rotation: each linear residual stream of the float model turned by an orthogonal matrix chosen for its
weights' quantization error (the incoherence idea of QuIP and QuaRot, on convolution streams).

In an inverted-residual network (MobileNetV2/V3, EfficientNet, ...) the blocks' project Convs write a stream that
no activation touches: Adds join the blocks' outputs and the next blocks' 1x1 expand Convs (or the head Conv) read
it. For an orthogonal ``R`` over that stream's channels::

    W_read (W_write x + b) = (W_read R^T) ((R W_write) x + R b)        R^T R = I

and the Adds carry ``R y`` as they carried ``y``, so turning every writer's output channels by ``R`` (weights and
bias) and every reader's input channels by ``R^T`` leaves the model's function unchanged (to float rounding). What
changes is how the weights quantize: a writer's output channels become mixes of all of them and a reader's input
columns likewise, so weights whose few large values set each channel's step spread those values over the channel
(measured on EfficientNet-Lite0, 4-bit asymmetric per-channel weights: the input-weighted error of nearest rounding
falls 11% on the project Convs and 18% on the expand Convs under a random rotation).

A stream is a set of tensors joined by Adds whose every producer is an Add of stream tensors or a Conv with one
group (any kernel: ``R`` acts on the channels at each position) and constant weights, and whose every consumer is
such an Add or such a Conv reading it as data; no stream tensor is a graph output and no weight is shared. The
channel axis is 1 (NCHW).

``R`` is chosen per stream from the identity and :data:`CANDIDATES` random orthogonal matrices (Haar, seeded: the
same model gives the same rotation) by the sum over the stream's writers and readers of the relative output error
of nearest rounding on the configured weight grid, ``tr(dW S dW^T) / tr(W S W^T)`` with ``S`` the second moments
of the layer's input channels on calibration data (a kernel's positions taken as independent; the grid is the
configured default width, per channel or per tensor: per-layer widths and blocks are not read); the identity wins
where no rotation lowers it (the stream is left as it is). The activations are not in that sum: the stream's
per-tensor 8-bit ranges see the turned channels too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..calib.runner import iter_capture
from ..graph.index import GraphIndex, attr
from .encode import weight_encoding

log = logging.getLogger("converter")

CANDIDATES = 8  # random rotations tried per stream, beside the identity
SEED = 0


@dataclass
class Stream:
    tensors: list[str]
    writers: list[str]  # Conv nodes whose output channels turn (R W)
    readers: list[str]  # Conv nodes whose input channels turn (W R^T)
    channels: int
    error_before: float = 0.0  # the proxy (module doc) with the identity
    error_after: float = 0.0  # with the rotation chosen
    candidate: int = 0  # 0: the identity (left as it is), k: the k-th random rotation
    nodes: tuple[list[onnx.NodeProto], list[onnx.NodeProto]] = field(default_factory=lambda: ([], []), repr=False,
                                                                     compare=False)  # (writers, readers)

    @property
    def rotated(self) -> bool:
        return self.candidate > 0

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "writers": self.writers, "readers": self.readers,
                "rotated": self.rotated, "weight_error_before": round(self.error_before, 6),
                "weight_error_after": round(self.error_after, 6)}


@dataclass
class RotationResult:
    streams: list[Stream]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"streams": [s.to_dict() for s in self.streams], "rotated": sum(s.rotated for s in self.streams),
                "seconds": round(self.seconds, 3)}


def _dense_conv(node: onnx.NodeProto, idx: GraphIndex) -> bool:
    if node.op_type != "Conv" or attr(node, "group", 1) != 1 or not idx.is_constant(node.input[1]):
        return False
    if len(idx.uses(node.input[1])) != 1:
        return False
    return len(node.input) < 3 or not node.input[2] or (idx.is_constant(node.input[2])
                                                          and len(idx.uses(node.input[2])) == 1)


def linear_streams(model: onnx.ModelProto, idx: GraphIndex | None = None) -> list[Stream]:
    """The model's rotatable streams (module doc), in graph order."""
    idx = idx or GraphIndex.build(model)
    place = {id(n): i for i, n in enumerate(model.graph.node)}
    seen: set[str] = set()
    streams = []
    for node in model.graph.node:
        if not _dense_conv(node, idx) or node.output[0] in seen:
            continue
        tensors: set[str] = set()
        stack, ok = [node.output[0]], True
        while stack:
            t = stack.pop()
            if t in tensors:
                continue
            tensors.add(t)
            p = idx.producer.get(t)
            if p is None or t in idx.graph_outputs:
                ok = False
                continue
            if p.op_type == "Add":
                stack += [i for i in p.input if i]
            elif not _dense_conv(p, idx):
                ok = False
            for c in idx.uses(t):
                if c.op_type == "Add":
                    stack.append(c.output[0])
                elif not (_dense_conv(c, idx) and c.input[0] == t and t not in c.input[1:]):
                    ok = False
        seen |= tensors
        if not ok:
            continue
        writers = sorted({id(n): n for t in tensors if (n := idx.producer[t]).op_type == "Conv"}.values(),
                         key=lambda n: place[id(n)])
        readers = sorted({id(c): c for t in tensors for c in idx.uses(t) if c.op_type == "Conv"}.values(),
                         key=lambda n: place[id(n)])
        widths = {idx.constant(w.input[1]).shape[0] for w in writers} | {idx.constant(r.input[1]).shape[1]
                                                                        for r in readers}
        if len(widths) != 1 or not readers:
            continue
        order = sorted(tensors, key=lambda t: place[id(idx.producer[t])])
        streams.append(Stream(order, [n.name for n in writers], [n.name for n in readers], widths.pop(),
                              nodes=(writers, readers)))
    return streams


def random_rotation(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal ``n x n`` matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _turn_out(w: np.ndarray, rot: np.ndarray) -> np.ndarray:
    return np.einsum("ij,j...->i...", rot, w)


def _turn_in(w: np.ndarray, rot: np.ndarray) -> np.ndarray:
    return np.einsum("oj...,ij->oi...", w, rot)


class _Proxy:
    """Relative output error of nearest rounding on the weight grid, weighted by the input's channel moments."""

    def __init__(self, bits: int, per_channel: bool, method: str, symmetric: bool):
        self.bits, self.axis, self.method, self.symmetric = bits, 0 if per_channel else None, method, symmetric

    def __call__(self, w: np.ndarray, s: np.ndarray) -> float:
        enc = weight_encoding(w.astype(np.float32), self.bits, self.axis, self.method, symmetric=self.symmetric)
        d = (enc.dequantize(enc.quantize(w.astype(np.float32))) - w).astype(np.float64)
        # channels x (kernel positions): sum over positions of d_k S d_k^T, a kernel's positions independent
        d = d.reshape(d.shape[0], d.shape[1], -1).transpose(2, 0, 1)  # positions, channels out, in
        w = w.reshape(w.shape[0], w.shape[1], -1).transpose(2, 0, 1)
        num = float((np.matmul(d, s) * d).sum())
        den = float((np.matmul(w, s) * w).sum())
        return num / max(den, 1e-30)


def rotate_streams(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], providers: list[str],
                   bits: int, per_channel: bool = True, method: str = "minmax", symmetric: bool = True,
                   candidates: int = CANDIDATES, seed: int = SEED, idx: GraphIndex | None = None) -> RotationResult:
    """Rotate ``model``'s streams in place (module doc); ``idx``: the model's index where the caller has one (the
    weights are rewritten in place, so it stays valid)."""
    t0 = time.perf_counter()
    idx = idx or GraphIndex.build(model)
    streams = linear_streams(model, idx)
    if not streams:
        return RotationResult([], time.perf_counter() - t0)
    inputs = list(dict.fromkeys(n.input[0] for s in streams for n in s.nodes[0] + s.nodes[1]))
    moments: dict[str, np.ndarray] = {}
    for values in iter_capture(model, inputs, batches, providers):
        for name in inputs:
            x = np.asarray(values[name], np.float64)
            x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
            moments[name] = moments.get(name, 0.0) + x.T @ x
    proxy = _Proxy(bits, per_channel, method, symmetric)
    rng = np.random.default_rng(seed)
    for s in streams:
        writers = [(idx.constant(n.input[1]).astype(np.float64), moments[n.input[0]]) for n in s.nodes[0]]
        readers = [(idx.constant(n.input[1]).astype(np.float64), moments[n.input[0]]) for n in s.nodes[1]]

        def error(rot: np.ndarray | None) -> float:
            if rot is None:
                return sum(proxy(w, m) for w, m in writers + readers)
            return (sum(proxy(_turn_out(w, rot), m) for w, m in writers)
                    + sum(proxy(_turn_in(w, rot), rot @ m @ rot.T) for w, m in readers))

        tried = [(error(None), 0, None)]
        for k in range(candidates):
            rot = random_rotation(s.channels, rng)
            tried.append((error(rot), k + 1, rot))
        best = min(tried, key=lambda c: c[:2])
        s.error_before, s.error_after, s.candidate = tried[0][0], best[0], best[1]
        if best[2] is None:
            continue
        rot = best[2]
        for node in s.nodes[0]:
            _write(idx, node.input[1], _turn_out(idx.constant(node.input[1]).astype(np.float64), rot))
            if len(node.input) > 2 and node.input[2]:
                _write(idx, node.input[2], rot @ idx.constant(node.input[2]).astype(np.float64))
        for node in s.nodes[1]:
            _write(idx, node.input[1], _turn_in(idx.constant(node.input[1]).astype(np.float64), rot))
    result = RotationResult(streams, time.perf_counter() - t0)
    log.info("stream rotation: %d of %d stream(s) rotated; weight error proxy %.4g -> %.4g, %.1f s",
             sum(s.rotated for s in streams), len(streams), sum(s.error_before for s in streams),
             sum(s.error_after for s in streams), result.seconds)
    return result


def _write(idx: GraphIndex, name: str, values: np.ndarray) -> None:
    old = idx.initializers[name]
    dtype = numpy_helper.to_array(old).dtype
    old.CopyFrom(numpy_helper.from_array(values.astype(dtype), name))
