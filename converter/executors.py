"""Where batch workers run: local processes (default) or Ray tasks.

Both run the same worker (``python -m converter.batch worker.json``, cwd = the job's staging
folder, output -> ``job.log``) and hand the scheduler in :mod:`converter.batch` a handle that
behaves like :class:`subprocess.Popen` (``poll()``, ``returncode``, :func:`kill`), so staging,
atomic publishing, classification of crashes, timeouts, the summary, resume and exit codes are the
same code for both. Every executor gives a job ``OMP_NUM_THREADS`` and ONNX Runtime intra-op threads
= its ``num_cpus`` (rounded up; :mod:`converter.resources`), so both compute the same bytes.

``local``
    a child process per job (``start_new_session``: a timeout kills its whole process group). It
    honours ``num_cpus`` (threads) and ignores ``memory`` / ``num_gpus`` (a warning says so once);
    ``--jobs`` alone bounds what runs at once.
``ray``
    one Ray task per job with the job's ``num_cpus`` / ``memory`` / ``num_gpus``, which runs the
    worker as a child process on its node, so outputs land where the job file says (paths are
    passed, not models: the output folder must be on storage every node sees). A worker killed by
    a signal (its process killed, the OOM killer) is started again up to ``retries`` times inside
    the task; a Ray worker that dies is retried by Ray (``max_retries``). Without ``--address`` a
    local Ray is started with the machine's CPUs (``ray.init(num_cpus=...)``). Ray is an optional
    extra (``pip install .[ray]``).

Back-pressure (Ray). A job is submitted only when (1) fewer than ``--jobs`` tasks of this batch are
in flight and (2) its resources fit in the cluster's total CPUs / memory / GPUs (over the alive
nodes, refreshed every :data:`RayExecutor.REFRESH_S` seconds) minus what this batch's tasks in
flight hold. So the batch never queues more tasks in Ray than the cluster can run at once (load from
other drivers is Ray's queue's business); a job that fits no single node fails at once, stage
``resources``, instead of waiting forever in Ray's queue; the scheduler starts the first queued job
that fits, so one large job does not hold back smaller ones behind it.

Shared data (Ray). Calibration and verification data (files or folders: ``calib``, ``calib_spec``,
``verify.data``, ``verify.labels``, ``verify.data_spec``) go into Ray's object store once per
content, not once per job: the driver reads each distinct path the first time a job needs it,
keys it by SHA-256 over its files' names and bytes, and ``ray.put``\\s ``{file name: bytes}`` (a
folder's top-level files, what calibration reads; or the one file); a second path with the same
bytes reuses the object. A task gets the reference nested in a list, so Ray does not fetch it up
front. On its node the task checks whether the path is visible there (it exists with the same file
names and sizes): then the worker reads the path itself and the object is never fetched (the usual
case on one machine or a shared file system). Otherwise it fetches the object once per node and
digest into a node-local cache, ``$CONVERTER_DATA_CACHE`` or ``<tmp>/converter-data/<digest>/<name>``
(written to a temporary folder, renamed into place: concurrent tasks on a node never see half a
copy; content-addressed, so later batches reuse it), rewrites those paths in its ``worker.json``
and notes it in ``job.log``. The folder keeps its name and files, so calibration reads the same
samples in the same order and the outputs are the same bytes. ``--ray-data copy``
(``RayExecutor(data="copy")``) materializes even visible paths (storage that is slow to read from
many nodes; and how the tests and tools/batch_executors.py exercise the copy on one machine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, UserError
from .resources import Resources, format_bytes

log = logging.getLogger("converter")

EXECUTORS = ("local", "ray")
WORKER_CMD = [sys.executable, "-m", "converter.batch", "worker.json"]
DATA_MODES = ("auto", "copy")


def make_executor(name: Any = "local", address: str | None = None, retries: int = 2, data: str = "auto"):
    """An executor by name; an executor object passes through (its caller closes it)."""
    if not isinstance(name, str):
        return name
    if name == "local":
        if address:
            raise ConfigError("--address is for --executor ray", "drop --address, or add --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, retries, data)
    raise ConfigError(f"unknown executor {name!r}", f"use one of: {', '.join(EXECUTORS)}")


def popen_worker(staging: str | Path, env: dict[str, str], log_file: Any) -> subprocess.Popen:
    """The batch worker in ``staging``, in a process group of its own (so a kill takes its children too)."""
    return subprocess.Popen(WORKER_CMD, cwd=staging, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)


class LocalExecutor:
    name = "local"

    def __init__(self) -> None:
        self._warned = False

    def start(self, job: Any, staging: Path, env: dict[str, str], log_file: Any) -> subprocess.Popen:
        ignored = [k for k in ("memory", "num_gpus") if k in job.resources.given]
        if ignored and not self._warned:
            self._warned = True
            log.warning("the local executor ignores %s (job %s and any other): they are Ray resources "
                        "(--executor ray); num_cpus sets each job's threads", " and ".join(ignored), job.name)
        return popen_worker(staging, env, log_file)

    def fits(self, resources: Resources) -> bool:
        return True  # --jobs bounds the local pool

    def infeasible(self, resources: Resources) -> str | None:
        return None

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """Stop the worker's process group and wait for it."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def close(self) -> None:
        pass


# --- shared data: packed once by the driver, materialized by a task where its path is not visible --------

def pack_data(path: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(info, blobs) of a data file or folder: info = path, digest, is_dir, files [(name, size)]."""
    p = Path(path)
    files = sorted(c for c in p.iterdir() if c.is_file()) if p.is_dir() else [p]
    blobs = {f.name: f.read_bytes() for f in files}
    h = hashlib.sha256()
    for name, data in blobs.items():
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    info = {"path": str(path), "digest": h.hexdigest(), "is_dir": p.is_dir(),
            "files": [(name, len(data)) for name, data in blobs.items()]}
    return info, blobs


def visible(path: str | Path, info: dict[str, Any]) -> bool:
    """Whether ``path`` holds what ``info`` describes (the same file names and sizes)."""
    p = Path(path)
    try:
        if info["is_dir"]:
            return p.is_dir() and all((p / name).stat().st_size == size for name, size in info["files"])
        return p.is_file() and p.stat().st_size == info["files"][0][1]
    except OSError:
        return False


def data_cache() -> Path:
    return Path(os.environ.get("CONVERTER_DATA_CACHE") or Path(tempfile.gettempdir()) / "converter-data")


def materialize(info: dict[str, Any], fetch: Callable[[], dict[str, bytes]], copy: bool = False,
                cache: Path | None = None) -> str:
    """The path a worker on this node reads: ``info['path']`` where visible (unless ``copy``), else the
    node-local copy ``<cache>/<digest>/<name>``, written from ``fetch()`` the first time."""
    if not copy and visible(info["path"], info):
        return info["path"]
    root = (cache or data_cache()) / info["digest"]
    target = root / Path(info["path"]).name
    if visible(target, info):
        return str(target)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{info['digest'][:16]}-", dir=root.parent))
    try:
        blobs = fetch()
        folder = tmp / target.name if info["is_dir"] else tmp
        folder.mkdir(exist_ok=True)
        for name, data in blobs.items():
            (folder / (name if info["is_dir"] else target.name)).write_bytes(data)
        if root.exists() and not visible(target, info):
            shutil.rmtree(root, ignore_errors=True)  # a damaged copy
        try:
            os.rename(tmp, root)
        except OSError:  # another task on this node was first: its copy is complete (rename is atomic)
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _localize(staging: str, data: list[tuple[list[str], dict[str, Any]]], copy: bool,
              cache: str | None = None) -> list[str]:
    """On the task's node: point ``worker.json``'s data paths at copies where the paths are not visible."""
    import ray

    spec_path = Path(staging) / "worker.json"
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    notes = []
    for keys, info in data:
        local = materialize(info, lambda info=info: ray.get(info["ref"][0]), copy, Path(cache) if cache else None)
        if local != info["path"]:
            parent = spec
            for k in keys[:-1]:
                parent = parent[k]
            parent[keys[-1]] = local
            notes.append(f"converter: {'.'.join(keys)} {info['path']} read from Ray's object store copy {local}")
    if notes:
        spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return notes


# --- Ray --------------------------------------------------------------------------------------------------

class RayProc:
    """A Ray task running one worker, with the parts of the Popen interface the scheduler uses."""

    def __init__(self, ray: Any, ref: Any, resources: Resources) -> None:
        self._ray, self.ref, self.resources, self.returncode, self.pid = ray, ref, resources, None, None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _ = self._ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    self.returncode = int(self._ray.get(self.ref))
                except Exception:  # the task failed past its retries (its Ray worker died)
                    self.returncode = -int(signal.SIGKILL)
        return self.returncode

    def wait(self) -> int:
        while self.poll() is None:
            self._ray.wait([self.ref], timeout=1.0)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.returncode is None:
            try:
                self._ray.cancel(self.ref, force=True)
            except Exception:
                pass
            self.returncode = -int(signal.SIGKILL)


def _run_worker(staging: str, env: dict[str, str], retries: int, data: list, copy: bool,
                cache: str | None) -> int:
    """On a Ray worker: localize the job's data, run the batch worker in ``staging``; start it again if a
    signal killed it."""
    rc = 0
    notes = _localize(staging, data, copy, cache)
    for attempt in range(retries + 1):
        with open(Path(staging) / "job.log", "ab") as log_file:
            if notes and not attempt:
                log_file.write(("\n".join(notes) + "\n").encode())
            if attempt:
                log_file.write(f"converter: worker killed (exit {rc}); retry {attempt} of {retries}\n".encode())
            log_file.flush()
            rc = popen_worker(staging, env, log_file).wait()
        if rc >= 0:
            break
    return rc


def init_ray(address: str | None = None) -> Any:
    """``ray.init`` for the batch: ``address``'s cluster, else a local Ray with this machine's CPUs whose
    workers import converter from where this process does. Returns the ``ray`` module."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray, which is not installed",
                        "pip install '.[ray]' (or pip install 'ray>=2.10'), or use --executor local") from None
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")) if p)
            ray.init(num_cpus=os.cpu_count() or 1, log_to_driver=False, include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
    except Exception as exc:
        raise UserError(f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                        "check --address (ray status on the head node shows it), or drop it to start a "
                        "local Ray") from None
    return ray


class RayExecutor:
    name = "ray"
    REFRESH_S = 10.0  # how often the cluster's resources are read again (nodes come and go)

    def __init__(self, address: str | None = None, retries: int = 2, data: str = "auto",
                 cache: str | Path | None = None) -> None:
        """``cache``: the node-local folder for data copies (default: :func:`data_cache` on each node)."""
        if data not in DATA_MODES:
            raise ConfigError(f"unknown data mode {data!r}", f"use one of: {', '.join(DATA_MODES)}")
        try:
            import ray
        except ImportError:
            ray = None
        self._started = ray is None or not ray.is_initialized()
        self.ray = init_ray(address) if self._started else ray
        self.retries, self.copy, self.cache = retries, data == "copy", str(cache) if cache else None
        self._task = self.ray.remote(max_retries=retries)(_run_worker)
        self._data: dict[str, dict[str, Any]] = {}  # path -> info with its object ref
        self._by_digest: dict[str, list] = {}  # digest -> [ObjectRef]
        self.puts = 0  # objects put in the object store (one per distinct data content)
        self.put_bytes = 0
        self.data_uses = 0  # data paths passed to tasks
        self._procs: list[RayProc] = []
        self._nodes: list[dict[str, float]] = []
        self._nodes_at = -1e9

    # resources and back-pressure
    def _node_resources(self) -> list[dict[str, float]]:
        if time.monotonic() - self._nodes_at > self.REFRESH_S:
            self._nodes = [{k: float(n["Resources"].get(k, 0.0)) for k in ("CPU", "memory", "GPU")}
                           for n in self.ray.nodes() if n.get("Alive")]
            self._nodes_at = time.monotonic()
        return self._nodes

    @staticmethod
    def _need(r: Resources) -> dict[str, float]:
        return {"CPU": r.num_cpus, "memory": float(r.memory), "GPU": r.num_gpus}

    def infeasible(self, resources: Resources) -> str | None:
        """Why no node of the cluster can ever run a task with ``resources``; None when one can."""
        need, nodes = self._need(resources), self._node_resources()
        if any(all(n[k] >= v for k, v in need.items()) for n in nodes):
            return None
        best = ", ".join(f"{n['CPU']:g} CPU, {format_bytes(n['memory'])}, {n['GPU']:g} GPU" for n in nodes)
        return f"no node of the Ray cluster has that much (nodes: {best or 'none alive'})"

    def fits(self, resources: Resources) -> bool:
        """Whether the cluster has room for ``resources`` beside this batch's tasks in flight."""
        if self.infeasible(resources):
            return False
        self._procs = [p for p in self._procs if p.returncode is None]
        need = self._need(resources)
        for k, v in need.items():
            held = sum(self._need(p.resources)[k] for p in self._procs)
            if held + v > sum(n[k] for n in self._node_resources()) + 1e-9:
                return False
        return True

    # shared data
    def _shared(self, path: str) -> dict[str, Any]:
        if path not in self._data:
            info, blobs = pack_data(path)
            ref = self._by_digest.get(info["digest"])
            if ref is None:
                ref = self._by_digest[info["digest"]] = [self.ray.put(blobs)]
                self.puts += 1
                self.put_bytes += sum(len(b) for b in blobs.values())
            self._data[path] = {**info, "ref": ref}
        return self._data[path]

    def start(self, job: Any, staging: Path, env: dict[str, str], log_file: Any) -> RayProc:
        log_file.close()  # the task appends to job.log itself, on its node
        data = []
        for keys, path in job.data_fields().items():
            try:
                data.append((list(keys), self._shared(path)))
            except OSError as exc:  # missing or unreadable here: the worker reads the path and names the problem
                log.debug("%s: %s not put in the object store: %s", job.name, path, exc)
        self.data_uses += len(data)
        r = job.resources
        task = self._task.options(num_cpus=r.num_cpus, memory=r.memory, num_gpus=r.num_gpus)
        proc = RayProc(self.ray, task.remote(str(staging.resolve()), env, self.retries, data, self.copy, self.cache), r)
        self._procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: RayProc) -> None:
        proc.kill()

    def close(self) -> None:
        if self._data:
            log.info("Ray object store: %d object(s), %s, for %d data path(s) used %d time(s) by the jobs",
                     self.puts, format_bytes(self.put_bytes), len(self._data), self.data_uses)
        self._data.clear()
        self._by_digest.clear()
        if self._started:
            self.ray.shutdown()
