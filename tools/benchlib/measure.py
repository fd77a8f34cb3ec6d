"""Latency and the compute INT8 share, both as ONNX Runtime CPU runs a model.

:func:`compare_latency`: batch-1 latency of several models on one feed, median of ``runs`` runs after a warm-up,
``threads`` intra-op threads (stated in every table), all graph optimizations, the models taking turns run by run
so that load on a shared machine lands on all of them alike.

:func:`compute_int8_share`: the layer kernels one profiled ORT run executes (or, without an input, every layer op
of ORT's optimized graph, If/Loop/Scan bodies included; level ``extended``, where the QDQ fusions run) split into
integer kernels (``QLinearConv``, ``QLinearMatMul``, ``MatMulInteger``, ``QGemm``, ...) and float ones (``Conv``,
``FusedConv``, ``Gemm``, ``MatMul``, ``LSTM``, ...), counted and named. This is what runs, not what the quantizer
planned: a layer whose input Q/DQ pair ORT cannot fuse runs in float.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from converter.ort_session import FLOAT_LAYER_OPS, create_session, session_options

# layer kernels ORT CPU runs on integers (or with quantized weights)
INTEGER_COMPUTE = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulNBits",
                             "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM",
                             "QLinearConvTranspose"})
# layer ops it runs in float (converter.ort_session's list plus the recurrent layers, which no quantizer here covers)
FLOAT_COMPUTE = FLOAT_LAYER_OPS | {"LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention"}


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def optimized_graph(model: str | Path | onnx.ModelProto, optimization: str = "all") -> onnx.ModelProto:
    """The graph ORT CPU runs after its optimizations."""
    with tempfile.TemporaryDirectory(prefix="bench_opt_") as d:
        options = session_options(optimization)
        options.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath, load_external_data=False)


def _ran(model: str | Path | onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> set[tuple[str, str]]:
    """(node name, op type) of every kernel one profiled run of ``model`` on ``feed`` executed (level extended,
    control-flow bodies included: ORT profiles the nodes of the branch it took)."""
    import json

    with tempfile.TemporaryDirectory(prefix="bench_prof_") as d:
        options = session_options("extended", threads=1)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(d) / "profile")
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        sess.run(None, _feed_for(sess, feed))
        events = json.loads(Path(sess.end_profiling()).read_text())
    suffix = "_kernel_time"
    return {(e["name"][:-len(suffix)], e.get("args", {}).get("op_name", "")) for e in events
            if e.get("cat") == "Node" and e.get("name", "").endswith(suffix)}


def compute_int8_share(model: str | Path | onnx.ModelProto,
                       feed: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """``{"int8": n, "float": m, "share": n / (n + m), "int8_ops": {op: count}, "float_ops": {op: count},
    "float_layers": [names], "counted": how}`` of what ORT runs.

    With ``feed``: the layer kernels one profiled run executed (``counted: "profiled run"``), so an If branch the
    input does not take (Silero VAD's 8 kHz branch) is not counted. Without: every node of the optimized graph,
    bodies of both branches included (``counted: "optimized graph"``). Both at level ``extended``: the QDQ ->
    QLinear* and activation fusions run there; ``all`` only adds the NCHWc layout rewrite, which renames the
    float Convs (``..._nchwc``) but runs the same layers in float."""
    if feed is not None:
        nodes = sorted(_ran(model, feed))
        counted = "profiled run"
    else:
        opt = optimized_graph(model, "extended")
        nodes = [(n.name or f"<{n.op_type}>", n.op_type) for g in _graphs(opt.graph) for n in g.node]
        counted = "optimized graph"
    int_ops: dict[str, int] = {}
    float_ops: dict[str, int] = {}
    float_names: list[str] = []
    for name, op in nodes:
        if op in INTEGER_COMPUTE:
            int_ops[op] = int_ops.get(op, 0) + 1
        elif op in FLOAT_COMPUTE:
            float_ops[op] = float_ops.get(op, 0) + 1
            float_names.append(name)
    i, f = sum(int_ops.values()), sum(float_ops.values())
    return {"int8": i, "float": f, "share": i / (i + f) if i + f else 0.0, "int8_ops": dict(sorted(int_ops.items())),
            "float_ops": dict(sorted(float_ops.items())), "float_layers": float_names, "counted": counted}


def _feed_for(sess: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def session(model: str | Path | bytes | onnx.ModelProto, optimization: str = "all", threads: int = 0,
            save_optimized: str | Path | None = None) -> ort.InferenceSession:
    """An ORT CPU session with the project's options (:func:`converter.ort_session.session_options`: the 16-bit
    fix, custom-op libraries); ``save_optimized`` also writes the graph ORT optimized to that file."""
    if not isinstance(model, (onnx.ModelProto, bytes)):
        model = str(model)
    if save_optimized is None:
        return create_session(model, optimization=optimization, threads=threads)
    options = session_options(optimization, threads)
    options.optimized_model_filepath = str(save_optimized)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def latency_samples(models: Mapping[str, str | Path | onnx.ModelProto | ort.InferenceSession],
                    feed: Mapping[str, np.ndarray], runs: int = 50, warmup: int = 5,
                    threads: int = 1) -> dict[str, list[float]]:
    """Label -> the milliseconds of each of ``runs`` batch-1 runs of each model on ``feed`` (the timer every tool
    uses). Sessions (ORT CPU, all optimizations, ``threads`` intra-op threads; a ready session is used as is) are
    all made first and each warmed up ``warmup`` times; then ``runs`` rounds in which every model runs once, the
    order rotated each round, so that load on a shared machine lands on all of them alike."""
    sessions = {k: v if isinstance(v, ort.InferenceSession) else session(v, "all", threads) for k, v in models.items()}
    feeds = {k: _feed_for(s, feed) for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    labels = list(sessions)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(max(runs, 1)):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(1000.0 * (time.perf_counter() - t))
    return times


def latency_stats(models: Mapping[str, str | Path | onnx.ModelProto | ort.InferenceSession],
                  feed: Mapping[str, np.ndarray], runs: int = 50, warmup: int = 5,
                  threads: int = 1) -> dict[str, dict[str, float]]:
    """Label -> ``{"median_ms", "p10_ms", "p90_ms"}`` of :func:`latency_samples`."""
    return {k: {"median_ms": float(np.median(v)), "p10_ms": float(np.percentile(v, 10)),
                "p90_ms": float(np.percentile(v, 90))}
            for k, v in latency_samples(models, feed, runs, warmup, threads).items()}


def compare_latency(models: Mapping[str, str | Path | onnx.ModelProto | ort.InferenceSession],
                    feed: Mapping[str, np.ndarray], runs: int = 50, warmup: int = 5,
                    threads: int = 1) -> dict[str, float]:
    """Label -> median milliseconds of one batch-1 run of each model on ``feed`` (see :func:`latency_samples`)."""
    return {k: float(np.median(v)) for k, v in latency_samples(models, feed, runs, warmup, threads).items()}


def latency_ms(model: str | Path | onnx.ModelProto, feed: Mapping[str, np.ndarray], runs: int = 50, warmup: int = 5,
               threads: int = 1) -> float:
    """Median milliseconds of one batch-1 run of one model (see :func:`latency_samples`)."""
    return compare_latency({"model": model}, feed, runs, warmup, threads)["model"]


def quantize_any_speed(*args: Any, **kwargs: Any) -> Any:
    """``converter.quantize`` for a benchmark row: a model slower than FP32 on ORT CPU fails converter's latency
    gate (:class:`converter.errors.SlowerThanFloatError`, exit 1 on the command line) after it is written; a
    benchmark still measures it as a row of its table. The gate's verdict is printed; the written result returned."""
    from converter import quantize
    from converter.errors import SlowerThanFloatError

    try:
        return quantize(*args, **kwargs)
    except SlowerThanFloatError as exc:
        print(f"latency gate failed (the row is still measured): {exc.message}", file=sys.stderr, flush=True)
        return exc.result
