"""Every ONNX Runtime session the tool creates comes from :func:`create_session`.

Why one place: ONNX Runtime 1.32 computes 16-bit QDQ MatMul/Gemm models wrongly at its default
optimization level. Its ``QDQSelectorActionTransformer`` (levels ORT_ENABLE_EXTENDED and ALL, CPU
provider) gained a rule that replaces a constant weight ``DequantizeLinear`` (int8 per-channel or
per-tensor, or 2/4-bit) feeding ``MatMul``/``Gemm`` between 16-bit activation Q/DQ pairs with a
``com.microsoft.MatMulNBits`` node. Its ``accuracy_level`` comes from the session option
``session.qdq_matmulnbits_accuracy_level``, default 4 = int8 compute: inside the kernel the input
activation is re-quantized to int8, per block of 32 values along K, so a 16-bit activation gets 8
bits again (ORT 1.31 leaves these MatMuls alone). On the four-MatMul test model quantized with 16-bit
activations the output cosine vs FP32 drops from 0.9991 to 0.3794; tools/ort_16bit_repro.py
reproduces it with one MatMul.

The fix, :data:`SESSION_CONFIG`: accuracy level 1 (fp32 compute) keeps the rewrite (weights packed
once) but computes what DequantizeLinear + MatMul compute. It is set in every session: ORT versions
without the rewrite do not use it. A deployment on ONNX Runtime's CPU provider needs the same entry:
see the README, "ONNX Runtime versions".

:func:`check_optimizations` is the guard for the next such change: the evaluators run the
optimized graph (what a deployment runs) and compare its first batch with an unoptimized session.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .errors import ConfigError, UserError
from .graph.model_io import external_copy, small_bytes
from .metrics import cosine
from .ops import FLOAT_LAYER_OPS, FUSED_FOLLOWERS, INTEGER_KERNELS, WEIGHTED_LAYER_OPS

log = logging.getLogger("converter")

# Session config entries every session gets (see the module docstring).
SESSION_CONFIG: dict[str, str] = {"session.qdq_matmulnbits_accuracy_level": "1"}

LEVELS = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# The guard's tolerance: optimized vs unoptimized outputs of the same model on the same batch.
# Fused integer kernels (QLinearConv, ...) round differently from Q/DQ + float op, which moves a
# quantized output by a step here and there: EfficientNet-Lite0 at 8 bits, fused vs unfused, cosine
# 0.99943 and max error 1.6% of the range (digits CNN: identical; 16-bit models: identical). The ORT
# 1.32 16-bit MatMul rewrite: cosine 0.48 on the four-MatMul test model, 0.953 in the repro script.
MIN_COSINE = 0.995
MAX_RELATIVE_ERROR = 0.1  # max |optimized - reference| / max |reference|


# Custom-op libraries (shared objects with ONNX Runtime custom kernels) every session registers: set by
# --custom-op-library, the config key custom_op_libraries or converter.use_custom_op_libraries().
CUSTOM_OP_LIBRARIES: list[str] = []


def use_custom_op_libraries(paths) -> list[str]:
    """Register these custom-op libraries in every session from now on (added to those already set; each
    checked to exist and to load in ONNX Runtime, so a wrong path fails here and not in the middle of a run)."""
    from pathlib import Path

    for p in [paths] if isinstance(paths, (str, Path)) else list(paths or ()):
        path = str(Path(p).resolve())
        if path in CUSTOM_OP_LIBRARIES:
            continue
        if not Path(path).is_file():
            raise ConfigError(f"custom-op library not found: {p}",
                              "give the path of the shared library (.so/.dll/.dylib) that implements the ops")
        try:
            ort.SessionOptions().register_custom_ops_library(path)
        except Exception as exc:
            raise ConfigError(f"ONNX Runtime cannot load the custom-op library {p}: {str(exc).splitlines()[0]}",
                              "give a library built for this ONNX Runtime version and platform") from None
        CUSTOM_OP_LIBRARIES.append(path)
        log.debug("custom-op library registered in every session: %s", path)
    return list(CUSTOM_OP_LIBRARIES)


PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
}


def select_providers(preference: str | Sequence[str] = "auto") -> list[str]:
    """The execution providers for ``preference``, in order; the one resolver every command uses.

    ``auto``: CUDA then CPU where this onnxruntime has CUDA, else CPU. ``cpu``: CPU. ``cuda``: CUDA then CPU
    (an error when this onnxruntime has no CUDA). Anything else (``cuda,cpu``, ``dml``, full provider names, a
    list): those available, in order; the missing ones are skipped with a warning, none available is an error."""
    available = ort.get_available_providers()
    if isinstance(preference, str) and preference in ("auto", "cpu", "cuda"):
        if preference == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            log.info("running on CUDAExecutionProvider (GPU)")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if preference == "cuda":
            raise UserError("CUDAExecutionProvider was requested but this onnxruntime has no CUDA support "
                            f"(available: {', '.join(available)})",
                            "pip uninstall onnxruntime && pip install 'converter[gpu]', or use --providers cpu")
        # auto on a CPU-only onnxruntime is the usual case, not news: only -v says so
        log.debug("CUDAExecutionProvider not available (available: %s); running on CPUExecutionProvider",
                  ", ".join(available))
        return ["CPUExecutionProvider"]
    names = [p.strip() for p in preference.split(",") if p.strip()] if isinstance(preference, str) else preference
    wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in names]
    chosen = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if not chosen:
        raise UserError(f"none of the requested execution providers is available: {', '.join(wanted)} "
                        f"(this onnxruntime has {', '.join(available)})",
                        "use --providers cpu, or install the onnxruntime build for your accelerator")
    if missing:
        log.warning("execution providers not available, skipped: %s (running on %s)", ", ".join(missing),
                    ", ".join(chosen))
    return chosen


def custom_op_fix(error: str) -> str | None:
    """The fix for an ONNX Runtime load error naming an op it has no kernel for (a custom-domain op whose library
    was not registered); None for any other error."""
    if "is not a registered function/op" not in error:
        return None
    loaded = f" (loaded now: {', '.join(CUSTOM_OP_LIBRARIES)})" if CUSTOM_OP_LIBRARIES else ""
    return ("register the shared library that implements the op with --custom-op-library PATH (config key "
            f"custom_op_libraries; Python: converter.use_custom_op_libraries(PATH)){loaded}, or export the model "
            "with standard ONNX ops")


def session_options(optimization: str = "basic", threads: int = 0, mem_pattern: bool = True,
                    spinning: bool = True) -> ort.SessionOptions:
    """SessionOptions with :data:`SESSION_CONFIG` and :data:`CUSTOM_OP_LIBRARIES`; ``optimization`` is
    off | basic | extended | all. ``spinning`` False: the intra-op threads sleep between runs instead of spinning
    (two sessions timed in turns: :mod:`converter.timing`)."""
    so = ort.SessionOptions()
    for lib in CUSTOM_OP_LIBRARIES:
        so.register_custom_ops_library(lib)
    so.log_severity_level = 3
    so.enable_mem_pattern = mem_pattern
    if threads:
        so.intra_op_num_threads = threads
    so.graph_optimization_level = LEVELS[optimization]
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def create_session(model: onnx.ModelProto | bytes | str, providers: Sequence[str] | None = None,
                   optimization: str = "basic", threads: int = 0, mem_pattern: bool = True,
                   spinning: bool = True) -> ort.InferenceSession:
    """An ORT session for a model (proto, serialized bytes or a path); ORT's exceptions pass through.

    A proto over the protobuf limit (:func:`converter.graph.model_io.is_large`) is written with external
    data to a temporary folder and the session is made from that path (ONNX Runtime reads the weights
    while the session is created; the folder goes afterwards)."""
    options = session_options(optimization, threads, mem_pattern, spinning)
    providers = list(providers or ["CPUExecutionProvider"])
    if isinstance(model, onnx.ModelProto):
        data = small_bytes(model)
        if data is None:
            with external_copy(model) as path:
                return ort.InferenceSession(path, options, providers=providers)
        model = data
    return ort.InferenceSession(model, options, providers=providers)


@dataclass(frozen=True)
class OptimizationCheck:
    """Optimized vs unoptimized outputs of one model on one batch (the worst floating output)."""

    output: str | None
    cosine: float
    relative_error: float

    @property
    def agree(self) -> bool:
        return self.cosine >= MIN_COSINE and self.relative_error <= MAX_RELATIVE_ERROR

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "cosine": self.cosine, "relative_max_error": self.relative_error,
                "agree": self.agree, "onnxruntime": ort.__version__}


def compare_outputs(names: Sequence[str], optimized: Sequence[np.ndarray],
                    reference: Sequence[np.ndarray]) -> OptimizationCheck:
    """The worst output's cosine and max error relative to the reference's max magnitude."""
    worst = OptimizationCheck(None, 1.0, 0.0)
    for name, got, ref in zip(names, optimized, reference):
        got, ref = np.asarray(got), np.asarray(ref)
        if not np.issubdtype(ref.dtype, np.floating) or got.shape != ref.shape or ref.size == 0:
            continue
        g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
        if not (np.isfinite(g).all() and np.isfinite(r).all()):
            continue
        cos = cosine(r, g)
        scale = float(np.abs(r).max())
        rel = float(np.abs(g - r).max() / scale) if scale > 0 else float(np.abs(g).max() > 0)
        check = OptimizationCheck(name, cos, rel)
        if worst.output is None or (not check.agree, -cos, rel) > (not worst.agree, -worst.cosine,
                                                                  worst.relative_error):
            worst = check
    return worst


def check_optimizations(model: onnx.ModelProto | bytes | str, feeds: Mapping[str, np.ndarray],
                        outputs: Sequence[str], optimized: Sequence[np.ndarray], what: str,
                        providers: Sequence[str] | None = None, threads: int = 0,
                        warn: bool = True) -> OptimizationCheck | None:
    """Run ``model`` without graph optimizations on ``feeds`` and compare with ``optimized``.

    ``optimized``: the optimized session's ``outputs`` on the same feeds. Logs a warning naming the
    ONNX Runtime version when they disagree beyond :data:`MIN_COSINE` / :data:`MAX_RELATIVE_ERROR`
    (``warn``). None when the unoptimized session cannot be made or run.
    """
    try:
        plain = create_session(model, providers, "off", threads)
        reference = plain.run(list(outputs), dict(feeds))
    except Exception as exc:  # the guard must never stop an evaluation
        log.debug("graph optimization check of %s skipped: %s", what, exc)
        return None
    check = compare_outputs(outputs, optimized, reference)
    if not check.agree and warn:
        log.warning(
            "ONNX Runtime %s: graph optimizations change the result of %s: on the first batch, output %r of the "
            "optimized session has cosine %.4f (max error %.1f%% of its range) against the same model run without "
            "graph optimizations; the numbers measured here are those of the optimized graph, which is what a "
            "deployment runs. Install the tested versions (pip install -c constraints.txt ...) and see the README, "
            "'ONNX Runtime versions', for the session options a deployment needs",
            ort.__version__, what, check.output, check.cosine, 100 * check.relative_error)
    return check


def kernel_summary(counts: dict[str, int]) -> dict[str, Any]:
    """``optimized_op_counts`` split into the layer kernels that run quantized (integer or low-bit weights, and
    every ``QLinear*`` op) and the layer ops that run in float (Conv, Gemm, MatMul and their fused forms)."""
    integer = {k: v for k, v in sorted(counts.items()) if k in INTEGER_KERNELS or k.startswith("QLinear")}
    floats = {k: v for k, v in sorted(counts.items()) if k in FLOAT_LAYER_OPS}
    return {"quantized_kernels": integer, "float_layer_ops": floats,
            "float_layers": sum(floats.values())}


def optimized_model(model: onnx.ModelProto | bytes | str, optimization: str = "all") -> onnx.ModelProto:
    """The graph ONNX Runtime CPU runs after its optimizations, from the session's ``optimized_model_filepath``
    (weights not loaded)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        options = session_options(optimization)
        options.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        if isinstance(model, onnx.ModelProto):
            model = small_bytes(model) or model.SerializeToString()
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath, load_external_data=False)


def optimized_op_counts(model: onnx.ModelProto | bytes | str, optimization: str = "all") -> dict[str, int]:
    """Op type -> node count of the graph ONNX Runtime CPU runs after its optimizations (the QDQ fusions:
    ``QLinearConv`` where a Conv runs on integers, ``Conv``/``FusedConv`` where it runs in float)."""
    return _op_counts(optimized_model(model, optimization))


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


class LayerNames:
    """Maps a node of ONNX Runtime's optimized graph back to the layer (Conv, ConvTranspose, Gemm, MatMul node) of
    the model it came from. ORT names what it makes after the node it rewrites (``QLinearConv``, ``QGemm``,
    ``FusedConv`` carry the anchor's name, sometimes with a suffix: ``_token_12``, ``/MatMulAddFusion``) or after the
    output of the group it fused (the NCHWc ``Conv`` of a Conv -> Clip: ``<Clip output>_nchwc``); failing both, the
    layer that produced one of the node's outputs. A tensor belongs to a layer when it is the layer's output or
    the output of a node whose only data input from a layer chain is read by nothing else (Conv -> BN -> Clip)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.layers = [n.name for n in model.graph.node if n.op_type in WEIGHTED_LAYER_OPS and n.name]
        layer_set = set(self.layers)
        readers: dict[str, int] = {}
        for n in model.graph.node:
            for t in n.input:
                readers[t] = readers.get(t, 0) + 1
        owner: dict[str, str] = {}  # tensor -> layer
        for n in model.graph.node:
            if n.name in layer_set:
                owner.update({o: n.name for o in n.output if o})
                continue
            chains = {owner[t] for t in n.input if t in owner and readers.get(t) == 1}
            if len(chains) == 1 and len(n.output) == 1 and n.op_type in FUSED_FOLLOWERS:
                owner[n.output[0]] = chains.pop()
        self._owner = {**owner, **{x: x for x in self.layers}}  # a layer's name wins over a tensor of that name
        self._by_length = sorted(self._owner, key=len, reverse=True)

    def __call__(self, node: onnx.NodeProto) -> str | None:
        if node.name in self._owner:
            return self._owner[node.name]
        for key in self._by_length:  # longest first: "conv1_token_3" is conv1's, not conv's
            if node.name.startswith(key) and node.name[len(key)] in "_/":
                return self._owner[key]
        return next((self._owner[o] for o in node.output if o in self._owner), None)


@dataclass(frozen=True)
class RuntimeLayers:
    """What ONNX Runtime CPU's optimized graph (main graph) runs: op counts, and the model's layers it runs in float
    (named as in the model, in its graph order). ``unnamed``: float layer ops that map to no layer of the model."""

    counts: dict[str, int]
    layers: tuple[str, ...]  # every layer of the model (Conv, ConvTranspose, Gemm, MatMul), graph order
    float_layers: tuple[str, ...]
    unnamed: int = 0

    @property
    def float_fraction(self) -> float:
        return len(self.float_layers) / len(self.layers) if self.layers else 0.0


def runtime_layers(model: onnx.ModelProto, data: bytes | str | None = None,
                   optimization: str = "all") -> RuntimeLayers:
    """The layers of ``model`` that ONNX Runtime CPU runs in float after its optimizations, by name.

    A Q/DQ pair ORT cannot fuse leaves its layer in float (an excluded layer, a producer whose output lost its Q,
    a 4-bit Conv weight); so does a DQ -> Conv whose weight ORT dequantizes (``FusedConv``). ``data``: the model
    serialized (saves serializing it again)."""
    optimized = optimized_model(data if data is not None else model, optimization)
    names = LayerNames(model)
    floats, unnamed = set(), 0
    for n in optimized.graph.node:
        if n.op_type in FLOAT_LAYER_OPS:
            layer = names(n)
            if layer is None:
                unnamed += 1
            else:
                floats.add(layer)
    return RuntimeLayers(_op_counts(optimized), tuple(names.layers),
                         tuple(x for x in names.layers if x in floats), unnamed)


def profile_layer_times(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], runs: int = 10, warmup: int = 3,
                        threads: int = 0, optimization: str = "all",
                        statistic: str = "min") -> tuple[dict[str, float], float]:
    """Per layer of ``model`` (Conv, ConvTranspose, Gemm, MatMul node names), the milliseconds ONNX Runtime
    CPU spends in the kernels of its optimized graph that belong to that layer (:class:`LayerNames`: the fused
    integer kernel, the float Conv with its fused activation, a NCHWc Conv), from a profiled session
    (``SessionOptions.enable_profiling``) over ``runs`` runs after ``warmup``; and the same for the rest (Q/DQ,
    layout changes, element-wise ops no layer owns). A layer with no kernel of its own (fused away) is absent.
    ``statistic``: ``min`` (default), each kernel's fastest run summed -- on a busy machine preemption only ever adds
    time, so this is the steadiest estimate of an idle machine's time -- or ``median`` of the per-run sums."""
    node_runs, optimized = profile_node_runs(model, feeds, runs, warmup, threads, optimization)
    layer_of = LayerNames(model)
    by_name = {n.name: n for n in optimized.graph.node}
    per_run: dict[str, list[np.ndarray]] = {}  # layer -> [runs] times of each of its kernels
    rest: list[np.ndarray] = [np.zeros(runs)]
    for name, t in node_runs.items():
        node = by_name.get(name)
        layer = layer_of(node) if node is not None else None
        (rest if layer is None else per_run.setdefault(layer, [])).append(t)
    if statistic == "min":  # per node, its fastest run: preemption on a busy machine only ever adds time
        return ({k: float(np.min(v, axis=1).sum()) for k, v in per_run.items()},
                float(np.min(rest, axis=1).sum()))
    return ({k: float(np.median(np.sum(v, axis=0))) for k, v in per_run.items()},
            float(np.median(np.sum(rest, axis=0))))


def profile_node_runs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], runs: int = 10, warmup: int = 3,
                      threads: int = 0, optimization: str = "all") -> tuple[dict[str, np.ndarray], onnx.ModelProto]:
    """Per node of ONNX Runtime CPU's optimized graph, its kernel's milliseconds in each of ``runs`` profiled runs
    after ``warmup``, and that optimized graph (without external data): what :func:`profile_layer_times` sums."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        options = session_options(optimization, threads)
        options.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(d) / "profile")
        data = small_bytes(model) or model.SerializeToString()
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feed = {k: v for k, v in feeds.items() if k in names}
        for _ in range(warmup + runs):  # the warm-up runs' events are dropped below
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = onnx.load(str(Path(d) / "optimized.onnx"), load_external_data=False)
    node_runs: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            node_runs.setdefault(e["name"][: -len("_kernel_time")], []).append(float(e["dur"]) / 1000.0)
    return ({name: np.asarray(times[-runs:]) if len(times) >= runs else np.full(runs, np.median(times))
             for name, times in node_runs.items()}, optimized)
