"""SmoothQuant on transformers, all-INT8 (no float layers): accuracy, what was folded, latency; one run.

Rows per model (same calibration and evaluation data):

* FP32;
* ours all-INT8 without SmoothQuant (``QuantConfig(smoothquant=False)``);
* ours all-INT8 with SmoothQuant alpha 0.5 (the default: 1/s folded into the producer where nothing else
  reads the tensor, else a float Mul) and with ``smoothquant_alpha="auto"``;
* the same without SmoothQuant / with alpha 0.5 / with alpha 0.7, activation ranges by ``calib_method:
  percentile`` (99.999) instead of min/max;
* ONNX Runtime ``quantize_static`` (QDQ, per-channel, MinMax, QUInt8/QInt8, all ops).

Columns: compute ops left in float / compute ops (Conv, Gemm, MatMul: a float operand), output cosine to FP32
(all positions; for MiniLM also only the attended tokens, since padding is 92% of the 128 positions and no
pooled output reads it), STS-B Spearman (MiniLM), smoothed inputs (folded / Mul), latency at batch 1 on
ONNX Runtime CPU (all graph optimizations, ``--threads`` threads, default 1; ``--runs`` rounds, each model
once per round in a rotated order), ratio to FP32.

Models (``--models``, default ``minilm,bert,gpt2``):

* ``minilm``: all-MiniLM-L6-v2 as tools/search_bench.py builds it (``--minilm-onnx`` or the assets' export):
  calibration 200 STS-B sentences, evaluation the next 200, padded to 128 tokens.
* ``bert``: a random-initialised 4-layer BERT (post-LN: LayerNorm outputs also feed the residual), hidden 128;
  ``gpt2``: a random-initialised 4-layer GPT-2 (pre-LN: LayerNorm outputs feed only the attention/MLP
  projections, so SmoothQuant folds). Outlier channels planted as trained transformers have them: every
  LayerNorm's gamma x ``--outlier`` (default 25) on 3 channels, the rows of the weights reading it divided by
  the same (the function stays close to the unplanted one). Calibration 64 random token sequences (seq 32),
  evaluation 64 others. Nobody tuned SmoothQuant on them.

    python -m tools.smoothquant_bench [--assets DIR] [--models minilm,bert,gpt2] [--minilm-onnx PATH]
                                      [--runs N] [--threads T] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from converter import QuantConfig
from converter.ort_session import create_session

from .benchlib.assets import STSB, add_assets_argument, assets_or_exit, feeds, stsb_rows, tokenizer
from .benchlib.ort_baseline import ort_quantize_static
from .search_bench import float_compute_ops, latency
from .benchlib.measure import quantize_any_speed


ROWS = {"fp32": "FP32", "int8": "ours all-INT8, no SmoothQuant", "sq": "ours all-INT8 + SmoothQuant 0.5",
        "sq_auto": "ours all-INT8 + SmoothQuant auto", "pct": "ours all-INT8, percentile, no SmoothQuant",
        "pct_sq": "ours all-INT8 + SmoothQuant 0.5, percentile", "pct_sq07": "ours all-INT8 + SmoothQuant 0.7, percentile",
        "ort": "ORT quantize_static, all ops"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Task:
    def __init__(self, key, title, model, calib, eval_batches, feed, output, mask_input=None, extra=None):
        self.key, self.title, self.model, self.calib, self.eval_batches = key, title, Path(model), calib, eval_batches
        self.feed, self.output, self.mask_input = feed, output, mask_input
        self.extra = extra or (lambda path: {})

    def outputs(self, path) -> np.ndarray:
        s = create_session(str(path), ["CPUExecutionProvider"], "all")
        return np.concatenate([s.run([self.output], b)[0] for b in self.eval_batches])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def minilm_task(assets: Path, work: Path, onnx_path: str | None) -> Task:
    from .search_bench import minilm_bench

    b = minilm_bench(assets, work, onnx_path)
    rows = stsb_rows(assets)
    sentences = list(dict.fromkeys(s for r in rows for s in (r[5], r[6])))
    tok = tokenizer(assets, fixed=True)
    eval_batches = [feeds(tok, sentences[i:i + 25]) for i in range(200, 400, 25)]
    stsb = STSB(assets)
    return Task("minilm", b.title, b.model, b.calib, eval_batches, b.feed, "last_hidden_state", "attention_mask",
                lambda p: {"stsb_spearman": stsb(str(p))})


def random_transformer(kind: str, work: Path, outlier: float, seed: int = 0) -> Task:
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    torch.manual_seed(seed)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=512, max_position_embeddings=64), add_pooling_layer=False)
    else:
        model = GPT2Model(GPT2Config(vocab_size=1000, n_embd=128, n_layer=4, n_head=4, n_positions=64))
    model.eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():  # outlier channels: LayerNorm gamma up, the rows of the weights reading it down
        lns = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
        for ln in lns:
            ch = torch.as_tensor(rng.choice(ln.weight.numel(), 3, replace=False))
            ln.weight[ch] *= outlier
            ln.bias[ch] *= outlier
            for reader in _readers(model, ln, kind):
                if isinstance(reader, torch.nn.Linear):
                    reader.weight[:, ch] /= outlier
                else:  # GPT-2 Conv1D: weight (in, out)
                    reader.weight[ch, :] /= outlier
    names = ["input_ids"] + (["attention_mask"] if kind == "bert" else [])
    seq, path = 32, work / f"{kind}.onnx"

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *inputs):
            return self.m(**dict(zip(names, inputs))).last_hidden_state

    example = [torch.ones(1, seq, dtype=torch.long) for _ in names]
    torch.onnx.export(Wrap(model), tuple(example), str(path), input_names=names, output_names=["last_hidden_state"],
                      dynamic_axes={n: {0: "batch"} for n in names + ["last_hidden_state"]}, opset_version=17,
                      dynamo=False)

    def batch(r):
        ids = r.integers(0, 1000, (8, seq)).astype(np.int64)
        return {"input_ids": ids, **({"attention_mask": np.ones_like(ids)} if kind == "bert" else {})}

    r = np.random.default_rng(seed + 1)
    calib, evals = [batch(r) for _ in range(8)], [batch(r) for _ in range(8)]
    title = (f"random {'BERT (post-LN)' if kind == 'bert' else 'GPT-2 (pre-LN)'}, 4 layers, hidden 128, outlier "
             f"channels x{outlier:g} planted (calib 64 / eval 64 random sequences, seq 32)")
    return Task(kind, title, path, calib, evals, {k: v[:1] for k, v in evals[0].items()}, "last_hidden_state")


def _readers(model, ln, kind: str) -> list:
    """The projections reading LayerNorm ``ln``'s output (transformers' module layout)."""


    if kind == "gpt2":
        for block in model.h:
            if ln is block.ln_1:
                return [block.attn.c_attn]
            if ln is block.ln_2:
                return [block.mlp.c_fc]
        return []
    if ln is model.embeddings.LayerNorm:
        return [model.encoder.layer[0].attention.self.query, model.encoder.layer[0].attention.self.key,
                model.encoder.layer[0].attention.self.value]
    for i, layer in enumerate(model.encoder.layer):
        if ln is layer.attention.output.LayerNorm:
            return [layer.intermediate.dense]
        if ln is layer.output.LayerNorm and i + 1 < len(model.encoder.layer):
            nxt = model.encoder.layer[i + 1].attention.self
            return [nxt.query, nxt.key, nxt.value]
    return []


def ort_static(t: Task, work: Path) -> Path:
    folder = work / f"ort_{t.key}"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{t.key}_qdq.onnx"
    ort_quantize_static(t.model, t.calib, out)
    return out


def run_task(t: Task, work: Path, args) -> dict:
    log(f"== {t.title}")
    paths: dict[str, Path] = {"fp32": t.model}
    rows: dict[str, dict] = {k: {} for k in ROWS}
    for key, config in (("int8", QuantConfig(smoothquant=False)), ("sq", QuantConfig()),
                        ("sq_auto", QuantConfig(smoothquant_alpha="auto")),
                        # a range method beside SmoothQuant (analyze's advice when activations dominate)
                        ("pct", QuantConfig(smoothquant=False, calib_method="percentile")),
                        ("pct_sq", QuantConfig(calib_method="percentile")),
                        ("pct_sq07", QuantConfig(calib_method="percentile", smoothquant_alpha=0.7))):
        log(f"  {ROWS[key]} ...")
        start = time.perf_counter()
        res = quantize_any_speed(str(t.model), t.calib, config, output_dir=work / f"{key}_{t.key}", name=t.key)
        paths[key] = Path(res.model_path)
        sq = res.report.get("smoothquant") or []
        rows[key].update(quantize_s=round(time.perf_counter() - start, 1), smoothed=len(sq),
                         folded=sum(1 for e in sq if e["folded_into"]), muls=sum(1 for e in sq if e["mul_node"]),
                         per_input=[{k: e[k] for k in ("tensor", "alpha", "folded_into", "mul_node", "why_not_folded",
                                                        "outlier_ratio")} for e in sq])
    log("  ORT quantize_static ...")
    paths["ort"] = ort_static(t, work)
    ref = t.outputs(t.model)
    mask = (np.concatenate([b[t.mask_input] for b in t.eval_batches]).astype(bool) if t.mask_input else None)
    for key, path in paths.items():
        out = t.outputs(path)
        n_float, n_compute = float_compute_ops(path)
        rows[key].update(float_layers=n_float, compute_layers=n_compute, cosine=round(_cos(out, ref), 5))
        if mask is not None:
            rows[key]["cosine_attended"] = round(_cos(out[mask], ref[mask]), 5)
        log(f"  extra figures {key} ...")
        rows[key].update(t.extra(path))
    log("  latency ...")
    ms = latency(paths, t.feed, args.threads, args.runs)
    for key in rows:
        rows[key].update(latency_ms=ms[key], vs_fp32=round(ms[key] / ms["fp32"], 3))
    return {"model": t.title, "key": t.key, "rows": rows}


def print_table(r: dict) -> None:
    rows = r["rows"]
    attended = "cosine_attended" in rows["fp32"]
    spear = "stsb_spearman" in rows["fp32"]
    print(f"\n{r['model']}")
    print(f"  {'':36s} {'float/compute':>13s} {'cosine':>8s}" + (f" {'attended':>8s}" if attended else "")
          + (f" {'STS-B':>7s}" if spear else "") + f" {'folded/Mul':>10s} {'ms b1':>8s} {'vs FP32':>7s}")
    for k, label in ROWS.items():
        row = rows[k]
        sq = f"{row['folded']}/{row['muls']}" if "folded" in row else "-"
        print(f"  {label:36s} {row['float_layers']:>6d}/{row['compute_layers']:<6d} {row['cosine']:>8.5f}"
              + (f" {row['cosine_attended']:>8.5f}" if attended else "")
              + (f" {row['stsb_spearman']:>7.4f}" if spear else "")
              + f" {sq:>10s} {row['latency_ms']:>8.2f} {row['vs_fp32']:>7.3f}")
    for k in ("sq", "sq_auto"):
        for e in rows[k]["per_input"]:
            where = f"folded into {e['folded_into']}" if e["folded_into"] else f"Mul ({e['why_not_folded']})"
            print(f"    {k:8s} {e['tensor'][-56:]:56s} alpha {e['alpha']:.1f} ratio {e['outlier_ratio']:>5.1f}  {where}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_assets_argument(ap)
    ap.add_argument("--models", default="minilm,bert,gpt2")
    ap.add_argument("--minilm-onnx", help="exported MiniLM ONNX (default: export with the assets' export.py)")
    ap.add_argument("--outlier", type=float, default=25.0, help="planted outlier factor for bert/gpt2 (default 25)")
    ap.add_argument("--runs", type=int, default=50, help="latency rounds (default 50)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for latency (default 1)")
    ap.add_argument("--json")
    ap.add_argument("--keep", help="keep the models in this folder (default: a temp folder, removed)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="converter: %(message)s")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="smoothquant_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for key in [k.strip() for k in args.models.split(",") if k.strip()]:
            if key == "minilm":
                task = minilm_task(assets_or_exit(args.assets), work, args.minilm_onnx)
            elif key in ("bert", "gpt2"):
                task = random_transformer(key, work, args.outlier)
            else:
                ap.error(f"unknown model {key!r}: use minilm, bert, gpt2")
            results.append(run_task(task, work, args))
            print_table(results[-1])
            sys.stdout.flush()
            if args.json:
                Path(args.json).write_text(json.dumps({"threads": args.threads, "runs": args.runs,
                                                       "models": results}, indent=2, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
