"""``qconvert batch``: many models from a job file, each in its own worker process; prints the summary table."""

from __future__ import annotations

import argparse

from ..batch import format_summary, run_batch
from ..errors import ConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_file", help="YAML/JSON job file (its keys: below)")
    p.add_argument("--jobs", "-j", type=int, default=1, help="worker processes at once")
    p.add_argument("--resume", action="store_true",
                   help="skip jobs whose inputs, config and converter version are unchanged since a successful run")
    p.add_argument("--timeout", type=float, help="seconds per job (default: the job file's, else none)")
    p.add_argument("-o", "--output-dir", help="override the job file's output_dir (default: the job file's)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine; ray: one Ray task per job (pip install '.[ray]') "
                        "(default: local)")
    p.add_argument("--address", help="Ray cluster address for --executor ray (default: start a local Ray with this "
                                     "machine's CPUs)")
    p.add_argument("--ray-data", choices=["auto", "copy"], default="auto",
                   help="--executor ray: calibration/verification data is read from its path where a node sees it "
                        "(auto), else from a node-local copy out of Ray's object store; copy: always from the copy "
                        "(storage that is slow to read from many nodes) (default: auto)")


def run(args: argparse.Namespace) -> int:
    if args.ray_data != "auto" and args.executor != "ray":
        raise ConfigError("--ray-data is for --executor ray", "drop --ray-data, or add --executor ray")
    batch = run_batch(args.job_file, jobs=args.jobs, resume=args.resume, timeout=args.timeout,
                      output_dir=args.output_dir, executor=args.executor, address=args.address,
                      ray_data=args.ray_data)
    print(format_summary(batch))
    return batch.exit_code
