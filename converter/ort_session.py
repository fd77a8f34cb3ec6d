"""Every ONNX Runtime session the tool creates comes from :func:`create_session`.

Why one place: ONNX Runtime 1.32 computes 16-bit QDQ MatMul/Gemm models wrongly at its default
optimization level. Its ``QDQSelectorActionTransformer`` (levels ORT_ENABLE_EXTENDED and ALL, CPU
provider) gained a rule that replaces a constant weight ``DequantizeLinear`` (int8 per-channel or
per-tensor, or 2/4-bit) feeding ``MatMul``/``Gemm`` between 16-bit activation Q/DQ pairs with a
``com.microsoft.MatMulNBits`` node. Its ``accuracy_level`` comes from the session option
``session.qdq_matmulnbits_accuracy_level``, default 4 = int8 compute: inside the kernel the input
activation is re-quantized to int8, per block of 32 values along K, so a 16-bit activation gets 8
bits again (ORT 1.31 leaves these MatMuls alone). On a MatMul model quantized with 16-bit activations
the output cosine vs FP32 drops from 0.9991 to 0.3794 (tools/ort_16bit_repro.py).

The fix, :data:`SESSION_CONFIG`: accuracy level 1 (fp32 compute) keeps the rewrite (weights packed
once) but computes what DequantizeLinear + MatMul compute. It is set in every session: ORT versions
without the rewrite do not use it. A deployment on ONNX Runtime's CPU provider needs the same entry:
see the README, "ONNX Runtime versions".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx
import onnxruntime as ort

log = logging.getLogger("converter")

# Session config entries every session gets (see the module docstring).
SESSION_CONFIG: dict[str, str] = {"session.qdq_matmulnbits_accuracy_level": "1"}

LEVELS = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(optimization: str = "basic", threads: int = 0, mem_pattern: bool = True) -> ort.SessionOptions:
    """SessionOptions with :data:`SESSION_CONFIG`; ``optimization`` is off | basic | extended | all."""
    so = ort.SessionOptions()
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
    """An ORT session for a model (proto, serialized bytes or a path); ORT's exceptions pass through."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, session_options(optimization, threads, mem_pattern),
                                providers=list(providers or ["CPUExecutionProvider"]))
