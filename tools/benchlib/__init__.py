"""One bench library for tools/: asset loaders, the ONNX Runtime baseline, the latency timer, INT8 accounting.

* :mod:`.assets`: where the real models and data live (``--assets DIR`` or ``$CONVERTER_ASSETS``, required: there
  is no default folder) and one loader per asset model, each returning a :class:`~.tasks.Task`.
* :mod:`.tasks`: :class:`~.tasks.Task` (model, calibration batches, evaluator, target, batch-1 feed) and the
  tasks of the models bundled in ``models/`` (digits CNN, digits YOLO).
* :mod:`.ort_baseline`: ONNX Runtime's ``quantize_static`` with the usual settings (QDQ, per-channel int8
  weights, uint8 activations, MinMax) and one calibration reader.
* :mod:`.measure`: batch-1 latency (median of N runs after a warm-up, a stated thread count, models taking
  turns) and the compute INT8 share as ONNX Runtime runs it (its optimized graph, control-flow bodies included).

Every session comes from :func:`converter.ort_session.create_session`. Scripts using this run as modules from
the repository root (``python -m tools.any_model_bench``); nothing here edits ``sys.path``.
"""

from .assets import ASSETS_ENV, AssetsError, assets_root
from .measure import compare_latency, compute_int8_share, latency_ms
from .ort_baseline import ListReader, ort_quantize_static
from .tasks import Task

__all__ = [
           "ASSETS_ENV",
           "AssetsError",
           "ListReader",
           "Task",
           "assets_root",
           "compare_latency",
           "compute_int8_share",
           "latency_ms",
           "ort_quantize_static",
]
