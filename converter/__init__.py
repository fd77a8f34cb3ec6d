"""converter: ONNX-centric offline quantization (calibrate, insert QDQ, export AIMET encodings).

Public API::

    from converter import quantize, QuantConfig, export_torch, apply_encodings
    result = quantize("model.onnx", "calib_dir/", QuantConfig(target="ort-cpu"), output_dir="out")
"""

import logging

__version__ = "0.1.0"

logging.getLogger("converter").addHandler(logging.NullHandler())

from .config import TARGETS, QuantConfig  # noqa: E402
from .errors import UserError  # noqa: E402
from .export import export_torch  # noqa: E402
from .pipeline import QuantResult, apply_encodings, quantize  # noqa: E402

__all__ = ["quantize", "apply_encodings", "export_torch", "QuantConfig", "QuantResult", "TARGETS", "UserError",
           "__version__"]
