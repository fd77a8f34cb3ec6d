"""Behaviour kept: ``quantize`` writes byte-identical models and encodings before and after a change.

For the digits CNN (models/digits_cnn.py, exported once), MLPerf Tiny ResNet-8 and EfficientNet-Lite0 (shared
assets), runs ``python -m converter quantize`` of the checkout this script lives in with every technique off, each
technique alone, and CLE + bias correction, each setting spelled out on the command line (so a changed default
does not change the row; the default's ``fast_bias_correction`` is switched off where the checkout has it), and records the SHA-256 of the written ``.qdq.onnx`` and ``.encodings``. With
``--reference DIR`` (the ``--out`` of a run of this script from another checkout, e.g. main in a temporary
``git worktree``), it compares row by row and exits 1 on any difference.

    python -m tools.check_identical --assets /work/shared/assets --inputs /tmp/ci-inputs --out /tmp/ci-main
    python -m tools.check_identical --assets /work/shared/assets --inputs /tmp/ci-inputs --out /tmp/ci-new \\
        --reference /tmp/ci-main

``--inputs`` holds the float models and calibration folders both runs read (written on first use), so the two
checkouts quantize the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .benchlib.assets import add_assets_argument, assets_or_exit, effnet_input, imagenet_samples
from .benchlib.tasks import ROOT, child_env, load_models_module


OFF = ["--no-cle", "--no-smoothquant", "--no-bias-correction", "--no-adaround"]
ROWS = {  # row -> flags after OFF (argparse: the last of --x / --no-x wins)
    "none": [],
    "cle": ["--cle"],
    "smoothquant": ["--smoothquant"],
    "bias_correction": ["--bias-correction", "--bias-correction-mode", "empirical"],
    "bias_correction_auto": ["--bias-correction", "--bias-correction-mode", "auto"],
    "adaround": ["--adaround", "--adaround-iterations", "20"],
    "cle+bias_correction": ["--cle", "--bias-correction", "--bias-correction-mode", "empirical"],
}
MODELS = ("digits", "resnet8", "efficientnet")


def _calib_dir(folder: Path, x: np.ndarray, batch: int = 16) -> Path:
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(x), batch):
            np.save(tmp / f"{i // batch:04d}.npy", np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
        tmp.rename(folder)
    return folder


def make_inputs(assets: Path, inputs: Path, models: list[str]) -> dict[str, tuple[Path, Path]]:
    """{model: (float ONNX, calibration folder)}, written into ``inputs`` once."""
    inputs.mkdir(parents=True, exist_ok=True)
    out = {}
    if "digits" in models:
        path = inputs / "digits.onnx"
        digits = load_models_module("digits_cnn")
        x_tr = digits.load_split()[0]
        if not path.exists():
            import torch

            torch.onnx.export(digits.build(), torch.from_numpy(x_tr[:1]), str(path), input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                              opset_version=17, dynamo=False)
        out["digits"] = (path, _calib_dir(inputs / "digits_calib", x_tr[:64]))
    if "resnet8" in models:
        with np.load(assets / "cifar10-resnet8" / "cifar10_test_from_jpg.npz") as d:
            x = d["images_nhwc_uint8"][:64].astype(np.float32).transpose(0, 3, 1, 2)
        out["resnet8"] = (assets / "cifar10-resnet8" / "resnet8_cifar10.onnx", _calib_dir(inputs / "resnet8_calib", x))
    if "efficientnet" in models:
        x = effnet_input(imagenet_samples(assets)[0][:32])
        out["efficientnet"] = (assets / "efficientnet-lite0" / "efficientnet-lite0_opset13.onnx",
                               _calib_dir(inputs / "efficientnet_calib", x))
    return out


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def off_flags(env: dict) -> list[str]:
    """:data:`OFF`, plus ``--no-fast-bias-correction`` where this checkout has the default's cheap bias correction."""
    help_text = subprocess.run([sys.executable, "-m", "converter", "quantize", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True).stdout
    return OFF + (["--no-fast-bias-correction"] if "--fast-bias-correction" in help_text else [])


def run(models: dict[str, tuple[Path, Path]], rows: list[str], out: Path) -> dict[str, dict]:
    results = {}
    env = child_env()  # this checkout's converter
    off = off_flags(env)
    for model, (path, calib) in models.items():
        for row in rows:
            folder = out / f"{model}-{row}"
            cmd = [sys.executable, "-m", "converter", "quantize", str(path), "--calib", str(calib), "-o", str(folder),
                   "--name", model, *off, *ROWS[row]]
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            entry = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1),
                     "model": sha(folder / f"{model}.qdq.onnx"), "encodings": sha(folder / f"{model}.encodings")}
            if proc.returncode:
                entry["stderr"] = proc.stderr[-2000:]
            results[f"{model}/{row}"] = entry
            print(f"{model}/{row}: rc {proc.returncode}, {entry['seconds']} s", flush=True)
    return results


def compare(results: dict[str, dict], reference: dict[str, dict]) -> bool:
    same_all = True
    print(f"{'row':34} {'model':10} {'encodings':10}")
    for key, r in results.items():
        ref = reference.get(key)
        if ref is None:
            print(f"{key:34} (no reference row)")
            same_all = False
            continue
        cells = []
        for part in ("model", "encodings"):
            ok = r[part] is not None and r[part] == ref[part]
            same_all &= ok
            cells.append("identical" if ok else ("missing" if r[part] is None else "DIFFERS"))
        print(f"{key:34} {cells[0]:10} {cells[1]:10}")
    return same_all


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_assets_argument(p)
    p.add_argument("--inputs", type=Path, required=True, help="float models and calibration folders (written once)")
    p.add_argument("--out", type=Path, required=True, help="where the rows' outputs and hashes.json go")
    p.add_argument("--reference", type=Path, help="another run's --out to compare against")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--compare-only", action="store_true", help="compare --out's hashes.json with --reference's")
    args = p.parse_args(argv)
    args.assets = assets_or_exit(args.assets)
    if args.compare_only:
        same = compare(json.loads((args.out / "hashes.json").read_text()),
                       json.loads((args.reference / "hashes.json").read_text()))
        print("byte-identical" if same else "DIFFERENT")
        return 0 if same else 1
    models = make_inputs(args.assets, args.inputs, args.models.split(","))
    results = run(models, args.rows.split(","), args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hashes.json").write_text(json.dumps(results, indent=2) + "\n")
    failed = [k for k, r in results.items() if r["rc"]]
    for k in failed:
        print(f"{k} failed:\n{results[k]['stderr']}", file=sys.stderr)
    if args.reference:
        reference = json.loads((args.reference / "hashes.json").read_text())
        same = compare(results, reference)
        print("byte-identical" if same else "DIFFERENT")
        return 0 if same and not failed else 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
