"""The peer every tools/ benchmark compares with: ONNX Runtime's ``quantize_static`` with its usual settings.

``quantize_static(quant_format=QDQ, per_channel=True, activation_type=QUInt8, weight_type=QInt8,
calibrate_method=MinMax)``, all op types, fed by :class:`ListReader` over the same calibration batches our
quantizer reads. Two ORT quirks handled here, both measured on the assets:

* it writes temporary files next to the model it is given (two runs on one path collide): the float model is
  copied into a private temporary folder first;
* ORT 1.31+ ``per_channel=True`` on an opset-11 model (ResNet-8) writes ``DequantizeLinear(axis=0)`` under opset
  11, which does not load (INVALID_GRAPH "Unrecognized attribute: axis"): the copy is upgraded to opset 13, the
  opset its docs ask for, as our own loader does.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)


class ListReader(CalibrationDataReader):
    """ORT's ``get_next`` protocol over a list of ``{input name: array}`` batches (``converter`` reads it too).
    A fresh reader per quantizer: it is consumed once."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]]) -> None:
        self._it = iter(list(batches))

    def get_next(self):
        return next(self._it, None)


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def ort_quantize_static(model: str | Path, calib: Iterable[Mapping[str, np.ndarray]], out: str | Path) -> float:
    """Quantize ``model`` with ONNX Runtime to ``out``; returns the seconds it took (copy and upgrade included).
    ORT's exceptions pass through (a failing peer is a result the caller reports)."""
    out = Path(out)
    t = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice, logged on the root logger every call
    try:
        _quantize(Path(model), calib, out)
    finally:
        root.setLevel(level)
    return time.perf_counter() - t


def _quantize(model: Path, calib: Iterable[Mapping[str, np.ndarray]], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="ort_qs_") as d:
        source = Path(d) / "float.onnx"
        proto = onnx.load(str(model))
        if _opset(proto) < 13:
            onnx.save(onnx.version_converter.convert_version(proto, 13), str(source))
        else:
            shutil.copyfile(model, source)
        quantize_static(str(source), str(out), ListReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
