"""A benchmark task: one model with its calibration data, its evaluator and the target its search aims at.

The tasks of the models bundled in ``models/`` (no assets needed) are here: the digits CNN and the digits YOLO
detector, exported with :func:`converter.export_torch`. The asset models' tasks are in :mod:`.assets`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.search import AccuracyTarget

ROOT = Path(__file__).resolve().parents[2]
CALIB_BATCH = 16


@dataclass
class Task:
    """One model to benchmark.

    ``evaluate(model_path) -> float``: the metric the search targets (higher is better); ``metrics(model_path)
    -> {name: value}``: the figures of the table (the search metric among them); ``target``: what the search aims
    at (``target_text`` says it in words); ``feed``: the batch-1 input of the latency timer; ``config``: keyword
    arguments of :class:`converter.QuantConfig` every row of ours uses (e.g. ``batch_size=1`` for a stateful model).
    """

    key: str
    title: str
    model: Path
    calib: list[dict[str, np.ndarray]]
    evaluate: Callable[[str], float]
    metrics: Callable[[str], dict[str, float]]
    metric_name: str
    target: AccuracyTarget
    target_text: str
    feed: dict[str, np.ndarray]
    config: dict[str, Any] = field(default_factory=dict)
    search_options: dict[str, Any] = field(default_factory=dict)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that must import this checkout (``converter``, ``tools``): the
    repository root first on ``PYTHONPATH``, then whatever was there."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_module(module: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a child process of this interpreter, from the repository root with
    :func:`child_env` (``kwargs`` go to :func:`subprocess.run`)."""
    kwargs.setdefault("env", child_env())
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, **kwargs)


def batches(x: Mapping[str, np.ndarray] | np.ndarray, size: int, name: str = "input") -> list[dict[str, np.ndarray]]:
    """``{input: x[i:i+size]}`` dicts (``x`` an array for input ``name``, or a dict of equally long arrays)."""
    feeds = dict(x) if isinstance(x, Mapping) else {name: x}
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n, size)]


def load_models_module(name: str):
    """models/<name>.py (models/ is a folder of scripts, not a package), imported once under the name the tests use."""
    mod_name = f"_models_{name}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, ROOT / "models" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    return sys.modules[mod_name]


def run_batches(model_path: str | Path, data: list[dict[str, np.ndarray]], output: str | None = None,
                threads: int = 0) -> np.ndarray:
    """One output of a model over batches, concatenated (ORT CPU, all optimizations: what a deployment runs)."""
    from converter.ort_session import create_session

    sess = create_session(str(model_path), optimization="all", threads=threads)
    names = None if output is None else [output]
    return np.concatenate([sess.run(names, b)[0] for b in data])


def _export(module, example, path: Path) -> Path:
    from converter import export_torch

    path.parent.mkdir(parents=True, exist_ok=True)
    export_torch(module, example, path)
    return path


class _Classifier:
    """Top-1 and top-1 agreement with FP32 of a classifier over held-out batches."""

    def __init__(self, fp32: Path, data: list[dict[str, np.ndarray]], labels: np.ndarray) -> None:
        self.data, self.labels = data, labels
        self.ref = run_batches(fp32, data).argmax(1)

    def metrics(self, path: str) -> dict[str, float]:
        pred = run_batches(path, self.data).argmax(1)
        return {"top1": float((pred == self.labels).mean()), "agreement": float((pred == self.ref).mean())}

    def top1(self, path: str) -> float:
        return self.metrics(path)["top1"]

    def agreement(self, path: str) -> float:
        return self.metrics(path)["agreement"]


def digits_cnn_task(work: Path) -> Task:
    """models/digits_cnn.py: the 597 held-out digits; calibration on 128 training digits (the quantizer never sees
    the evaluation digits); target top-1 agreement with FP32 >= 0.99."""
    import torch

    mod = load_models_module("digits_cnn")
    x_train, _, x_test, y_test = mod.load_split()
    path = _export(mod.build(), torch.zeros(mod.INPUT_SHAPE), work / "digits_cnn.onnx")
    clf = _Classifier(path, batches(x_test, 128, mod.INPUT_NAME), y_test)
    return Task("digits_cnn", "digits CNN (sklearn digits, 597 held out)", path,
                batches(x_train[:128], CALIB_BATCH, mod.INPUT_NAME), clf.agreement, clf.metrics, "agreement",
                AccuracyTarget(max_drop=None, min_value=0.99), "top-1 agreement >= 0.99", {mod.INPUT_NAME: x_test[:1]})


def digits_yolo_task(work: Path) -> Task:
    """models/digits_yolo.py: calibration 64 canvases (seed 10), evaluation 500 held-out canvases (seed 1, the
    digits the model never trained on); target class-score agreement drop <= 0.01 (the issue's 1%)."""
    import torch

    mod = load_models_module("digits_yolo")
    path = _export(mod.build(), torch.zeros(mod.INPUT_SHAPE), work / "digits_yolo.onnx")
    x_cal, _ = mod.make_data(64, seed=10)
    x_eval, gt = mod.make_data(500, seed=1)
    agreement = mod.ScoreAgreement(str(path), x_eval)

    def metrics(p: str) -> dict[str, float]:
        out = agreement.outputs(p)
        return {"score_agreement": agreement.score(out), "detection_accuracy": mod.detection_accuracy(out, gt)}

    return Task("digits_yolo", "digits YOLO (SiLU, DFL, Concat head; 500 held-out canvases)", path,
                batches(x_cal, CALIB_BATCH, mod.INPUT_NAME), agreement, metrics, "score_agreement",
                AccuracyTarget(max_drop=0.01), "class-score agreement drop <= 0.01", {mod.INPUT_NAME: x_eval[:1]})


BUNDLED: dict[str, Callable[[Path], Task]] = {"digits_cnn": digits_cnn_task, "digits_yolo": digits_yolo_task}
