"""A synthetic model over 2 GiB, end to end: quantize, apply-encodings, verify (and optionally compare).

The model is a stack of ``--layers`` MatMul(W_i) -> Add(b_i) -> Relu blocks with ``--width`` x
``--width`` float32 weights, then a MatMul head to 16 outputs; the default (9 x 8192 x 8192) holds
2.25 GiB of weights, over protobuf's 2 GiB limit, so it exists only as ``large.onnx`` plus
``large.onnx.data``. It is written tensor by tensor (never one protobuf in memory). Each step runs
the CLI (``python -m converter``) in a child process; the script prints each step's wall time and
the child's peak RSS (``os.wait4``), checks that ``apply-encodings`` writes the same bytes as
``quantize`` and that the QDQ model loads in ONNX Runtime from its path with its external data.

Usage::

    python -m tools.large_model [--dir DIR] [--width 8192] [--layers 9] [--samples 8] [--compare] [--keep]

Needs about 3.5 GiB of disk in ``--dir`` (default: a temporary folder) and, for the default size,
about 8 GiB of memory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ)


def build(path: Path, width: int, layers: int, seed: int = 0) -> int:
    """Write the model as ``path`` + ``path.data``; returns the bytes of external data."""
    rng = np.random.default_rng(seed)
    location = f"{path.name}.data"
    inits, nodes, x = [], [], "input"
    with open(path.parent / location, "wb") as f:
        def external(name: str, array: np.ndarray) -> TensorProto:
            pos = f.tell()
            pad = -pos % 4096
            f.write(b"\0" * pad)
            pos += pad
            f.write(array.tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape),
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", location), ("offset", str(pos)), ("length", str(array.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            return t

        for i in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / width))  # He init: activations keep their scale through the Relus
            inits.append(external(f"w{i}", w))
            del w
            inits.append(helper.make_tensor(f"b{i}", TensorProto.FLOAT, [width],
                                             (rng.standard_normal(width) * 0.1).astype(np.float32).tolist()))
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"/layer{i}/MatMul"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"/layer{i}/Add"),
                      helper.make_node("Relu", [f"add{i}"], [f"relu{i}"], name=f"/layer{i}/Relu")]
            x = f"relu{i}"
        head = (rng.standard_normal((width, 16), dtype=np.float32) / np.float32(np.sqrt(width)))
        inits.append(external("head", head))
        nodes.append(helper.make_node("MatMul", [x, "head"], ["output"], name="/head/MatMul"))
        size = f.tell()
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return size


def step(name: str, args: list[str]) -> dict:
    """Run ``python -m converter ARGS`` in a child; wall time and the child's peak RSS."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "converter", *args], cwd=ROOT, env=ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / 2**20  # KiB -> GiB
    print(f"== {name}: exit {code}, wall {wall:.1f} s, peak RSS {rss:.2f} GiB", flush=True)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code})")
    return {"step": name, "wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2)}


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="working folder (default: a temporary folder, removed unless --keep)")
    ap.add_argument("--width", type=int, default=8192, help="MatMul width (default: 8192)")
    ap.add_argument("--layers", type=int, default=9, help="MatMul blocks (default: 9: 2.25 GiB of weights)")
    ap.add_argument("--samples", type=int, default=8, help="calibration and verification samples (default: 8)")
    ap.add_argument("--compare", action="store_true", help="also run qconvert compare (default: off)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (default: off)")
    ap.add_argument("--protobuf-limit", type=int,
                    help="lowered protobuf limit for the children (CONVERTER_PROTOBUF_LIMIT), for a quick run of a "
                         "small model down the same path (default: 2 GiB)")
    args = ap.parse_args()
    if args.protobuf_limit:
        ENV["CONVERTER_PROTOBUF_LIMIT"] = str(args.protobuf_limit)
    limit = args.protobuf_limit or 2**31
    work = Path(args.dir or tempfile.mkdtemp(prefix="large-model-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working in {work} (free: {shutil.disk_usage(work).free / 2**30:.1f} GiB)", flush=True)
    try:
        model = work / "large.onnx"
        t = time.perf_counter()
        size = build(model, args.width, args.layers)
        print(f"== build: {size / 2**30:.2f} GiB of weights in {model.name}.data "
              f"({'over' if size >= limit else 'UNDER'} the protobuf limit, {limit / 2**30:.3g} GiB), {time.perf_counter() - t:.1f} s",
              flush=True)
        rng = np.random.default_rng(1)
        for d in ("calib", "eval"):
            (work / d).mkdir(exist_ok=True)
            for i in range(args.samples):
                np.save(work / d / f"{i:03d}.npy", rng.standard_normal(args.width).astype(np.float32))
        out = work / "out"
        # --no-smoothquant: apply-encodings cannot redo SmoothQuant's rescaling (its encodings name the smoothed
        # tensors), so the byte-for-byte check below needs a plain quantize
        rows = [step("quantize", ["quantize", str(model), "--calib", str(work / "calib"), "-o", str(out),
                                  "--no-smoothquant"])]
        qdq = out / "large.qdq.onnx"
        light = onnx.load(str(qdq), load_external_data=False)
        n_ext = sum(t.data_location == TensorProto.EXTERNAL for t in light.graph.initializer)
        data = out / (qdq.name + ".data")
        print(f"   {qdq.name}: {qdq.stat().st_size / 2**10:.0f} KiB + {data.name} "
              f"{data.stat().st_size / 2**30 if data.exists() else 0:.3f} GiB ({n_ext} external tensors)")
        from converter.ort_session import create_session

        t = time.perf_counter()
        create_session(str(qdq), optimization="all")
        print(f"   ONNX Runtime loads {qdq.name} from its path with its external data ({time.perf_counter() - t:.1f} s)")
        applied = work / "applied.qdq.onnx"
        rows.append(step("apply-encodings", ["apply-encodings", str(model), str(out / "large.encodings"),
                                             "-o", str(applied)]))
        same = (digest(applied.with_name(applied.name + ".data")) == digest(data)
                and onnx.load(str(applied), load_external_data=False).graph.node == light.graph.node)
        print(f"   apply-encodings wrote the same weights and graph as quantize: {same}")
        rows.append(step("verify", ["verify", str(model), str(qdq), "--data", str(work / "eval"), "--min-cosine",
                                    "0.98", "--min-agreement", "none", "--max-top1-drop", "none",
                                    "--batch-size", "4"]))
        if args.compare:
            rows.append(step("compare", ["compare", str(model), str(qdq), "--data", str(work / "eval"),
                                         "--max-samples", "4"]))
        print("\n| step | wall (s) | peak RSS (GiB) |\n|---|---|---|")
        for r in rows:
            print(f"| {r['step']} | {r['wall_s']} | {r['peak_rss_gib']} |")
        if not same:
            raise SystemExit("apply-encodings output differs from quantize's")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
