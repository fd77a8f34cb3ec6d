"""One bench library for tools/: asset loaders, the ONNX Runtime baseline, the latency timer, INT8 accounting.

* :mod:`.assets`: where the real models and data live (``--assets DIR``, else ``$CONVERTER_ASSETS``, else
  /work/shared/assets as a fallback; the error names where it looked), the raw data loaders every tool shares
  (ImageNet samples, CIFAR-10, STS-B, the MiniLM tokenizer and export, Silero's WAVs) and one loader per asset
  model returning a :class:`~.tasks.Task`.
* :mod:`.tasks`: :class:`~.tasks.Task` (model, calibration batches, evaluator, target, batch-1 feed) and the
  tasks of the models bundled in ``models/`` (digits CNN, digits YOLO).
* :mod:`.ort_baseline`: ONNX Runtime's ``quantize_static`` with the usual settings (QDQ, per-channel int8
  weights, uint8 activations, MinMax; other settings as keywords) and the one calibration reader class.
* :mod:`.measure`: sessions with the project's options, batch-1 latency (median of N runs after a warm-up, a
  stated thread count, models taking turns) and the compute INT8 share as ONNX Runtime runs it (its optimized graph, control-flow bodies included).

Every session comes from :func:`converter.ort_session.create_session` (or its ``session_options``, where a tool
saves ORT's optimized graph). Scripts using this run as modules from
the repository root (``python -m tools.any_model_bench``); nothing here edits ``sys.path``.
"""

from .assets import ASSETS_ENV, AssetsError, add_assets_argument, assets_root
from .measure import compare_latency, compute_int8_share, latency_ms, latency_stats, quantize_any_speed, session
from .ort_baseline import ListReader, ort_quantize_static
from .tasks import Task

__all__ = [
           "ASSETS_ENV",
           "AssetsError",
           "add_assets_argument",
           "ListReader",
           "Task",
           "assets_root",
           "compare_latency",
           "compute_int8_share",
           "latency_ms",
           "latency_stats",
           "ort_quantize_static",
           "quantize_any_speed",
           "session",
]
