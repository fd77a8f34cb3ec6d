"""The peer every tools/ benchmark compares with: ONNX Runtime's ``quantize_static`` with its usual settings.

``quantize_static(quant_format=QDQ, per_channel=True, activation_type=QUInt8, weight_type=QInt8,
calibrate_method=MinMax)``, all op types, fed by :class:`ListReader` over the same calibration batches our
quantizer reads. A tool that measures another setting (hand-picked op types, ORT's own defaults, another
calibration method) passes it as a keyword: :func:`ort_quantize_static` forwards it to ``quantize_static``. Two ORT quirks handled here, both measured on the assets:

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
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


def _opset(model: str | Path) -> int:
    proto = onnx.load(str(model), load_external_data=False)  # freed on return: not held while ORT calibrates
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


DEFAULTS = {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8, "calibrate_method": CalibrationMethod.MinMax}


def ort_quantize_static(model: str | Path, calib: Iterable[Mapping[str, np.ndarray]], out: str | Path,
                        **overrides) -> float:
    """Quantize ``model`` with ONNX Runtime to ``out``; returns the seconds it took (copy and upgrade included).
    ``overrides``: ``quantize_static`` keywords replacing :data:`DEFAULTS` (``op_types_to_quantize``,
    ``extra_options``, ...). ``calib`` may be any iterable of batches (a generator is read lazily).
    ORT's exceptions pass through (a failing peer is a result the caller reports)."""
    out = Path(out)
    t = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice, logged on the root logger every call
    try:
        _quantize(Path(model), calib, out, {**DEFAULTS, **overrides})
    finally:
        root.setLevel(level)
    return time.perf_counter() - t


def _quantize(model: Path, calib: Iterable[Mapping[str, np.ndarray]], out: Path, options: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="ort_qs_") as d:
        source = Path(d) / "float.onnx"
        if _opset(model) < 13:
            onnx.save(onnx.version_converter.convert_version(onnx.load(str(model)), 13), str(source))
        else:
            shutil.copyfile(model, source)
            data = Path(str(model) + ".data")
            if data.exists():  # the usual external-data name, kept beside the copy
                shutil.copyfile(data, Path(d) / data.name)
        quantize_static(str(source), str(out), ListReader(calib), **options)
