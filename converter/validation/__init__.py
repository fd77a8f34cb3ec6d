"""Model validation, ONNX and PyTorch: what in a model stops or weakens quantization, each finding with a fix.

:mod:`.onnx_checks` checks an ONNX model (table of checks, :func:`validate_onnx`); :mod:`.torch_checks` checks a
PyTorch module and then its ONNX export (:func:`validate_torch`, torch imported only when called). The
``qconvert validate`` command (converter/commands/validate.py) prints what they return.
"""

from .onnx_checks import ERROR, INFO, SEVERITIES, WARNING, Finding, ensure_float_model, format_table, report, \
    summarize, validate_onnx
from .torch_checks import onnx_module_map, validate_torch

__all__ = ["ERROR", "INFO", "SEVERITIES", "WARNING", "Finding", "ensure_float_model", "format_table", "report",
           "summarize", "validate_onnx", "onnx_module_map", "validate_torch"]
