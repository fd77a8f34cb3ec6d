"""What one batch job asks of the machine that runs it: CPUs, memory, GPUs.

A job file sets ``num_cpus`` / ``memory`` / ``num_gpus`` per job or in ``defaults``; what it leaves
out is derived from the job's size:

=========  ==========================================================================================
num_cpus   1 (a batch runs many jobs side by side; one job's ONNX Runtime sessions scale poorly
           beyond a few threads on small models). ONNX Runtime's intra-op threads and OpenMP's
           ``OMP_NUM_THREADS`` are set to ``threads`` = ceil(num_cpus), with every executor, unless
           the job's config sets ``threads`` itself.
memory     :data:`BASE_MEMORY` (a worker process with numpy, onnx, ONNX Runtime; + torch for a PyTorch
           factory) + :data:`MODEL_MEMORY_FACTOR` x the model file's size (the float model, its
           preprocessed copy, the calibration graph with its taps, ONNX Runtime's copy of the
           weights, the QDQ model) + the calibration data's size (at most one batch of it is decoded
           at a time, but .npy files are read whole). Measured peak RSS of a worker (ORT 1.32,
           batch 16, tools/batch_executors.py's jobs): ResNet-8-large (1.9 MB) 142 MiB (derived:
           787 MiB); EfficientNet-Lite0 (17.7 MB, 32 JPEGs to calibrate, 64 to verify) 684 MiB
           (derived: 878 MiB); the digits CNN from its PyTorch factory 447 MiB (derived: 1 GiB).
           Activations grow with batch_size and input size, not with the weights: set ``memory``
           for models with large activations.
num_gpus   1 where the job asks for the CUDA provider (``providers: cuda`` in its config or its
           verify settings), else 0 (``auto`` runs on a GPU only where the node has one anyway).
=========  ==========================================================================================

``memory`` is bytes, or a string with a unit: ``"512MiB"``, ``"4GB"``, ``"1.5GiB"`` (K/M/G/T are
powers of 1000, Ki/Mi/Gi/Ti of 1024). Ray schedules on these figures (they are reservations, not
limits: the OOM killer still ends a worker that outgrows its node); the local executor honours
``num_cpus`` (threads) and ignores ``memory`` / ``num_gpus`` (it says so once).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

MIB = 1 << 20
BASE_MEMORY = 768 * MIB
BASE_MEMORY_TORCH = 1024 * MIB  # + torch, and the export's traced copy of the module
MODEL_MEMORY_FACTOR = 6

KEYS = ("num_cpus", "memory", "num_gpus")
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20,
         "gi": 1 << 30, "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40}
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    memory: int = BASE_MEMORY  # bytes
    num_gpus: float = 0.0
    given: tuple[str, ...] = ()  # the keys the job file set (the rest are derived)

    @property
    def threads(self) -> int:
        """ONNX Runtime intra-op / OpenMP threads for these CPUs."""
        return max(1, math.ceil(self.num_cpus))

    def to_dict(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "memory": self.memory, "num_gpus": self.num_gpus,
                "threads": self.threads, "given": list(self.given)}

    def describe(self) -> str:
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
        return f"{self.num_cpus:g} CPU, {format_bytes(self.memory)}{gpus}"


def parse(values: dict[str, Any], where: dict[str, str]) -> dict[str, float | int]:
    """Validate the resource keys in ``values``; ``where[key]`` names the file and line for errors."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        at = where.get(key, "the job file")
        if key == "memory":
            out[key] = parse_memory(value, at)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key!r} in {at} must be a number, got {value!r}",
                              f"write e.g. {key}: {2 if key == 'num_cpus' else 1}")
        if (key == "num_cpus" and value <= 0) or (key == "num_gpus" and value < 0) or not math.isfinite(value):
            bound = "> 0" if key == "num_cpus" else ">= 0"
            raise ConfigError(f"{key!r} in {at} must be {bound}, got {value!r}",
                              f"use e.g. {key}: {2 if key == 'num_cpus' else 1}")
        out[key] = float(value)
    return out


def parse_memory(value: Any, at: str) -> int:
    fix = "write bytes (e.g. memory: 4000000000) or a size with a unit: memory: 4GiB, memory: 512MB"
    if isinstance(value, bool):
        raise ConfigError(f"'memory' in {at} must be a size, got {value!r}", fix)
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _MEMORY.match(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ConfigError(f"'memory' in {at} must be a size, got {value!r}", fix)
    if unit not in UNITS:
        raise ConfigError(f"'memory' in {at}: unknown unit {unit!r} in {value!r}",
                          "use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
    size = int(number * UNITS[unit])
    if size < MIB:
        raise ConfigError(f"'memory' in {at} is {size} bytes, less than 1 MiB: a unit is missing?", fix)
    return size


def derive(given: dict[str, float | int], model: str, is_torch: bool, data_paths: list[str | None],
           providers: list[str]) -> Resources:
    """The job's resources: what the job file gave, the rest from the job's size (module docstring)."""
    model_size = 0 if is_torch else _size(model)
    memory = (BASE_MEMORY_TORCH if is_torch else BASE_MEMORY) + MODEL_MEMORY_FACTOR * model_size \
        + sum(_size(p) for p in dict.fromkeys(p for p in data_paths if p))
    gpus = 1.0 if "cuda" in providers else 0.0
    return Resources(num_cpus=float(given.get("num_cpus", 1.0)), memory=int(given.get("memory", memory)),
                     num_gpus=float(given.get("num_gpus", gpus)), given=tuple(k for k in KEYS if k in given))


def _size(path: str | None) -> int:
    """Bytes of a file, or of the files directly in a folder (what calibration reads); 0 when missing."""
    if not path:
        return 0
    p = Path(path)
    try:
        if p.is_dir():
            return sum(c.stat().st_size for c in p.iterdir() if c.is_file())
        return p.stat().st_size if p.is_file() else 0
    except OSError:
        return 0


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
