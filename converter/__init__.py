"""converter: ONNX-centric offline quantization (calibrate, insert QDQ, export AIMET encodings).

Public API::

    from converter import quantize, verify, auto_quantize, AccuracyTarget, BuiltinEvaluator, QuantConfig
    result = quantize("model.onnx", "calib_dir/", QuantConfig(target="ort-cpu"), output_dir="quantized")
    check = verify("model.onnx", result.model_path, "eval_dir/", labels="labels.txt")
    print(check.passed)

``QuantConfig(search=SearchConfig(metric="top1", eval="eval_dir/", labels="labels.txt", max_drop=0.01))`` makes
``quantize`` run the accuracy search (as a ``search:`` section of a config or job file does).
``output_dir`` is required (as ``quantize_static``'s output path is in ONNX Runtime): nothing is written
into the current directory unasked. Calibration and evaluation data: a folder (``.npy``/``.npz``, or
images + ``preprocess.yaml``, class subfolders included), a list of ``{input name: array}`` dicts, a
``get_next()`` reader, or for a single-input model a plain array (a batch along axis 0). Custom ONNX
Runtime ops: ``use_custom_op_libraries(path)`` or ``QuantConfig(custom_op_libraries=[path])``.
"""

import logging
import sys
import types

from ._version import __version__

logging.getLogger("converter").addHandler(logging.NullHandler())

from .config import TARGETS, QuantConfig  # noqa: E402
from .errors import UserError  # noqa: E402
from .export import export_torch  # noqa: E402
from .ort_session import use_custom_op_libraries  # noqa: E402
from .encodings_file import apply_encodings  # noqa: E402
from .pipeline import QuantResult  # noqa: E402
from .search import AccuracyTarget, BuiltinEvaluator, TargetNotMetError, auto_quantize, load_labels  # noqa: E402
# quantize, or the accuracy search where config.search is set (QuantConfig(search=SearchConfig(...)))
from .search import quantize_with_search as quantize  # noqa: E402
from .config import SearchConfig  # noqa: E402
from .verify import Thresholds, VerifyResult  # noqa: E402


class _CallableModule(types.ModuleType):
    """``converter.verify`` is both the module (``import converter.verify as m``, ``m.Thresholds``) and, called, its
    :func:`converter.verify.verify` function (``from converter import verify; verify(fp32, qdq, data)``)."""

    def __call__(self, *args, **kwargs):
        return self.verify(*args, **kwargs)


sys.modules[f"{__name__}.verify"].__class__ = _CallableModule

__all__ = ["quantize", "apply_encodings", "export_torch", "verify", "Thresholds", "VerifyResult", "auto_quantize",
           "AccuracyTarget", "BuiltinEvaluator", "TargetNotMetError", "load_labels", "use_custom_op_libraries",
           "QuantConfig", "SearchConfig", "QuantResult", "TARGETS", "UserError", "__version__"]
