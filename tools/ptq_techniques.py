"""AIMET-style post-training techniques beside AIMET: top-1 of EfficientNet-Lite0 on 900 held-out ImageNet samples
(100 calibrate), of ResNet-8 on 2,000 CIFAR-10 images (200 calibrate) with ``--model resnet8``, or, a model from
another exporter nobody tuned the techniques on, of PP-OCR's text direction classifier (paddle2onnx: HardSwish and
squeeze-excitation blocks) on 198 held-out rendered text lines, upright and turned 180 degrees (40 calibrate: 20
lines both ways) with ``--model ppocr_cls``.

Each converter row quantizes the same float model from the same calibration images (W8A8 or W4A8, ort-cpu target,
minmax) with one combination of converter's techniques (CLE, bias correction, 4-bit weights, AdaRound) and evaluates
the QDQ model in ONNX Runtime CPU (ORT_ENABLE_ALL: the fused integer kernels). Each row runs in its own process
(``--one-row``), which reports its wall time and peak resident memory (loading the images included); the
ORT-optimized graph's QLinearConv / float Conv counts and the batch-1 latency (median of rounds over all row models,
interleaved) are added afterwards.

AIMET rows run in a venv with aimet-onnx (``--aimet PYTHON``, default ``/tmp/aimet/bin/python`` when present;
aimet-onnx pulls a CUDA torch of ~6 GB, so it is never a project dependency), on the same images:

* ``aimet-cle`` / ``aimet-cle-nodes`` / ``aimet-per-tensor`` (tools/aimet_cle_row.py): ``equalize_model`` on the
  same ONNX model, then ``QuantizationSimModel`` with the default config (per-tensor int8 weights, 8-bit
  activations, min-max); again with the Clip bounds as Constant nodes, where aimet-onnx looks for a ReLU6 to replace
  by Relu (with initializers there it skips every ReLU6 pair); and the same sim without CLE;
* ``aimet-w4-adaround`` / ``aimet-w4`` / ``aimet-w8-adaround`` (tools/aimet_adaround.py): ``apply_adaround`` (or
  nearest rounding) on our preprocessed float model with the same iteration budget (``--adaround-iterations``);
  ``aimet-w4-tfe-fl8`` / ``aimet-w4-tfe-fl8-adaround``: the same with AIMET's SQNR weight ranges (tf_enhanced) and
  the first/last layer's weights at 8 bits, beside our ``w4-mse-fl8*`` rows (MSE weight ranges, first/last 8);
  ``aimet-w4-tfe-fl8-asym[-adaround]``: and asymmetric param quantizers, beside ``w4-mse-fl8-asym*``;
  ``aimet-w4-tfe-fl8-dw8[-adaround]``: every depthwise Conv's weights at 8 bits too, beside ``w4-mse-fl8-dw8*``.

    python -m tools.ptq_techniques [--assets DIR] [--model efficientnet_lite0|resnet8|ppocr_cls]
        [--rows fp32,per-tensor,...,aimet-cle] [--adaround-iterations N] [--aimet PYTHON|none] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from converter import QuantConfig
from converter.metrics import paired_top1
from converter.ort_session import optimized_op_counts
from converter.pipeline import prepare

from .bench_e2e import Task, accuracy, calib_reader, efficientnet_task, latency, resnet8_task, session
from .benchlib.assets import add_assets_argument, assets_or_exit
from .benchlib.tasks import run_module
from .benchlib.measure import quantize_any_speed


FIRST_LAST_8 = {"first": 8, "last": 8}
FIRST_LAST_DEPTHWISE_8 = {"first": 8, "last": 8, "depthwise": 8}
# the documented W4A8 setting (docs/results.md, "Network tuning"): asymmetric 4-bit MSE weights, first/last 8,
# percentile activations, AdaRound's local search + bias correction + network tuning; rows below vary it
W4A8_SETTING = dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8, weight_symmetric=False,
                    adaround=True, adaround_iterations=0, bias_correction=True, network_tuning=True,
                    calib_method="percentile")
ROWS = {
    "per-tensor": dict(per_channel=False),
    "per-tensor+cle": dict(per_channel=False, cle=True, cle_relu6="min"),
    "per-tensor+cle(replace-relu6)": dict(per_channel=False, cle=True, cle_relu6="replace"),
    "per-tensor+cle(keep-relu6)": dict(per_channel=False, cle=True, cle_relu6="keep"),
    "per-tensor+bc": dict(per_channel=False, bias_correction=True),
    "per-tensor+cle+bc": dict(per_channel=False, cle=True, cle_relu6="min", bias_correction=True),
    "per-tensor+cle(replace-relu6)+bc": dict(per_channel=False, cle=True, cle_relu6="replace", bias_correction=True),
    "per-tensor+cle(keep-relu6)+bc": dict(per_channel=False, cle=True, cle_relu6="keep", bias_correction=True),
    "per-tensor+cle+bc(auto)": dict(per_channel=False, cle=True, cle_relu6="min", bias_correction=True,
                                    bias_correction_mode="auto"),
    "per-channel": dict(per_channel=True),
    "per-channel+bc": dict(per_channel=True, bias_correction=True),
    "per-channel+adaround": dict(per_channel=True, adaround=True),
    "w4-per-channel": dict(weight_bits=4),
    "w4-per-channel+bc": dict(weight_bits=4, bias_correction=True),
    "w4-per-channel+adaround": dict(weight_bits=4, adaround=True),
    "w4-per-channel+adaround+bc": dict(weight_bits=4, adaround=True, bias_correction=True),
    "w4-per-channel+adaround(adam)": dict(weight_bits=4, adaround=True, adaround_search=False),
    "w4-per-channel+adaround(adam)+bc": dict(weight_bits=4, adaround=True, adaround_search=False,
                                             bias_correction=True),
    "w4-per-channel+search": dict(weight_bits=4, adaround=True, adaround_iterations=0),
    "w4-per-channel+search+bc": dict(weight_bits=4, adaround=True, adaround_iterations=0, bias_correction=True),
    "w4-per-channel+search+bc+nt": dict(weight_bits=4, adaround=True, adaround_iterations=0, bias_correction=True,
                                        network_tuning=True),
    "w4-per-channel-asym+bc": dict(weight_bits=4, weight_symmetric=False, bias_correction=True),
    "w4-per-channel-asym+search+bc": dict(weight_bits=4, weight_symmetric=False, adaround=True, adaround_iterations=0,
                                          bias_correction=True),
    "w4-mse": dict(weight_bits=4, weight_calib="mse"),
    "w4-mse+bc": dict(weight_bits=4, weight_calib="mse", bias_correction=True),
    "w4-mse+adaround": dict(weight_bits=4, weight_calib="mse", adaround=True),
    "w4-mse+adaround+bc": dict(weight_bits=4, weight_calib="mse", adaround=True, bias_correction=True),
    # the common rule: first and last layer at 8 bits
    "w4-mse-fl8": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8),
    "w4-mse-fl8+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                          bias_correction=True),
    "w4-mse-fl8+adaround": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                adaround=True),
    "w4-mse-fl8+adaround+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                   adaround=True, bias_correction=True),
    # AdaRound's Adam steps alone (no local search after them), and the local search alone (no Adam steps)
    "w4-mse-fl8+adaround(adam)+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                         adaround=True, adaround_search=False, bias_correction=True),
    "w4-mse-fl8+search+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                 adaround=True, adaround_iterations=0, bias_correction=True),
    "w4-mse-fl8-dw8+search+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_DEPTHWISE_8,
                                     adaround=True, adaround_iterations=0, bias_correction=True),
    # asymmetric weights (a zero point per channel: skewed depthwise kernels use every level)
    "w4-mse-fl8-asym": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                            weight_symmetric=False),
    "w4-mse-fl8-asym+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                               weight_symmetric=False, bias_correction=True),
    "w4-mse-fl8-asym+search+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                      weight_symmetric=False, adaround=True, adaround_iterations=0,
                                      bias_correction=True),
    "w4-mse-fl8-asym+search+bc+nt": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                         weight_symmetric=False, adaround=True, adaround_iterations=0,
                                         bias_correction=True, network_tuning=True),
    "w4-mse-fl8-asym-pct+search+bc+nt": W4A8_SETTING,
    # the same with the float model's linear streams rotated first (converter.quant.rotation)
    "w4-mse-fl8-asym-pct+rot+search+bc+nt": {**W4A8_SETTING, "rotation": True},
    "w4-mse-fl8-asym-pct+rot+search+bc+nt-mix24": {**W4A8_SETTING, "rotation": True, "network_tuning_epochs": 24,
                                                   "network_tuning_mixup": True},
    # the same with every depthwise Conv's weights at 8 bits too (4% of the weights), without / with rotation
    "w4-mse-fl8-dw8-asym-pct+search+bc+nt": {**W4A8_SETTING, "weight_bits_overrides": FIRST_LAST_DEPTHWISE_8},
    "w4-mse-fl8-dw8-asym-pct+rot+search+bc+nt": {**W4A8_SETTING, "weight_bits_overrides": FIRST_LAST_DEPTHWISE_8,
                                                 "rotation": True},
    # the same with 200 of AdaRound's Adam steps before the search
    "w4-mse-fl8-asym-pct+ada200+search+bc+nt": dict(weight_bits=4, weight_calib="mse",
                                                    weight_bits_overrides=FIRST_LAST_8, weight_symmetric=False,
                                                    adaround=True, adaround_iterations=200, bias_correction=True,
                                                    network_tuning=True, calib_method="percentile"),
    # the same, network tuning on mixed samples for 24 epochs (function matching)
    "w4-mse-fl8-asym-pct+ada200+search+bc+nt-mix24": dict(weight_bits=4, weight_calib="mse",
                                                          weight_bits_overrides=FIRST_LAST_8, weight_symmetric=False,
                                                          adaround=True, adaround_iterations=200,
                                                          bias_correction=True, network_tuning=True,
                                                          network_tuning_epochs=24, network_tuning_mixup=True,
                                                          calib_method="percentile"),
    "w4-mse-fl8-asym-pct+search+bc+nt-mix24": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                                   weight_symmetric=False, adaround=True, adaround_iterations=0,
                                                   bias_correction=True, network_tuning=True, network_tuning_epochs=24,
                                                   network_tuning_mixup=True, calib_method="percentile"),
    # the same with block-wise weights (a scale per 64 / 32 input channels of a dense layer; depthwise stay per channel)
    "w4b64-mse-fl8-asym-pct+search+bc+nt": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                                weight_symmetric=False, weight_block_size=64, adaround=True,
                                                adaround_iterations=0, bias_correction=True, network_tuning=True,
                                                calib_method="percentile"),
    "w4b32-mse-fl8-asym-pct+search+bc+nt": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                                weight_symmetric=False, weight_block_size=32, adaround=True,
                                                adaround_iterations=0, bias_correction=True, network_tuning=True,
                                                calib_method="percentile"),
    "w4-mse-fl8-asym+adaround+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                        weight_symmetric=False, adaround=True, bias_correction=True),
    "w4-mse-fl8-dw8-asym+search+bc": dict(weight_bits=4, weight_calib="mse",
                                          weight_bits_overrides=FIRST_LAST_DEPTHWISE_8, weight_symmetric=False,
                                          adaround=True, adaround_iterations=0, bias_correction=True),
    # and every depthwise Conv at 8 bits (a few weights per channel: where 4 bits hurt most)
    "w4-mse-fl8-dw8": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_DEPTHWISE_8),
    "w4-mse-fl8-dw8+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_DEPTHWISE_8,
                              bias_correction=True),
    "w4-mse-fl8-dw8+adaround+bc": dict(weight_bits=4, weight_calib="mse",
                                       weight_bits_overrides=FIRST_LAST_DEPTHWISE_8, adaround=True,
                                       bias_correction=True),
    # issue 26: reconstruction beyond single layers (block-wise with QDrop: "brecq"; AdaQuant: weights + scales)
    "w4-adaquant": dict(weight_bits=4, adaquant=True),
    "w4-adaquant+bc": dict(weight_bits=4, adaquant=True, bias_correction=True),
    "w4-brecq": dict(weight_bits=4, block_reconstruction=True),
    "w4-brecq+bc": dict(weight_bits=4, block_reconstruction=True, bias_correction=True),
    "w4-search+brecq+bc": dict(weight_bits=4, adaround=True, adaround_iterations=0, block_reconstruction=True,
                               bias_correction=True),
    "w4-mse-fl8-asym+adaquant+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                        weight_symmetric=False, adaquant=True, bias_correction=True),
    "w4-mse-fl8-asym+brecq+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                     weight_symmetric=False, block_reconstruction=True, bias_correction=True),
    "w4-mse-fl8-asym+brecq-adaquant+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                              weight_symmetric=False, block_reconstruction=True, adaquant=True,
                                              bias_correction=True),
    "w4-mse-fl8-asym+search+brecq+bc": dict(weight_bits=4, weight_calib="mse", weight_bits_overrides=FIRST_LAST_8,
                                            weight_symmetric=False, adaround=True, adaround_iterations=0,
                                            block_reconstruction=True, bias_correction=True),
}
AIMET_CLE_ROWS = {"aimet-cle": [], "aimet-cle-nodes": ["--clip-bounds-as-nodes"], "aimet-per-tensor": ["--no-cle"]}
AIMET_ADAROUND_ROWS = {"aimet-w4-adaround": (4, True, []), "aimet-w4": (4, False, []),
                       "aimet-w8-adaround": (8, True, []),
                       # as the w4-mse-fl8 rows: AIMET's SQNR weight ranges (tf_enhanced), first/last layer 8 bits
                       "aimet-w4-tfe-fl8": (4, False, ["--weight-scheme", "tf_enhanced", "--first-last-bits", "8"]),
                       "aimet-w4-tfe-fl8-adaround": (4, True, ["--weight-scheme", "tf_enhanced",
                                                               "--first-last-bits", "8"]),
                       # as the w4-mse-fl8-asym rows: asymmetric param quantizers
                       "aimet-w4-tfe-fl8-asym": (4, False, ["--weight-scheme", "tf_enhanced", "--first-last-bits", "8",
                                                            "--asymmetric-weights"]),
                       "aimet-w4-tfe-fl8-asym-adaround": (4, True, ["--weight-scheme", "tf_enhanced",
                                                                    "--first-last-bits", "8", "--asymmetric-weights"]),
                       # as the w4-mse-fl8-dw8 rows: every depthwise Conv's weights at 8 bits too
                       "aimet-w4-tfe-fl8-dw8": (4, False, ["--weight-scheme", "tf_enhanced", "--first-last-bits", "8",
                                                           "--depthwise-bits", "8"]),
                       "aimet-w4-tfe-fl8-dw8-adaround": (4, True, ["--weight-scheme", "tf_enhanced",
                                                                   "--first-last-bits", "8", "--depthwise-bits", "8"])}
# AMD Quark's AdaQuant (tools/quark_adaquant_row.py, --quark PYTHON): W4A8 as our w4 rows (first/last 8 bits) and
# W8A8; Quark ONNX 0.13 has no 4-bit data type, so the W4 row records Quark's error
QUARK_ROWS = {"quark-w4-adaquant": (4, ["--first-last-bits", "8"]), "quark-w8-adaquant": (8, [])}
QUARK_PYTHON = "/work/peers/quark/bin/python"


def ppocr_cls_task(assets: Path) -> Task:
    """PP-OCR's direction classifier (rapidocr asset), the data of ``tools.assets_smoke.ppocr_cls``: class 0 a
    rendered line upright, 1 the same line turned 180 degrees; lines 0-19 calibrate, 20-119 evaluate."""
    from .assets_smoke import _ocr_lines, _ocr_norm

    _, imgs = _ocr_lines(assets)

    def both_ways(lines):
        return np.concatenate([_ocr_norm(x, 48, w_fixed=192) for im in lines for x in (im, im[::-1, ::-1].copy())])

    held_out = imgs[20:120]
    return Task("ppocr_cls", "PP-OCR mobile v2 direction classifier / rendered lines (calib 40, eval 198)",
                assets / "rapidocr" / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "x", both_ways(imgs[:20]),
                both_ways(held_out), np.tile([0, 1], len(held_out)).astype(np.int64), (1,), 33,
                "ours within 1 point of FP32 top-1")


TASKS = {"efficientnet_lite0": efficientnet_task, "resnet8": resnet8_task, "ppocr_cls": ppocr_cls_task}
DEFAULT_ROWS = ("fp32", "per-tensor", "per-tensor+cle(keep-relu6)+bc", "per-tensor+cle", "per-tensor+cle+bc",
                "per-tensor+cle(replace-relu6)", "per-tensor+cle(replace-relu6)+bc", "per-channel", "aimet-cle",
                "aimet-cle-nodes", "aimet-per-tensor")
AIMET_PYTHON = "/tmp/aimet/bin/python"


def peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def logits(path: Path, task) -> np.ndarray:
    s = session(path)
    return np.concatenate([s.run(None, {task.input_name: task.eval_x[i:i + task.eval_batch]})[0]
                           for i in range(0, len(task.eval_x), task.eval_batch)])


def paired_vs_fp32(path: Path, task, fp32_right: np.ndarray) -> dict:
    """Top-1 against FP32 sample by sample (:func:`converter.metrics.paired_top1`, as ``qconvert verify`` gives it):
    ``lost``, ``gained``, the drop's 95% interval in samples, and how many samples have their top two scores tied
    (8-bit outputs tie; argmax takes the lower class). Two rows a few samples apart are within it of each other
    too: on EfficientNet-Lite0's 900 images two 4-bit models differ on 40-48."""
    lq = logits(path, task)
    p = paired_top1(fp32_right, lq.argmax(1) == task.eval_y)
    top2 = np.sort(lq, axis=1)[:, -2:]
    n = len(task.eval_y)
    return {"lost": p["lost"], "gained": p["gained"], "drop_ci95": [round(v * n) for v in p["drop_ci95"]],
            "top2_tied": int((top2[:, 0] == top2[:, 1]).sum())}


def one_row(task, key: str, iterations: int, threads: int, out_dir: Path) -> dict:
    """Quantize and evaluate one converter row in this process; the model stays in ``out_dir``."""
    t0 = time.perf_counter()
    if key == "fp32":
        path, report, seconds = task.model, {}, 0.0
    else:
        config = QuantConfig(**{"target": "ort-cpu", "calib_method": "minmax", "adaround_iterations": iterations,
                                "threads": threads, **ROWS[key]})
        t = time.perf_counter()
        result = quantize_any_speed(task.model, calib_reader(task), config,
                                    output_dir=out_dir, name=task.key)
        path, report, seconds = result.model_path, result.report, time.perf_counter() - t
    counts = optimized_op_counts(str(path))
    row = {"tool": "converter", "row": key, **accuracy(Path(path), task), "of": len(task.eval_y),
           "quantize_s": round(seconds, 1), "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_mb": peak_rss_mb(), "qlinearconv": counts.get("QLinearConv", 0),
           "float_conv": counts.get("Conv", 0) + counts.get("FusedConv", 0), "model": str(path)}
    if "cle" in report:
        row["cle_pairs"] = len(report["cle"]["pairs"])
        row["relu6_replaced"] = len(report["cle"]["relu6_replaced"])
    if "bias_correction" in report:
        kinds = [c.get("kind", "empirical") for c in report["bias_correction"]["layers"]]
        row["bias_corrected"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    if "adaround" in report:
        layers = report["adaround"]["layers"]
        row.update(adaround_iterations=report["adaround"]["iterations"], adaround_s=report["adaround"]["seconds"],
                   adaround_search=report["adaround"]["search"], adaround_layers=len(layers),
                   adaround_kept=sum(r["kept"] for r in layers),
                   chosen={c: sum(r["chosen"] == c for r in layers) for c in ("nearest", "adaround", "search")},
                   loss_nearest_sum=round(sum(r["loss_nearest"] for r in layers), 4),
                   loss_adaround_sum=round(sum(r["loss_adaround"] for r in layers), 4),
                   loss_search_sum=round(sum(r.get("loss_search", r["loss_adaround"]) for r in layers), 4),
                   per_layer=[[r["node"], round(r["loss_nearest"], 5), round(r["loss_adaround"], 5),
                               round(r["loss_search"], 5) if "loss_search" in r else None, r["chosen"],
                               round(r["seconds"], 1)] for r in layers])
    for key in ("adaquant", "block_reconstruction"):  # issue 26
        if report.get(key):
            units = report[key]["units"]
            row.update({f"{key}_s": report[key]["seconds"], f"{key}_units": len(units),
                        f"{key}_iterations": report[key]["iterations"], f"{key}_qdrop": report[key]["qdrop"],
                        f"{key}_kept": sum(u["kept"] for u in units),
                        f"{key}_loss_nearest_sum": round(sum(u["loss_nearest"] for u in units), 5),
                        f"{key}_loss_learned_sum": round(sum(min(u["loss_learned"], u["loss_nearest"])
                                                             for u in units), 5)})
    return row


def save_arrays(task, work: Path) -> dict[str, Path]:
    files = {k: work / f"{k}.npy" for k in ("calib", "eval", "labels")}
    if not files["labels"].exists():
        for k, a in (("calib", task.calib), ("eval", task.eval_x), ("labels", task.eval_y)):
            np.save(files[k], a)
    return files


def aimet_row(python: str, task, key: str, args, work: Path) -> dict:
    """One AIMET row in the aimet-onnx venv (tools/aimet_cle_row.py or tools/aimet_adaround.py)."""
    files = save_arrays(task, work)
    if key in AIMET_CLE_ROWS:
        out = work / f"{key}.json"
        cmd = [python, str(Path(__file__).with_name("aimet_cle_row.py")), str(task.model),
               *(str(files[k]) for k in ("calib", "eval", "labels")), str(out), *AIMET_CLE_ROWS[key]]
    else:
        bits, on, extra = AIMET_ADAROUND_ROWS[key]
        model = work / "float_prepared.onnx"
        if not model.exists():
            onnx.save(prepare(str(task.model)).model, model)
        cmd = [python, str(Path(__file__).with_name("aimet_adaround.py")), "--model", str(model),
               "--calib", str(files["calib"]), "--eval", str(files["eval"]), "--labels", str(files["labels"]),
               "--input", task.input_name, "--weight-bits", str(bits), "--iterations",
               str(args.adaround_iterations if on else 0), "--threads", str(args.threads), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"tool": "aimet-onnx", "row": key,
                "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    row = json.loads(out.read_text()) if key in AIMET_CLE_ROWS else json.loads(proc.stdout.strip().splitlines()[-1])
    row.pop("pid", None)
    # interpreter start and imports included
    return {"tool": "aimet-onnx", **row, "row": key, "process_wall_s": round(time.perf_counter() - t, 1)}


def quark_row(python: str, task, key: str, args, work: Path) -> dict:
    """One AMD Quark AdaQuant row in the amd-quark venv (tools/quark_adaquant_row.py), on our preprocessed float model
    and the same images, with the AdaRound rows' iteration budget."""
    files = save_arrays(task, work)
    bits, extra = QUARK_ROWS[key]
    model = work / "float_prepared.onnx"
    if not model.exists():
        onnx.save(prepare(str(task.model)).model, model)
    cmd = [python, str(Path(__file__).with_name("quark_adaquant_row.py")), "--model", str(model),
           "--calib", str(files["calib"]), "--eval", str(files["eval"]), "--labels", str(files["labels"]),
           "--input", task.input_name, "--weight-bits", str(bits), "--iterations", str(args.adaround_iterations),
           "--threads", str(args.threads), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"tool": "amd-quark", "row": key,
                "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    row = json.loads(lines[-1])
    row.pop("pid", None)
    return {**row, "row": key, "process_wall_s": round(time.perf_counter() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_assets_argument(ap)
    ap.add_argument("--model", choices=list(TASKS), default="efficientnet_lite0")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated rows (default: {','.join(DEFAULT_ROWS)}; all: fp32, {', '.join(ROWS)}, "
                         f"{', '.join([*AIMET_CLE_ROWS, *AIMET_ADAROUND_ROWS, *QUARK_ROWS])})")
    ap.add_argument("--adaround-iterations", type=int, default=1000,
                    help="AdaRound steps per layer, ours and AIMET's alike (default: 1000; AIMET's default 10000)")
    ap.add_argument("--threads", type=int, default=1, help="ORT and torch threads of every row (default: 1)")
    ap.add_argument("--aimet", default=AIMET_PYTHON if Path(AIMET_PYTHON).exists() else "none",
                    help="python of a venv with aimet-onnx, or none (default: /tmp/aimet/bin/python when present)")
    ap.add_argument("--quark", default=QUARK_PYTHON, help=f"python of a venv with amd-quark (default: {QUARK_PYTHON})")
    ap.add_argument("--latency-runs", type=int, default=30, help="batch-1 latency rounds (0: none; default 30)")
    ap.add_argument("--json", help="also write the rows to this JSON file (default: none)")
    ap.add_argument("--one-row", help=argparse.SUPPRESS)  # internal: run one converter row in this process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    task = TASKS[args.model](args.assets)
    if args.one_row:  # progress (AdaRound's per-layer lines) on stderr, which the parent passes through
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
        logging.getLogger("converter").setLevel(logging.DEBUG)
        print(json.dumps(one_row(task, args.one_row, args.adaround_iterations, args.threads, Path(args.out))),
              flush=True)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for key in args.rows.split(","):
            if key in AIMET_CLE_ROWS or key in AIMET_ADAROUND_ROWS:
                if args.aimet == "none" or not Path(args.aimet).exists():
                    print(f"aimet-onnx: no venv (--aimet PYTHON): no {key} row")
                    continue
                row = aimet_row(args.aimet, task, key, args, Path(d))
            elif key in QUARK_ROWS:
                if not Path(args.quark).exists():
                    print(f"amd-quark: no venv (--quark PYTHON): no {key} row")
                    continue
                row = quark_row(args.quark, task, key, args, Path(d))
            else:
                proc = run_module("tools.ptq_techniques", ["--assets", args.assets, "--model", args.model,
                                  "--one-row", key, "--out", Path(d) / key, "--adaround-iterations",
                                  args.adaround_iterations, "--threads", args.threads],
                                  stdout=subprocess.PIPE, text=True)
                if proc.returncode != 0:
                    row = {"tool": "converter", "row": key, "error": f"exit status {proc.returncode} (see stderr)"}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("model", "per_layer")}), flush=True)
        done = {r["row"]: Path(r["model"]) for r in rows if "model" in r}
        if args.latency_runs and done:
            lat = latency(done, {task.input_name: task.eval_x[:1]}, 1, 5, args.latency_runs)
            for r in rows:
                if r["row"] in lat:
                    r["latency_ms_batch1_1thread"] = round(lat[r["row"]]["median_ms"], 2)
            print(json.dumps({k: round(v["median_ms"], 2) for k, v in lat.items()}), flush=True)
        if done:
            fp32_right = logits(Path(task.model), task).argmax(1) == task.eval_y  # once for every row
            for r in rows:
                if r["row"] in done:
                    r["vs_fp32"] = paired_vs_fp32(done[r["row"]], task, fp32_right)
    print(f"{'tool':<11} {'row':<34} {'top1':>5} {'of':>4} {'vs FP32: lost/gained, 95% of the drop, tied':>44} "
          f"{'QLinConv':>8} {'fltConv':>7} {'lat ms':>7} {'wall s':>7} {'peak MB':>7}")
    for r in rows:
        v = r.get("vs_fp32")
        paired = (f"{v['lost']}/{v['gained']}, {v['drop_ci95'][0]:+d}..{v['drop_ci95'][1]:+d}, {v['top2_tied']}"
                  if v else "-")
        print(f"{r['tool']:<11} {r['row']:<34} {r.get('top1', '-'):>5} {r.get('of', '-'):>4} {paired:>44} "
              f"{r.get('qlinearconv', '-'):>8} {r.get('float_conv', '-'):>7} "
              f"{r.get('latency_ms_batch1_1thread', '-'):>7} "
              f"{r.get('wall_s', r.get('process_wall_s', '-')):>7} {r.get('peak_rss_mb', '-'):>7}")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "model"} for r in rows],
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
