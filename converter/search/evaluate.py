"""Evaluators and accuracy targets for the fallback search.

An evaluator is any callable ``evaluate(model_path) -> float`` where higher is better. Built-in
ones run the model on an evaluation set and compare with the float model (computed once):

* ``top1``       accuracy of the output's argmax against labels;
* ``top1-agreement`` fraction of samples whose argmax equals the float model's (``agreement`` accepted);
* ``cosine``     mean per-sample cosine similarity of the output to the float output;
* ``sqnr``       mean per-sample SQNR (dB) of the output against the float output (finite: identical
                 samples score a large finite value, see :func:`converter.metrics.sample_sqnr_db`).

The output read is the first graph output unless ``output`` names another; ``output="all"`` scores
every float output and takes the worst (``cosine``/``sqnr``). ``top1``/``top1-agreement`` need an output of
shape ``[N, classes]`` (trailing 1s allowed): a box-regression head or a sequence of hidden states is
refused with a message naming ``cosine`` and ``--evaluator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from ..calib.readers import check_label_count, model_inputs, open_calibration
from ..calib.runner import make_session
from ..errors import CalibrationDataError, ConfigError
from ..graph.model_io import small_bytes
from ..metrics import AGREEMENT, COSINE, SQNR, TOP1, metric_name, sample_cosines, sample_scores
from ..ort_session import OptimizationCheck, check_optimizations

METRICS = (TOP1, AGREEMENT, COSINE, SQNR)  # "agreement" is accepted for top1-agreement (metrics.ALIASES)
Evaluator = Callable[[str], float]

_CACHE_BYTES = 1 << 30  # evaluation inputs kept in memory up to this size, else re-read each time
SUBSET_MIN, SUBSET_MAX = 50, 300  # the subset ranking's item count bounds (NNCF: ranking_subset_size 300)


@dataclass(frozen=True)
class AccuracyTarget:
    """The accuracy a quantized model must reach, relative to the float model's metric.

    ``max_drop``: the allowed drop from the float metric (a fraction of it when ``relative``);
    ``min_value``: an absolute floor. Both may be given; the stricter one holds.
    """

    max_drop: float | None = 0.01
    relative: bool = False
    min_value: float | None = None

    def __post_init__(self) -> None:
        if self.max_drop is None and self.min_value is None:
            raise ConfigError("an accuracy target needs max_drop or min_value", "pass --max-drop or --min-metric")
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError(f"max_drop must be >= 0, got {self.max_drop}", "use e.g. --max-drop 0.01")

    def threshold(self, baseline: float) -> float:
        t = -math.inf
        if self.max_drop is not None:
            t = baseline * (1 - self.max_drop) if self.relative else baseline - self.max_drop
        if self.min_value is not None:
            t = max(t, self.min_value)
        return t

    def met(self, value: float, baseline: float) -> bool:
        return value >= self.threshold(baseline) - 1e-12

    def describe(self) -> str:
        parts = []
        if self.max_drop is not None:
            parts.append(f"drop <= {self.max_drop:g}{' (relative)' if self.relative else ''}")
        if self.min_value is not None:
            parts.append(f"metric >= {self.min_value:g}")
        return " and ".join(parts)


class BuiltinEvaluator:
    """Runs a model over an evaluation set and scores it against the float model (or labels).

    Models run with all graph optimizations (what a deployment runs). On the first batch each
    model's output is also computed without them (:func:`~converter.ort_session.check_optimizations`):
    a disagreement is warned about once and kept in ``optimization_check``.
    """

    def __init__(self, metric: str, float_model: onnx.ModelProto, eval_data: Any, labels: np.ndarray | None = None,
                 providers: list[str] | None = None, batch_size: int = 16, max_samples: int | None = None,
                 image_spec: str | Path | None = None, output: str | None = None) -> None:
        metric = metric_name(metric)  # "agreement": the old spelling of top1-agreement
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
        if metric == "top1" and labels is None:
            raise ConfigError("metric top1 needs labels", "pass --labels FILE (or use --target-metric top1-agreement)")

        self.metric = metric
        self.providers = providers or ["CPUExecutionProvider"]
        self.output_names = _pick_outputs(float_model, metric, output)
        self._source = open_calibration(eval_data, model_inputs(float_model), batch_size, max_samples, image_spec)
        check_label_count(self._source, labels, max_samples)  # before the float model runs over the data
        self._cached: list[dict[str, np.ndarray]] | None = None
        # the worst disagreement of optimized and unoptimized outputs seen (warned about once)
        self.optimization_check: OptimizationCheck | None = None
        self.optimization_warned = False
        # per batch: samples of different sizes stay apart
        self.reference = self._outputs(float_model, "the float model")
        if metric in (TOP1, AGREEMENT):
            shape = self.reference[0][0].shape if self.reference else ()
            classes = [d for d in shape[1:] if d != 1]
            if len(shape) < 2 or len(classes) != 1 or classes[0] < 2:
                raise ConfigError(f"metric {metric} reads output {self.output_names[0]!r} of shape {list(shape)}, "
                                  "which is not [N, classes]",
                                  "use --target-metric cosine (or sqnr) for this output, pick a class output with "
                                  "--eval-output NAME, or score the model yourself with --evaluator file.py:fn")
        samples = sum(len(r[0]) for r in self.reference)
        if labels is not None and len(labels) != samples:
            raise CalibrationDataError(f"{len(labels)} labels for {samples} evaluation samples",
                                       "give one label per evaluation sample, in the data's sorted file order")
        self.labels = labels

    def _batches(self):
        if self._cached is not None:
            return self._cached
        batches, size = [], 0
        for b in self._source:
            batches.append(b)
            size += sum(v.nbytes for v in b.values())
            if size > _CACHE_BYTES:
                return self._source  # too big to keep: re-read every time
        self._cached = batches
        return batches

    def _outputs(self, model: onnx.ModelProto | str, what: str | None = None) -> list[list[np.ndarray]]:
        # a path goes to ONNX Runtime as it is; a proto is serialized once for both sessions below
        source = str(model) if not isinstance(model, onnx.ModelProto) else small_bytes(model) or model
        sess = make_session(source, self.providers, full_optimization=True)  # score what a deployment runs
        outputs = []
        for b in self._batches():
            outputs.append(sess.run(self.output_names, b))
            if len(outputs) == 1 and getattr(self, "_check", True):  # the guard: first batch only, against the unoptimized graph
                self._check_optimizations(source, b, self.output_names, outputs[0], what or self._describe(model))
        return outputs

    def _check_optimizations(self, proto: onnx.ModelProto | bytes | str, batch: dict[str, np.ndarray], outputs: list[str],
                             optimized: list[np.ndarray], what: str) -> None:
        check = check_optimizations(proto, batch, outputs, optimized, what, self.providers,
                                    warn=not self.optimization_warned)
        if check is not None and not check.agree:
            self.optimization_warned = True
            if self.optimization_check is None or check.cosine < self.optimization_check.cosine:
                self.optimization_check = check

    @staticmethod
    def _describe(model: onnx.ModelProto | str) -> str:
        return str(model) if not isinstance(model, onnx.ModelProto) else "a candidate model"

    def _sample_scores(self, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """The metric of each sample of one batch (its first output, flattened per sample): :mod:`converter.metrics`."""
        return sample_scores(self.metric, ref, out, labels)

    def score(self, outputs: list[list[np.ndarray]]) -> float:
        """Mean over samples of the metric (worst output first), ``outputs`` being the model's outputs per
        evaluation batch (a bare array per batch is taken as the one output)."""
        worst = math.inf
        for k in range(len(self.output_names)):
            scores, offset = [], 0
            for ref, out in zip(self.reference, outputs):
                out_k = out if isinstance(out, np.ndarray) else out[k]
                labels = None if self.labels is None else self.labels[offset:offset + len(ref[k])]
                scores.append(self._sample_scores(ref[k], out_k, labels))
                offset += len(ref[k])
            worst = min(worst, float(np.mean(np.concatenate(scores))))
        return worst

    def __call__(self, model_path: str | onnx.ModelProto) -> float:
        outputs = self._outputs(model_path)
        self.last_outputs = outputs  # what the subset ranking picks its items from (the all-INT8 model's)
        return self.score(outputs)

    # --- the subset ranking (NNCF's): the metric on the items a quantized model changes most ----------------

    def item_drops(self, outputs: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Per evaluation item: how much ``outputs`` lose of the metric against FP32 (top1: the FP32 item's
        score minus this one; agreement, cosine: 1 minus it; sqnr: minus it), and the cosine of the item's
        output to FP32's (the worst output's for both)."""
        drops, cosines = [], []
        for k in range(len(self.output_names)):
            d, c, offset = [], [], 0
            for ref, out in zip(self.reference, outputs):
                out_k = out if isinstance(out, np.ndarray) else out[k]
                labels = None if self.labels is None else self.labels[offset:offset + len(ref[k])]
                got = self._sample_scores(ref[k], out_k, labels)
                base = self._sample_scores(ref[k], ref[k], labels) if self.metric == "top1" else \
                    np.zeros_like(got) if self.metric == "sqnr" else np.ones_like(got)
                d.append(base - got)
                c.append(sample_cosines(ref[k], out_k))
                offset += len(ref[k])
            drops.append(np.concatenate(d))
            cosines.append(np.concatenate(c))
        return np.max(drops, axis=0), np.min(cosines, axis=0)

    def worst_items(self, outputs: list[list[np.ndarray]], size: int | None = None) -> np.ndarray:
        """Indices (ascending) of the items ``outputs`` changed most: largest metric drop first, then lowest
        output cosine. Default size: twice the items whose metric dropped (top1, top1-agreement; a quarter of the
        items for cosine/sqnr), at least 50 and at most 300 (NNCF's ranking subset size)."""
        drops, cosines = self.item_drops(outputs)
        n = len(drops)
        if size is None:
            changed = int((drops > 1e-12).sum()) if self.metric in (TOP1, AGREEMENT) else n // 4
            size = min(n, SUBSET_MAX, max(SUBSET_MIN, 2 * changed))
        order = np.lexsort((np.arange(n), cosines, -drops))
        return np.sort(order[:min(size, n)])

    def subset(self, items: np.ndarray) -> "BuiltinEvaluator":
        """This evaluator restricted to ``items`` (indices over the evaluation set, in its order): calling it
        scores a model on those items only. Raises :class:`ConfigError` when an input has no batch axis."""
        wanted = set(int(i) for i in items)
        batches, refs, labels, offset = [], [], [], 0
        for b, ref in zip(self._batches(), self.reference):
            n = len(ref[0])
            local = [j for j in range(n) if offset + j in wanted]
            if local:
                if any(np.ndim(v) == 0 or len(v) != n for v in b.values()):
                    raise ConfigError("the subset ranking needs evaluation inputs with a batch axis",
                                      "use --ranking propagated")
                batches.append({k: np.asarray(v)[local] for k, v in b.items()})
                refs.append([r[local] for r in ref])
                if self.labels is not None:
                    labels.append(self.labels[offset:offset + n][local])
            offset += n
        view = object.__new__(BuiltinEvaluator)
        view.__dict__.update(self.__dict__)
        view._cached, view.reference = batches, refs
        view.labels = np.concatenate(labels) if labels else None
        view.optimization_warned = True  # the full evaluations check optimizations; the subset runs do not
        view._check = False
        return view

    def score_and_cosine(self, model_path: str | onnx.ModelProto) -> tuple[float, float]:
        """The metric and the mean item cosine to FP32 (the subset ranking's tie-break) of one model."""
        outputs = self._outputs(model_path)
        return self.score(outputs), float(np.mean(self.item_drops(outputs)[1]))


def _pick_outputs(model: onnx.ModelProto, metric: str, output: str | None) -> list[str]:
    names = [o.name for o in model.graph.output]
    if output is None:
        return names[:1]
    if output == "all":
        if metric in (TOP1, AGREEMENT):
            raise ConfigError(f"metric {metric} reads one class output; --eval-output all takes the worst of every "
                              "output", "use --target-metric cosine or sqnr with --eval-output all, or name one "
                              "output with --eval-output NAME")
        floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in (
            onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)]
        return floats or names[:1]
    if output not in names:
        raise ConfigError(f"the model has no output {output!r}", f"use one of: {', '.join(names)} (or all)")
    return [output]
