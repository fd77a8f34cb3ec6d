"""Run the float model in ONNX Runtime and feed every planned activation to its observer.

The model is copied with the activations to observe added as graph outputs, then run batch by
batch; each batch's tensors go to their observers and are dropped. The CUDA execution provider is
used when onnxruntime-gpu offers it, else the CPU one (logged either way).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from ..errors import CalibrationDataError, UserError
from .observers import make_observer
from .readers import CalibrationSource

log = logging.getLogger("converter")


def select_providers(preference: str = "auto") -> list[str]:
    """ONNX Runtime providers for ``preference`` (auto | cpu | cuda)."""
    available = ort.get_available_providers()
    if preference == "cpu":
        log.info("calibration on CPUExecutionProvider (requested)")
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        log.info("calibration on CUDAExecutionProvider (GPU)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference == "cuda":
        raise UserError("CUDAExecutionProvider was requested but this onnxruntime has no CUDA support "
                        f"(available: {', '.join(available)})",
                        "pip uninstall onnxruntime && pip install 'converter[gpu]', or use --providers cpu")
    log.info("CUDAExecutionProvider not available (available: %s); calibration falls back to CPUExecutionProvider",
             ", ".join(available))
    return ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto, providers: list[str], threads: int = 0,
                 optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    except Exception as exc:
        raise UserError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}",
                        "check the model with `qconvert validate`; it must run in ONNX Runtime as float first") from None


@dataclass
class CalibrationResult:
    observers: dict[str, object]
    samples: int
    batches: int
    seconds: float
    providers: list[str]
    source: str = ""


def collect(model: onnx.ModelProto, tensors: list[str], data: CalibrationSource, method: str,
            providers: list[str], threads: int = 0) -> CalibrationResult:
    """One pass over ``data``; returns an observer per tensor in ``tensors``."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in tensors:
        if name not in existing:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = make_session(augmented, providers, threads)
    fetch = [name for name in tensors]
    observers = {name: make_observer(method) for name in tensors}
    samples = batches = 0
    start = time.perf_counter()
    with tqdm(total=data.num_samples if data.max_samples is None else min(data.num_samples or data.max_samples,
                                                                            data.max_samples),
              desc="calibrating", unit="sample", disable=None, leave=False) as bar:
        for batch in data:
            try:
                outputs = session.run(fetch, batch)
            except Exception as exc:
                raise CalibrationDataError(f"ONNX Runtime failed on calibration batch {batches}: "
                                           f"{str(exc).splitlines()[0]}",
                                           "check that the data matches the model's input shapes") from None
            for name, value in zip(fetch, outputs):
                observers[name].update(np.asarray(value))
            n = next(iter(batch.values())).shape[0]
            samples += n
            batches += 1
            bar.update(n)
    seconds = time.perf_counter() - start
    log.info("calibrated %d tensors on %d samples in %.2f s (%.1f samples/s)", len(tensors), samples, seconds,
             samples / seconds if seconds else 0.0)
    return CalibrationResult(observers, samples, batches, seconds, providers)
