"""Batch conversion: many models from one job file, each job in its own process, resumable.

Job file (YAML or JSON; every relative path is relative to the job file's folder, not the current
directory; ``examples/jobs.yaml`` is one that runs as written)::

    defaults: {target: ort-cpu, calibration: {method: minmax}}   # config keys for every job (as in --config)
    output_dir: out/                                    # default: <job file stem>-out/
    timeout: 600                                        # seconds per job (default: none)
    jobs:
      - name: digits                                    # default: the model file's stem
        model: out/digits.onnx                          # an ONNX file ...
        calib: calib_data/digits/
        verify: {eval: eval_data/digits/, labels: eval_data/digits_labels.txt, min_agreement: 0.98}
      - name: effnet
        model: "models/efficientnet_lite0.py:build"     # ... or a PyTorch factory, exported first
        input_shape: [1, 3, 224, 224]
        calib: calib_data/photos/
        image_spec: calib_data/photos/preprocess.yaml   # optional (old name: calib_spec)
        config: {weights: {per_channel: false}}         # overrides defaults
        search: {metric: top1-agreement, eval: eval_data/photos/, max_drop: 0.01}   # runs the accuracy search
        timeout: 120
        num_cpus: 2                                     # also memory: 4GiB, num_gpus: 1 (here or in defaults)

The job file is validated as a whole before anything runs: an unknown key or a wrong type names
the key, the file and the line; ``defaults``, a job's ``config`` and its ``search`` go through the one config
validator, :meth:`QuantConfig.from_mappings` (sections or flat keys). A job with ``search:`` runs the accuracy
search (:func:`converter.search.quantize_with_search`); its ``job.json`` and summary row say whether the target
was met, the layers left in float, the final metric and the latency vs FP32; an unmet target fails the job
(stage ``search``; the best model found is still in the job folder).
``num_cpus`` / ``memory`` / ``num_gpus`` (per job, or in ``defaults`` for all) are what the job
asks of the executor; what is not given is derived from the job's size (:mod:`converter.resources`).
``num_cpus`` also sets the worker's ONNX Runtime intra-op threads and ``OMP_NUM_THREADS``.

Isolation. Each job runs ``python -m converter.batch WORKER.json`` in a fresh process (its own
session, cwd = the job's staging folder, stdout+stderr -> ``job.log``). The worker writes
``result.json`` when it ends normally; when it does not (``os._exit``, a segfault, the kernel's
OOM killer, the per-job timeout) the parent names the exit code or signal from the outside. The
other jobs carry on either way.

Atomicity. A job writes into ``<output_dir>/.staging-<name>-<pid>/``; when it ends the parent adds
``job.json`` and swaps the folder into ``<output_dir>/<name>/`` (rename the old one aside, rename the
new one in, delete the old one). A job dir therefore always holds the outputs of one complete run,
successful or not, never a mix.

Resume. ``job.json`` stores ``input_hash`` = SHA-256 over the model file's bytes (for a PyTorch
spec: the spec, the input shape and the factory's source file), every calibration file's name and
bytes, the calibration/verification spec and label files, the resolved QuantConfig, the
verification settings and the converter version. ``--resume`` skips a job whose last run succeeded
with the same hash and whose outputs are still there; everything else runs again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ._version import __version__
from . import resources as job_resources
from . import schema
from .config import QuantConfig, load_mapping
from .errors import EXIT_CHECK_FAILED, ConfigError, SlowerThanFloatError, UserError
from .graph.model_io import atomic_write_text, ensure_writable_dir
from .verify import THRESHOLD_KEYS, Thresholds

log = logging.getLogger("converter")

NUMBER = schema.NUMBER
Key = schema.Key

# Schema rows (checked by converter/schema.py, the validator of config files too): one table per mapping level.
TOP_KEYS: dict[str, Key] = {
    "defaults": Key((dict,), "a mapping of QuantConfig keys"),
    "output_dir": Key((str,), "a folder path"),
    "timeout": Key(NUMBER, "seconds per job", low=0, open_low=True, fix="use seconds, e.g. 600"),
    "jobs": Key((list,), "a list of jobs"),
}
JOB_KEYS: dict[str, Key] = {
    "name": Key((str,), "a folder-safe job name"),
    "model": Key((str,), "an .onnx path or a PyTorch spec file.py:factory / package.module:factory"),
    "input_shape": Key((list,), "a list of positive integers, e.g. [1, 3, 224, 224]"),
    "calib": Key((str,), "a calibration data folder"),
    "calib_spec": Key((str,), "an image preprocessing spec file"),
    "config": Key((dict,), "a mapping of QuantConfig keys"),
    "search": Key((dict,), "a mapping of search keys (metric, eval, labels, max_drop, ...): the job runs the "
                           "accuracy search"),
    "verify": Key((dict, bool), "a mapping of verification settings, or true"),
    "timeout": Key(NUMBER, "seconds", low=0, open_low=True, fix="use seconds, e.g. 600"),
    "num_cpus": Key(NUMBER, "a number of CPUs (Ray may use fractions)"),
    "memory": Key(NUMBER + (str,), "bytes, or a size such as 4GiB"),
    "num_gpus": Key(NUMBER, "a number of GPUs"),
}
VERIFY_KEYS: dict[str, Key] = {
    "data": Key((str,), "a data folder (default: the job's calib folder)"),
    "data_spec": Key((str,), "an image preprocessing spec file"),
    "labels": Key((str,), "a .npy or text labels file"),
    **THRESHOLD_KEYS,  # min_cosine, min_agreement, max_top1_drop, min_sqnr: the rows Thresholds checks itself with
    "max_samples": Key((int,), "an integer", low=1, fix="use a positive integer"),
    "batch_size": Key((int,), "an integer", low=1, fix="use a positive integer"),
    "providers": Key((str,), "auto, or a list such as cuda,cpu"),
}
REQUIRED_JOB_KEYS = ("model", "calib")

# Worker exit codes (anything else, or no result.json, is a crash).
WORKER_OK, WORKER_CHECK_FAILED, WORKER_USER_ERROR, WORKER_INTERNAL_ERROR = 0, 1, 2, 3


# --- the job file -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VerifySpec:
    data: str
    data_spec: str | None = None
    labels: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_samples: int | None = None
    batch_size: int = 16
    providers: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "thresholds": self.thresholds.to_dict()}


@dataclass(frozen=True)
class Job:
    name: str
    model: str  # absolute .onnx path, or a PyTorch spec (file part made absolute)
    calib: str
    config: QuantConfig
    input_shape: tuple[int, ...] | None = None
    calib_spec: str | None = None
    verify: VerifySpec | None = None
    timeout: float | None = None
    resources: job_resources.Resources = field(default_factory=job_resources.Resources)

    @property
    def is_torch(self) -> bool:
        return self.input_shape is not None

    def data_fields(self) -> dict[tuple[str, ...], str]:
        """The job's data paths (calibration, verification), by their key path in :meth:`to_dict`."""
        fields = {("calib",): self.calib, ("calib_spec",): self.calib_spec}
        if self.verify:
            fields.update({("verify", "data"): self.verify.data, ("verify", "data_spec"): self.verify.data_spec,
                           ("verify", "labels"): self.verify.labels})
        return {k: v for k, v in fields.items() if v}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "calib": self.calib, "config": self.config.to_dict(),
                "input_shape": list(self.input_shape) if self.input_shape else None, "calib_spec": self.calib_spec,
                "verify": self.verify.to_dict() if self.verify else None, "timeout": self.timeout,
                "resources": self.resources.to_dict()}


@dataclass(frozen=True)
class JobFile:
    path: Path
    output_dir: Path
    jobs: list[Job]
    timeout: float | None = None  # the file's default per-job timeout


def load_job_file(path: str | Path) -> JobFile:
    """Read and validate a job file; raises :class:`ConfigError` naming the key, file and line."""
    path = Path(path)
    data, _ = load_mapping(path, "job file", "qconvert batch JOB_FILE")
    lines = _yaml_lines(path)
    where = _Where(str(path), lines)
    _check_keys(data, TOP_KEYS, (), where)
    if "jobs" not in data or not data["jobs"]:
        raise ConfigError(f"{path} has no jobs", "add a 'jobs:' list with one entry per model")
    base = path.resolve().parent
    defaults = dict(data.get("defaults") or {})
    default_resources = job_resources.parse({k: defaults.pop(k) for k in job_resources.KEYS if k in defaults},
                                            {k: where.at(("defaults", k)) for k in job_resources.KEYS})
    QuantConfig.from_dict(defaults, f"{path} (defaults)", _dotted_lines(lines, ("defaults",)), base)
    jobs = [_parse_job(item, i, defaults, default_resources, base, where) for i, item in enumerate(data["jobs"])]
    seen: dict[str, int] = {}
    for i, job in enumerate(jobs):
        if job.name in seen:
            raise ConfigError(f"job name {job.name!r} is used twice in {where.at(('jobs', i))} "
                              f"(also jobs[{seen[job.name]}])",
                              "give every job a unique 'name:'")
        seen[job.name] = i
    out = Path(data["output_dir"]) if "output_dir" in data else Path(f"{path.stem}-out")
    timeout = data.get("timeout")  # > 0: checked with TOP_KEYS
    return JobFile(path, out if out.is_absolute() else base / out, jobs, timeout)


class _Where:
    """Formats 'file, line N' for a key path such as ('jobs', 2, 'config', 'target')."""

    def __init__(self, source: str, lines: dict[tuple, int]) -> None:
        self.source, self.lines = source, lines

    def at(self, key_path: tuple) -> str:
        line = self.lines.get(key_path)
        return f"{self.source}, line {line}" if line else self.source


def _yaml_lines(path: Path) -> dict[tuple, int]:
    """Line number of every mapping key and list item, by key path (YAML only; JSON has none)."""
    if path.suffix.lower() == ".json":
        return {}
    out: dict[tuple, int] = {}

    def walk(node: yaml.Node, key_path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    out[key_path + (k.value,)] = k.start_mark.line + 1
                    walk(v, key_path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out[key_path + (i,)] = item.start_mark.line + 1
                walk(item, key_path + (i,))

    walk(yaml.compose(path.read_text(encoding="utf-8")), ())
    return out


def _dotted_lines(lines: dict[tuple, int], prefix: tuple) -> dict[str, int]:
    """The lines of the keys under ``prefix``, by dotted path below it (a config mapping's ``weights.bits``)."""
    n = len(prefix)
    return {".".join(map(str, k[n:])): v for k, v in lines.items() if k[:n] == prefix and len(k) > n
            and all(isinstance(p, str) for p in k[n:])}


def _dotted(key_path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else k) for i, k in enumerate(key_path))


# One spelling per concept (as on the command line): the job-file key a user writes -> the key read here. The
# internal names are the old spellings, which keep working.
KEY_ALIASES = {"image_spec": "calib_spec"}
VERIFY_KEY_ALIASES = {"eval": "data", "image_spec": "data_spec"}


def _canonical_keys(data: dict, aliases: dict[str, str], key_path: tuple, where: _Where) -> dict:
    """``data`` with each alias renamed to the key read here (its line kept); both spellings at once is an error."""
    out = dict(data)
    for new, old in aliases.items():
        if new in out:
            if old in out:
                raise ConfigError(f"{_dotted(key_path + (new,))!r} and {old!r} in {where.at(key_path + (new,))} are "
                                  "the same setting", f"keep only {new}")
            out[old] = out.pop(new)
            if key_path + (new,) in where.lines:
                where.lines[key_path + (old,)] = where.lines[key_path + (new,)]
    return out


def _check_keys(data: dict, table: dict[str, Key], key_path: tuple, where: _Where) -> None:
    schema.check(data, table, where.source, _dotted_lines(where.lines, key_path), prefix=_dotted(key_path))


def _parse_job(item: Any, i: int, defaults: dict, default_resources: dict, base: Path, where: _Where) -> Job:
    kp = ("jobs", i)
    if not isinstance(item, dict):
        raise ConfigError(f"jobs[{i}] in {where.at(kp)} must be a mapping (name, model, calib, ...), got {item!r}",
                          "write each job as '- name: ...' with its keys indented below")
    item = _canonical_keys(item, KEY_ALIASES, kp, where)
    _check_keys(item, JOB_KEYS, kp, where)
    for key in REQUIRED_JOB_KEYS:
        if key not in item:
            raise ConfigError(f"jobs[{i}] in {where.at(kp)} has no {key!r}", f"add '{key}: ...' to the job")
    model = _resolve_model(item["model"], base)
    name = item.get("name") or _default_name(model)
    if not name or name.startswith(".") or any(c in name for c in "/\\:") or name.strip() != name:
        raise ConfigError(f"job name {name!r} in {where.at(kp + ('name',))} cannot be used as a folder name",
                          "use letters, digits, '-', '_' and '.'")
    shape = _parse_shape(item.get("input_shape"), kp + ("input_shape",), where)
    if not _is_torch_spec(model) and shape is not None:
        raise ConfigError(f"jobs[{i}] ({name}) in {where.at(kp + ('input_shape',))}: input_shape is for PyTorch "
                          f"models, but {item['model']!r} is an ONNX file", "remove input_shape (ONNX models carry "
                          "their input shapes), or name a factory as file.py:function")
    if _is_torch_spec(model) and shape is None:
        raise ConfigError(f"jobs[{i}] ({name}) in {where.at(kp)}: the PyTorch model {item['model']!r} "
                          "needs input_shape",
                          "add e.g. 'input_shape: [1, 3, 224, 224]' (the example input for the export)")
    source = f"{where.source} (job {name!r})"
    config = QuantConfig.from_mappings(  # the defaults, then the job's config, then its search section
        [(defaults, source, _dotted_lines(where.lines, ("defaults",))),
         (item.get("config") or {}, source, _dotted_lines(where.lines, kp + ("config",))),
         ({"search": item["search"]} if "search" in item else {}, source, _dotted_lines(where.lines, kp))], base)
    if config.custom_op_libraries:  # relative to the job file, like every other path in it
        config = config.replace(custom_op_libraries=tuple(_abs(p, base) for p in config.custom_op_libraries))
    timeout = item.get("timeout")  # > 0: checked with JOB_KEYS
    job = Job(name=name, model=model, calib=_abs(item["calib"], base), config=config, input_shape=shape,
              calib_spec=_abs(item["calib_spec"], base) if item.get("calib_spec") else None,
              verify=_parse_verify(item.get("verify"), item, kp + ("verify",), base, where), timeout=timeout)
    given = {**default_resources,
             **job_resources.parse({k: item[k] for k in job_resources.KEYS if k in item},
                                   {k: f"{where.at(kp + (k,))} (job {name!r})" for k in job_resources.KEYS})}
    providers = [config.providers] + (job.verify.providers.lower().split(",") if job.verify else [])
    resources = job_resources.derive(given, model, job.is_torch, list(job.data_fields().values()), providers)
    return dataclasses.replace(job, resources=resources)


def _parse_verify(raw: Any, job: dict, kp: tuple, base: Path, where: _Where) -> VerifySpec | None:
    if raw is None or raw is False:
        return None
    raw = {} if raw is True else _canonical_keys(raw, VERIFY_KEY_ALIASES, kp, where)
    _check_keys(raw, VERIFY_KEYS, kp, where)
    limits = {k: raw[k] for k in ("min_cosine", "min_agreement", "max_top1_drop", "min_sqnr") if k in raw}
    if limits.get("max_top1_drop") is not None and "labels" not in raw:
        raise ConfigError(f"{_dotted(kp)}.max_top1_drop in {where.at(kp + ('max_top1_drop',))} needs labels",
                          "add 'labels: FILE' to verify, or remove max_top1_drop")
    data = raw.get("data", job["calib"])
    return VerifySpec(data=_abs(data, base), data_spec=_abs(raw["data_spec"], base) if "data_spec" in raw else None,
                      labels=_abs(raw["labels"], base) if "labels" in raw else None,
                      thresholds=Thresholds(**{k: v if v is None or isinstance(v, str) else float(v)
                                                 for k, v in limits.items()}),
                      max_samples=raw.get("max_samples"), batch_size=raw.get("batch_size", 16),
                      providers=raw.get("providers", "auto"))


def _default_name(model: str) -> str:
    if _is_torch_spec(model):
        target = model.rpartition(":")[0]
        return Path(target).stem if target.endswith(".py") else target.rpartition(".")[2]
    return Path(model).stem


def _parse_shape(raw: Any, kp: tuple, where: _Where) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if not raw or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in raw):
        raise ConfigError(f"{_dotted(kp)!r} in {where.at(kp)} must be a list of positive integers, got {raw!r}",
                          "write e.g. input_shape: [1, 3, 224, 224]")
    return tuple(raw)


def _is_torch_spec(model: str) -> bool:
    target, sep, attr = model.rpartition(":")
    return bool(sep and target and attr) and not model.lower().endswith(".onnx") and len(target) > 1


def _resolve_model(model: str, base: Path) -> str:
    if _is_torch_spec(model):
        target, _, attr = model.rpartition(":")
        return f"{_abs(target, base)}:{attr}" if target.endswith(".py") else model
    return _abs(model, base)


def _abs(p: str, base: Path) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (base / path))


# --- content hash for --resume -------------------------------------------------------------------------

def input_hash(job: Job) -> str:
    """SHA-256 over everything that decides a job's outputs (see the module docstring)."""
    h = hashlib.sha256()
    h.update(json.dumps(_hash_parts(job), sort_keys=True).encode())
    return h.hexdigest()


def _hash_parts(job: Job) -> dict[str, Any]:
    parts: dict[str, Any] = {"converter_version": __version__, "config": job.config.to_dict(),
                             "calib": _tree_digest(job.calib), "calib_spec": _file_digest(job.calib_spec)}
    if job.is_torch:
        target = job.model.rpartition(":")[0]
        parts["model"] = {"spec": job.model, "input_shape": list(job.input_shape or ()),
                          "source": _file_digest(target if target.endswith(".py") else _module_origin(target))}
    else:
        parts["model"] = _file_digest(job.model)
    if job.verify:
        v = job.verify
        parts["verify"] = {**v.to_dict(), "data": _tree_digest(v.data), "data_spec": _file_digest(v.data_spec),
                           "labels": _file_digest(v.labels)}
    return parts


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return f"missing:{p}"
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(path: str) -> Any:
    p = Path(path)
    if not p.is_dir():
        return _file_digest(path)
    return {child.name: _file_digest(str(child)) for child in sorted(p.iterdir()) if child.is_file()}


def _module_origin(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec and spec.origin and spec.origin.endswith(".py") else None


# --- results -------------------------------------------------------------------------------------------

@dataclass
class JobResult:
    """One job's outcome, as written to ``job.json`` and one row of the summary."""

    name: str
    status: str  # "ok" | "failed" | "skipped"
    stage: str = ""  # where it failed: export, quantize, verify, worker (crash), timeout, resources (not started)
    error: str = ""
    fix: str = ""
    note: str = ""  # something a successful job's user should know
    seconds: float = 0.0
    input_hash: str = ""
    returncode: int | None = None
    started_at: str = ""
    finished_at: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    quantize: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    # a job with a search section: met, float_layers, baseline_metric, final_metric, threshold, latency_vs_fp32
    search: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"converter_version": __version__, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class BatchResult:
    job_file: Path
    output_dir: Path
    results: list[JobResult]
    seconds: float
    hash_seconds: float = 0.0  # computing the input hashes (all that a skipped job costs)

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        return EXIT_CHECK_FAILED if self.failed else 0


# --- running -------------------------------------------------------------------------------------------

def run_batch(job_file: str | Path, jobs: int = 1, resume: bool = False, timeout: float | None = None,
              output_dir: str | Path | None = None, executor: Any = "local",
              address: str | None = None, ray_data: str = "auto") -> BatchResult:
    """Run every job of ``job_file`` with up to ``jobs`` workers at once; write the summary files.

    ``executor``: ``"local"`` (child processes), ``"ray"`` (Ray tasks; ``address`` of a cluster, else a
    local Ray; ``ray_data``: auto | copy), or an executor object the caller made and closes (see
    :mod:`converter.executors`)."""
    from .executors import make_executor

    spec = load_job_file(job_file)
    out_dir = ensure_writable_dir(Path(output_dir) if output_dir else spec.output_dir)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}", "use e.g. --jobs 2")
    runner = make_executor(executor, address, data=ray_data)
    try:
        return _run_jobs(spec, out_dir, jobs, resume, timeout, runner)
    finally:
        if runner is not executor:
            runner.close()


def _run_jobs(spec: JobFile, out_dir: Path, jobs: int, resume: bool, timeout: float | None, runner) -> BatchResult:
    _remove_stale(out_dir)
    t0 = time.perf_counter()
    results: dict[str, JobResult] = {}
    pending: list[tuple[Job, str]] = []
    t_hash = time.perf_counter()
    for job in spec.jobs:
        digest = input_hash(job)
        previous = _previous_result(out_dir / job.name) if resume else None
        if previous and previous.status == "ok" and previous.input_hash == digest \
                and all((out_dir / job.name / p).is_file() for p in previous.outputs.values()):
            log.info("%s: unchanged since the successful run of %s, skipped", job.name, previous.finished_at)
            results[job.name] = dataclasses.replace(previous, status="skipped", seconds=0.0)
        else:
            pending.append((job, digest))
    hash_s = time.perf_counter() - t_hash
    log.info("hashed the inputs of %d jobs in %.2f s; %d to run", len(spec.jobs), hash_s, len(pending))
    default_timeout = timeout if timeout is not None else spec.timeout
    for r in _Scheduler(pending, out_dir, jobs, default_timeout, spec.path.resolve().parent, len(results),
                        runner).run():
        results[r.name] = r
    ordered = [results[j.name] for j in spec.jobs]
    batch = BatchResult(spec.path, out_dir, ordered, time.perf_counter() - t0, hash_s)
    write_summary(batch)
    return batch


def _remove_stale(out_dir: Path) -> None:
    """Staging/old folders left by a batch process that died (its pid is the folder name's suffix)."""
    for p in [*out_dir.glob(".staging-*"), *out_dir.glob(".old-*")]:
        pid = p.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s (left by an interrupted batch)", p)
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _previous_result(job_dir: Path) -> JobResult | None:
    try:
        return JobResult.from_dict(json.loads((job_dir / "job.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


@dataclass
class _Running:
    job: Job
    digest: str
    staging: Path
    proc: Any  # subprocess.Popen, or an executors.RayProc
    log_file: Any
    started: float
    started_at: str
    deadline: float | None


class _Scheduler:
    """Keeps up to ``width`` worker processes busy; finalizes each job as its process ends."""

    POLL_S = 0.05

    def __init__(self, pending: list[tuple[Job, str]], out_dir: Path, width: int, timeout: float | None,
                 job_file_dir: Path, done_already: int, runner: Any) -> None:
        self.runner = runner  # converter.executors: LocalExecutor or RayExecutor
        self.queue = list(pending)
        self.out_dir, self.width, self.timeout, self.job_file_dir = out_dir, width, timeout, job_file_dir
        self.done_already = done_already

    def run(self) -> list[JobResult]:
        from .progress import tqdm

        finished: list[JobResult] = []
        running: list[_Running] = []
        total = len(self.queue) + self.done_already
        with tqdm(total=total, initial=self.done_already, desc="batch", unit="job", disable=None) as bar:
            try:
                while self.queue or running:
                    while self.queue and len(running) < self.width:
                        # the first queued job the executor has room for (Ray: the cluster's free resources)
                        i = next((i for i, (job, _) in enumerate(self.queue)
                                  if self.runner.fits(job.resources)), None)
                        if i is None:
                            break
                        running.append(self._start(*self.queue.pop(i)))
                    if self.queue and not running:  # nothing runs, and nothing queued fits: it never will
                        result = self._unstartable(*self.queue.pop(0))
                        finished.append(result)
                        bar.update(1)
                        log.info("%s: failed (%s)", result.name, result.error)
                        continue
                    bar.set_postfix_str(", ".join(r.job.name for r in running), refresh=False)
                    for r in [r for r in running if self._ended(r)]:
                        running.remove(r)
                        result = self._finish(r)
                        finished.append(result)
                        bar.update(1)
                        log.info("%s: %s in %.1f s%s", result.name, result.status, result.seconds,
                                 f" ({result.stage}: {result.error})" if result.error else "")
                    time.sleep(self.POLL_S)
            except BaseException:
                for r in running:  # Ctrl-C or a bug here: leave no orphan workers behind
                    self.runner.kill(r.proc)
                    r.log_file.close()
                    shutil.rmtree(r.staging, ignore_errors=True)
                raise
        return finished

    def _start(self, job: Job, digest: str) -> _Running:
        staging = self.out_dir / f".staging-{job.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / "worker.json").write_text(json.dumps(job.to_dict(), indent=2), encoding="utf-8")
        log_file = open(staging / "job.log", "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(job.config.threads or job.resources.threads),  # the job's CPUs
               "PYTHONPATH": os.pathsep.join(p for p in (str(self.job_file_dir), os.getcwd(),
                                                         os.environ.get("PYTHONPATH", "")) if p)}
        proc = self.runner.start(job, staging, env, log_file)
        limit = job.timeout if job.timeout is not None else self.timeout
        now = time.perf_counter()
        return _Running(job, digest, staging, proc, log_file, now, _now(), now + limit if limit else None)

    def _unstartable(self, job: Job, digest: str) -> JobResult:
        """A job larger than anything the executor has (Ray: the cluster's largest node), not started."""
        why = self.runner.infeasible(job.resources) or "the executor has no room for it"
        result = JobResult(job.name, "failed", "resources", f"not started: it asks for {job.resources.describe()}; "
                           f"{why}", "lower the job's num_cpus / memory / num_gpus, or add a larger node",
                           input_hash=digest, started_at=_now(), finished_at=_now())
        staging = self.out_dir / f".staging-{job.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        atomic_write_text(staging / "job.json", json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
        _publish(staging, self.out_dir / job.name)
        return result

    def _ended(self, r: _Running) -> bool:
        if r.proc.poll() is not None:
            return True
        if r.deadline is not None and time.perf_counter() > r.deadline:
            self.runner.kill(r.proc)
            r.proc.timed_out = True  # type: ignore[attr-defined]
            return True
        return False

    def _finish(self, r: _Running) -> JobResult:
        r.log_file.close()
        result = _classify(r)
        result.name, result.input_hash = r.job.name, r.digest
        result.started_at, result.finished_at = r.started_at, _now()
        result.seconds = round(time.perf_counter() - r.started, 3)
        result.returncode = r.proc.returncode
        atomic_write_text(r.staging / "job.json", json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
        (r.staging / "worker.json").unlink(missing_ok=True)
        (r.staging / "result.json").unlink(missing_ok=True)
        _publish(r.staging, self.out_dir / r.job.name)
        return result


def _classify(r: _Running) -> JobResult:
    """The job's outcome: the worker's own result.json, or what its exit says about it."""
    if getattr(r.proc, "timed_out", False):
        limit = r.deadline - r.started if r.deadline else 0
        return JobResult(r.job.name, "failed", "timeout", f"timed out after {limit:g} s (worker killed)",
                         "raise 'timeout:' for this job, or check why it hangs (see job.log)")
    try:
        data = json.loads((r.staging / "result.json").read_text(encoding="utf-8"))
        return JobResult.from_dict(data)
    except (OSError, ValueError):
        pass
    rc = r.proc.returncode
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        why = f"worker killed by {sig}" + (" (out of memory? the kernel's OOM killer sends SIGKILL)"
                                           if -rc == signal.SIGKILL else "")
    else:
        why = f"worker exited with code {rc} without a result"
    tail = _log_tail(r.staging / "job.log")
    return JobResult(r.job.name, "failed", "worker", why + (f"; last log line: {tail}" if tail else ""),
                     "see job.log in the job's folder; the other jobs are not affected")


def _log_tail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _publish(staging: Path, final: Path) -> None:
    """Swap ``staging`` into ``final`` (see the module docstring)."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --- summary -------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ("job", "status", "stage", "seconds", "quantized", "float_nodes", "cosine", "agreement",
                   "acc_float", "acc_quant", "search_met", "float_layers", "final_metric", "latency_vs_fp32", "reason")


def summary_rows(batch: BatchResult) -> list[dict[str, Any]]:
    rows = []
    for r in batch.results:
        q, v = r.quantize or {}, r.verify or {}
        rows.append({
            "job": r.name, "status": r.status, "stage": r.stage, "seconds": r.seconds,
            "quantized": q.get("quantized", ""), "float_nodes": q.get("float_nodes", ""),
            "cosine": v.get("min_cosine", ""), "agreement": v.get("min_agreement", ""),
            "acc_float": v.get("acc_float", ""), "acc_quant": v.get("acc_quant", ""),
            "search_met": r.search.get("met", ""), "float_layers": len(r.search["float_layers"]) if r.search else "",
            "final_metric": r.search.get("final_metric", ""),
            "latency_vs_fp32": r.search.get("latency_vs_fp32", "") if r.search else "",
            "reason": r.error or r.note,
        })
    return rows


def write_summary(batch: BatchResult) -> None:
    rows = summary_rows(batch)
    data = {"converter_version": __version__, "job_file": str(batch.job_file), "output_dir": str(batch.output_dir),
            "seconds": round(batch.seconds, 3), "hash_seconds": round(batch.hash_seconds, 3),
            "counts": {s: sum(r.status == s for r in batch.results) for s in ("ok", "skipped", "failed")},
            "exit_code": batch.exit_code, "jobs": [r.to_dict() for r in batch.results]}
    atomic_write_text(batch.output_dir / "summary.json", json.dumps(data, indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(batch.output_dir / "summary.csv", buf.getvalue())


def format_summary(batch: BatchResult) -> str:
    rows = summary_rows(batch)
    header = ("job", "status", "time s", "quantized a/w/b", "float nodes", "cosine", "top-1 agree", "acc f -> q",
              "search", "reason")
    body = []
    for row in rows:
        acc = f"{row['acc_float'] * 100:.1f}% -> {row['acc_quant'] * 100:.1f}%" if row["acc_float"] != "" else ""
        status = row["status"] + (f" ({row['stage']})" if row["stage"] and row["status"] == "failed" else "")
        body.append((row["job"], status, f"{row['seconds']:.1f}", str(row["quantized"]), str(row["float_nodes"]),
                     _num(row["cosine"], ".4f"), _num(row["agreement"], ".2%"), acc, _search_cell(row),
                     _short(row["reason"])))
    widths = [max(len(x[i]) for x in (header, *body)) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    n_ok = sum(r.status == "ok" for r in batch.results)
    n_skip = sum(r.status == "skipped" for r in batch.results)
    lines = [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, body), "",
             f"{len(batch.results)} jobs: {n_ok} ok, {n_skip} skipped (unchanged), {len(batch.failed)} failed "
             f"in {batch.seconds:.1f} s (input hashes {batch.hash_seconds:.2f} s); "
             f"summary: {batch.output_dir / 'summary.json'}, summary.csv"]
    lines.append("PASSED" if not batch.failed else "FAILED: " + ", ".join(r.name for r in batch.failed))
    return "\n".join(lines)


def _search_cell(row: dict[str, Any]) -> str:
    """``met, 1 float, 0.9850, 0.62x`` for a job that ran the search; empty otherwise."""
    if row["search_met"] == "":
        return ""
    lat = f", {row['latency_vs_fp32']:.2f}x" if isinstance(row["latency_vs_fp32"], (int, float)) else ""
    return (f"{'met' if row['search_met'] else 'NOT met'}, {row['float_layers']} float, "
            f"{row['final_metric']:.4f}{lat}")


def _num(v: Any, spec: str) -> str:
    return "" if v == "" or v is None else format(v, spec)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- the worker (runs in its own process) ---------------------------------------------------------------

def _work(spec: dict[str, Any], stage: list[str]) -> JobResult:
    """Export (PyTorch specs) -> quantize (or the accuracy search, for a job with a search section) -> verify, in
    the current folder (the staging folder)."""
    from .search import TargetNotMetError, quantize_with_search

    name = spec["name"]
    threads = spec["resources"]["threads"]  # the job's CPUs, unless its config sets threads itself
    config = QuantConfig(**{**spec["config"], "threads": spec["config"]["threads"] or threads})  # validated already
    model = spec["model"]
    outputs: dict[str, str] = {}
    if spec["input_shape"]:
        stage[0] = "export"
        import torch

        from .export import build_module, export_torch

        model = f"{name}.float.onnx"
        export_torch(build_module(spec["model"]), torch.zeros(spec["input_shape"]), model)
        outputs["float_model"] = model
    stage[0] = "quantize" if config.search is None else "search"
    try:
        q = quantize_with_search(model, spec["calib"], config, output_dir=".", name=name,
                                 calib_spec=spec["calib_spec"])
    except TargetNotMetError as exc:  # the best model and its report were written: the row says what was reached
        report = json.loads(Path(f"{name}.report.json").read_text(encoding="utf-8"))
        outputs.update({k: Path(v).name for k, v in report["outputs"].items()})
        return JobResult(name, "failed", "search", exc.message.split("\n")[0], exc.fix or "", outputs=outputs,
                         search=_search_brief(report["search"]))
    except SlowerThanFloatError as exc:  # written, and marked in its report (latency_gate): a failed job keeps them
        outputs.update({k: Path(v).name for k, v in exc.result.report["outputs"].items()})
        return JobResult(name, "failed", "quantize", exc.message, exc.fix or "", outputs=outputs)
    outputs.update(model=q.model_path.name, encodings=q.encodings_path.name, report=q.report_path.name)
    s = q.report["summary"]["quantized_tensors"]
    result = JobResult(name, "ok", outputs=outputs, quantize={
        "quantized": f"{s['activation']}/{s['weight']}/{s['bias']}",
        "float_nodes": len(q.report["summary"]["float_nodes"]),
        "calibration_samples": q.report["calibration"]["samples"],
        "seconds": q.report["timings"]["total_s"]})
    if config.search is not None:
        result.search = _search_brief(q.report["search"])
    if not any(s.values()):
        result.note = (f"nothing was quantized ({result.quantize['float_nodes']} node(s) left in float): "
                       "the output model computes the same as the float one")
    if spec["verify"]:
        stage[0] = "verify"
        result.verify, passed, summary = _verify(spec["verify"], model, q.model_path, name, config.threads)
        outputs["verify"] = f"{name}.verify.json"
        if not passed:
            result.status, result.stage, result.error = "failed", "verify", summary
            result.fix = "see the verify table in job.log; loosen the thresholds or change the config"
    return result


def _search_brief(search: dict[str, Any]) -> dict[str, Any]:
    """The search's outcome for job.json and the summary row (report: search)."""
    lat = search.get("latency") or {}
    return {"met": bool(search["met"]), "float_layers": [x["name"] for x in search["fallback_layers"]],
            "fallback": search["fallback"], "baseline_metric": search["baseline_metric"],
            "final_metric": search["final_metric"], "threshold": search["threshold"],
            "latency_vs_fp32": lat.get("final_vs_fp32"), "stop_reason": search.get("stop_reason")}


def _verify(v: dict[str, Any], float_model: str, quant_model: Path, name: str,
            threads: int) -> tuple[dict, bool, str]:
    from .verify import format_report, verify

    res = verify(float_model, quant_model, v["data"], labels=v["labels"], thresholds=Thresholds(**v["thresholds"]),
                 providers=v["providers"], batch_size=v["batch_size"], max_samples=v["max_samples"],
                 data_spec=v["data_spec"], threads=threads)
    res.write_json(f"{name}.verify.json")
    print(format_report(res), flush=True)
    outs = res.metrics["outputs"].values()
    agreements = [c.measured for c in res.checks if c.name.startswith("top1_agreement[")]  # checked outputs only
    agreements = agreements or [o["top1_agreement"] for o in outs if o["top1_agreement"] is not None]  # labels: not gated
    acc = res.metrics["accuracy"] or {}
    brief = {"passed": res.passed, "summary": res.summary, "samples": res.metrics["samples"],
             "min_cosine": min(o["cosine_mean"] for o in outs),
             "min_agreement": min(agreements) if agreements else None,
             "acc_float": acc.get("float"), "acc_quant": acc.get("quant")}
    return {k: v for k, v in brief.items() if v is not None}, res.passed, res.summary


def _worker_main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="converter: %(message)s", stream=sys.stderr)
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    stage = ["load"]
    try:
        result = _work(spec, stage)
        code = WORKER_OK if result.status == "ok" else WORKER_CHECK_FAILED
    except UserError as exc:
        result = JobResult(spec["name"], "failed", stage[0], exc.message, exc.fix or "")
        code = WORKER_USER_ERROR
        print(f"error: {exc.message}\n  fix: {exc.fix}", file=sys.stderr)
    except Exception as exc:  # a converter bug on this model: report it, do not hide it
        import traceback

        traceback.print_exc()
        result = JobResult(spec["name"], "failed", stage[0], f"internal error: {type(exc).__name__}: {exc}",
                           "this is a converter bug; job.log has the traceback")
        code = WORKER_INTERNAL_ERROR
    atomic_write_text("result.json", json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n")
    return code


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars in report figures
        return o.item()
    raise TypeError(type(o).__name__)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
