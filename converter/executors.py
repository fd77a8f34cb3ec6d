"""Where batch workers run: local processes (default) or Ray tasks.

Both run the same worker (``python -m converter.batch worker.json``, cwd = the job's staging
folder, output -> ``job.log``) and hand the scheduler in :mod:`converter.batch` a handle that
behaves like :class:`subprocess.Popen` (``poll()``, ``returncode``, :func:`kill`), so staging,
atomic publishing, classification of crashes, timeouts, the summary, resume and exit codes are the
same code for both.

``local``
    a child process per job (``start_new_session``: a timeout kills its whole process group).
``ray``
    one Ray task per job (``num_cpus`` = 1, ONNX Runtime / OpenMP threads set to it), which runs
    the worker as a child process on its node, so outputs land where the job file says (paths are
    passed, not models: the output folder must be on storage every node sees). A worker killed by
    a signal (its process killed, the OOM killer) is started again up to ``retries`` times inside
    the task; a Ray worker that dies is retried by Ray (``max_retries``). Back-pressure: the
    scheduler keeps at most ``--jobs`` tasks in flight. Without ``--address`` a local Ray is started
    with the machine's CPUs (``ray.init(num_cpus=...)``). Ray is an optional extra
    (``pip install .[ray]``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, UserError

EXECUTORS = ("local", "ray")
WORKER_CMD = [sys.executable, "-m", "converter.batch", "worker.json"]


def make_executor(name: str = "local", address: str | None = None, retries: int = 2):
    if name == "local":
        if address:
            raise ConfigError("--address is for --executor ray", "drop --address, or add --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, retries)
    raise ConfigError(f"unknown executor {name!r}", f"use one of: {', '.join(EXECUTORS)}")


def popen_worker(staging: str | Path, env: dict[str, str], log_file: Any) -> subprocess.Popen:
    """The batch worker in ``staging``, in a process group of its own (so a kill takes its children too)."""
    return subprocess.Popen(WORKER_CMD, cwd=staging, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)


class LocalExecutor:
    name = "local"

    def start(self, staging: Path, env: dict[str, str], log_file: Any) -> subprocess.Popen:
        return popen_worker(staging, env, log_file)

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


class RayProc:
    """A Ray task running one worker, with the parts of the Popen interface the scheduler uses."""

    def __init__(self, ray: Any, ref: Any) -> None:
        self._ray, self.ref, self.returncode, self.pid = ray, ref, None, None

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


def _run_worker(staging: str, env: dict[str, str], retries: int) -> int:
    """On a Ray worker: run the batch worker in ``staging``; start it again if a signal killed it."""
    rc = 0
    for attempt in range(retries + 1):
        with open(Path(staging) / "job.log", "ab") as log:
            if attempt:
                log.write(f"converter: worker killed (exit {rc}); retry {attempt} of {retries}\n".encode())
                log.flush()
            rc = popen_worker(staging, env, log).wait()
        if rc >= 0:
            break
    return rc


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, retries: int = 2) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray, which is not installed",
                            "pip install '.[ray]' (or pip install 'ray>=2.10'), or use --executor local") from None
        self.ray, self.retries = ray, retries
        self._started = not ray.is_initialized()
        if self._started:
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:  # workers import converter from where this process does
                    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")) if p)
                    ray.init(num_cpus=os.cpu_count() or 1, log_to_driver=False, include_dashboard=False,
                             runtime_env={"env_vars": {"PYTHONPATH": path}})
            except Exception as exc:
                raise UserError(f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                "check --address (ray status on the head node shows it), or drop it to start a "
                                "local Ray") from None
        self._task = ray.remote(num_cpus=1, max_retries=retries)(_run_worker)

    def start(self, staging: Path, env: dict[str, str], log_file: Any) -> RayProc:
        log_file.close()  # the task appends to job.log itself, on its node
        env = {**env, "OMP_NUM_THREADS": "1"}  # the task's one CPU
        return RayProc(self.ray, self._task.remote(str(staging.resolve()), env, self.retries))

    @staticmethod
    def kill(proc: RayProc) -> None:
        proc.kill()

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
