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

from .graph.model_io import external_copy, small_bytes
from .graph.validate import QUANTIZED_OPS

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

    from .errors import ConfigError

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


def custom_op_fix(error: str) -> str | None:
    """The fix for an ONNX Runtime load error naming an op it has no kernel for (a custom-domain op whose library
    was not registered); None for any other error."""
    if "is not a registered function/op" not in error:
        return None
    loaded = f" (loaded now: {', '.join(CUSTOM_OP_LIBRARIES)})" if CUSTOM_OP_LIBRARIES else ""
    return ("register the shared library that implements the op with --custom-op-library PATH (config key "
            f"custom_op_libraries; Python: converter.use_custom_op_libraries(PATH)){loaded}, or export the model "
            "with standard ONNX ops")


def session_options(optimization: str = "basic", threads: int = 0, mem_pattern: bool = True) -> ort.SessionOptions:
    """SessionOptions with :data:`SESSION_CONFIG` and :data:`CUSTOM_OP_LIBRARIES`; ``optimization`` is
    off | basic | extended | all."""
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
    return so


def create_session(model: onnx.ModelProto | bytes | str, providers: Sequence[str] | None = None,
                   optimization: str = "basic", threads: int = 0, mem_pattern: bool = True) -> ort.InferenceSession:
    """An ORT session for a model (proto, serialized bytes or a path); ORT's exceptions pass through.

    A proto over the protobuf limit (:func:`converter.graph.model_io.is_large`) is written with external
    data to a temporary folder and the session is made from that path (ONNX Runtime reads the weights
    while the session is created; the folder goes afterwards)."""
    options = session_options(optimization, threads, mem_pattern)
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
        norms = np.linalg.norm(g) * np.linalg.norm(r)
        cos = float(g @ r / norms) if norms > 0 else (1.0 if not g.any() and not r.any() else 0.0)
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


# what ONNX Runtime CPU's optimized graph runs on integers / with quantized weights, and the layer ops it runs in float
# (graph.validate's QUANTIZED_OPS, the quantized ops an input model must not have, less the Q/DQ ops themselves,
# plus the fused forms only ORT's optimizer makes)
INTEGER_KERNELS = (QUANTIZED_OPS - {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}) | {
    "MatMulNBits", "QAttention", "QEmbedLayerNormalization"}
FLOAT_LAYER_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


def kernel_summary(counts: dict[str, int]) -> dict[str, Any]:
    """``optimized_op_counts`` split into the layer kernels that run quantized (integer or low-bit weights, and
    every ``QLinear*`` op) and the layer ops that run in float (Conv, Gemm, MatMul and their fused forms)."""
    integer = {k: v for k, v in sorted(counts.items()) if k in INTEGER_KERNELS or k.startswith("QLinear")}
    floats = {k: v for k, v in sorted(counts.items()) if k in FLOAT_LAYER_OPS}
    return {"quantized_kernels": integer, "float_layer_ops": floats,
            "float_layers": sum(floats.values())}


def optimized_op_counts(model: onnx.ModelProto | bytes | str, optimization: str = "all") -> dict[str, int]:
    """Op type -> node count of the graph ONNX Runtime CPU runs after its optimizations (the QDQ fusions:
    ``QLinearConv`` where a Conv runs on integers, ``Conv``/``FusedConv`` where it runs in float), from the
    session's ``optimized_model_filepath``."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        options = session_options(optimization)
        options.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        if isinstance(model, onnx.ModelProto):
            model = small_bytes(model) or model.SerializeToString()
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts: dict[str, int] = {}
    for n in optimized.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
