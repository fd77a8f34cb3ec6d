"""Float vs quantized accuracy on real data, with pass/fail thresholds for deployment pipelines.

Both models run in ONNX Runtime (default graph optimisation, i.e. what a deployment runs: on the
CPU provider Q/DQ pairs are fused into QLinearConv/QLinearMatMul) on the same batches, read by the
calibration readers (``.npy``/``.npz`` directories or images + ``preprocess.yaml``). Any QDQ model
works, ours or ONNX Runtime's ``quantize_static`` output: only input and output names must match.
Sessions come from :mod:`converter.ort_session` (its session options keep ORT 1.32 from computing
16-bit QDQ MatMuls in int8). The first batch also runs without graph optimizations: when either
model's outputs differ (cosine < 0.995 or max error > 10% of the range) a warning names the ORT
version, and ``graph_optimizations`` in the metrics records the comparison.

Metrics, streamed batch by batch (memory does not grow with the data, except one predicted class
per sample for classifier outputs), per model output::

    cosine   per sample s (one row of the output's batch axis, flattened):
             cos_s = <f_s, q_s> / (|f_s| |q_s|)      (1 when both are all-zero)
             reported as mean and min over samples. An output with one value per sample (a [N] or
             [N, 1] score) would only give the sign: it gets one cosine over all samples instead.
    SQNR     10 log10( sum f^2 / sum (f - q)^2 )  over every element of every sample, in dB
             (infinite when the outputs are identical; ``null`` in JSON)
    max abs  max |f - q|

An output shaped ``[N, C]`` (C >= 2, floating) is "classifier-like": top-1 agreement is the fraction
of samples where ``argmax f == argmax q``. With labels (one integer per sample, in the data's
sorted file order; a ``.npy`` file or a text file with one label per line), the accuracy of each
model is measured on the first classifier-like output and ``top-1 drop = acc_float - acc_quant``, with
its 95% interval from the paired samples (``lost``: float right, quantized wrong; ``gained``: the other
way round; :func:`converter.metrics.paired_top1`). Two models differ only on the samples
where one of them is wrong: on 900 ImageNet images two 4-bit EfficientNet-Lite0 models differed on 40-48,
so top-1 figures a few samples apart cannot be told apart there (results.md, issue 26). When a
``max_top1_drop`` lies inside that interval a note says so: the verdict holds for these samples, and more
labeled samples would be needed to hold for the data they come from.

Thresholds (:class:`Thresholds`; ``None`` disables one): ``min_cosine`` applies to the mean cosine
of every output, ``min_sqnr`` to every output's SQNR, ``min_agreement`` to every classifier-like
output (not applicable, and reported as such, when there is none), ``max_top1_drop`` needs labels.
With labels the default gate is the accuracy drop: agreement is reported, not gated (unless
``min_agreement`` is given). A good 1000-class model disagrees with its float model on more samples
than it loses accuracy on: EfficientNet-Lite0 INT8 on 900 ImageNet images had a top-1 drop of 0.5
point at a top-1 agreement of 0.985 (issue 25), and the flips that are not errors cost nothing (the
default quantize measured here: drop 1.11 point, agreement 0.977: the drop gate fails it, rightly).
Without labels agreement (default 0.99) is the only class-level check there is. A failed check
prints the next step (``next_steps``): ``qconvert analyze`` and the accuracy-target search, with the
float model, the calibration folder (from the quantize report beside the QDQ model), the data and
the labels filled in.

Latency (:mod:`converter.timing`): after the metrics, both models run the first batch again,
interleaved, until at least 30 runs each and 1 s of timing; reported are the medians with their
p10-p90 spread, and the median of the paired runs' ratios, or "too fast to time" when the float model runs in
under 1 ms.

Before anything runs, the pair is checked: a float model that holds QuantizeLinear/DequantizeLinear
nodes beside a quantized model that holds none is refused (swapped arguments); the same file twice
gets a warning (every metric is trivially perfect); and when ``quantize`` wrote the quantized model,
the report beside it names the float model it was made from (:mod:`converter.binding`): another
float model is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .binding import check_float_for_qdq, sha256_file, sibling_report
from .calib.readers import check_label_count, load_labels, model_inputs, open_calibration
from .ops import QUANTIZED_MARKERS
from .progress import tqdm
from . import schema
from .errors import CalibrationDataError, ModelError, UserError
from .graph.model_io import atomic_write_text, ensure_writable_dir, load_model
from .ort_session import check_optimizations, create_session, select_providers
from .metrics import OutputStats, finite, paired_top1
from .timing import format_latency, paired_latency

log = logging.getLogger("converter")

_LIMIT = (*schema.NUMBER, schema.NONE)
# the thresholds' schema, shared by Thresholds (Python API, the CLI) and a job file's verify block (batch.VERIFY_KEYS)
THRESHOLD_KEYS: dict[str, schema.Key] = {
    "min_cosine": schema.Key(_LIMIT, "a number or null", low=-1, high=1),
    "min_agreement": schema.Key(_LIMIT, "a number, auto or null", low=0, high=1, also=("auto",)),
    "max_top1_drop": schema.Key(_LIMIT, "a number or null", low=0, high=1, fix="write a fraction in [0, 1] "
                                "(0.01 = 1 point of top-1), or null"),
    "min_sqnr": schema.Key(_LIMIT, "a number or null"),
}


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits; ``None`` disables a check. The defaults are the CLI's defaults."""

    min_cosine: float | None = 0.99
    min_agreement: float | None | str = "auto"  # auto: not gated with labels (the drop gates), else 0.99
    max_top1_drop: float | None = 0.01
    min_sqnr: float | None = None

    def __post_init__(self) -> None:
        schema.check(self.to_dict(), THRESHOLD_KEYS, "the verify thresholds", label="threshold ")

    def resolved(self, labels: bool) -> "Thresholds":
        """``min_agreement`` "auto" made a number (no labels: :data:`AGREEMENT_WITHOUT_LABELS`) or None."""
        if self.min_agreement != "auto":
            return self
        return dataclasses.replace(self, min_agreement=None if labels else AGREEMENT_WITHOUT_LABELS)

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


AGREEMENT_WITHOUT_LABELS = 0.99  # the default agreement gate when no labels give the accuracy drop
VERIFY_RUNS, VERIFY_SECONDS = 30, 1.0  # latency: at least this many interleaved runs of each model, and this long


@dataclass(frozen=True)
class Check:
    """One threshold applied to one measured value."""

    name: str  # e.g. "cosine[logits]"
    measured: float | None  # None: not applicable
    limit: float
    higher_is_better: bool = True

    @property
    def applicable(self) -> bool:
        return self.measured is not None

    @property
    def passed(self) -> bool:
        if self.measured is None:
            return True
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit

    def describe(self) -> str:
        if self.measured is None:
            return f"{self.name} n/a"
        op = (">=" if self.passed else "<") if self.higher_is_better else ("<=" if self.passed else ">")
        return f"{self.name} {_fmt(self.measured)} {op} {_fmt(self.limit)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "measured": finite(self.measured), "limit": self.limit,
                "comparison": ">=" if self.higher_is_better else "<=", "passed": self.passed,
                "applicable": self.applicable}


@dataclass
class VerifyResult:
    """What :func:`verify` measured. ``metrics`` is JSON-ready; ``summary`` is the one-line verdict."""

    passed: bool
    metrics: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    notes: list[str] = field(default_factory=list)  # why the verdict is what it is (what was gated, what not)
    next_steps: list[str] = field(default_factory=list)  # command lines to run when a check failed

    @property
    def summary(self) -> str:
        failed = [c.describe() for c in self.checks if not c.passed]
        return "PASSED" if not failed else "FAILED: " + "; ".join(failed)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "summary": self.summary, **self.metrics,
                "thresholds": self.thresholds.to_dict(), "checks": [c.to_dict() for c in self.checks],
                "notes": self.notes, "next_steps": self.next_steps}

    def write_json(self, path: str | Path) -> None:
        path = Path(path)
        ensure_writable_dir(path.parent if str(path.parent) else ".", "--json")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")


# per-output accumulators: converter.metrics.OutputStats

# --- the API ------------------------------------------------------------------------------------------

def verify(float_model: str | Path | onnx.ModelProto, quant_model: str | Path | onnx.ModelProto, data: Any,
           labels: str | Path | np.ndarray | None = None, thresholds: Thresholds | None = None,
           providers: str | list[str] = "auto", batch_size: int = 16, max_samples: int | None = None,
           data_spec: str | Path | None = None, threads: int = 0, *, image_spec: str | Path | None = None
           ) -> VerifyResult:
    """Run both models on ``data`` and compare them; see the module docstring for what is measured.

    ``data``: a directory (``.npy``/``.npz`` or images + ``preprocess.yaml``, or ``image_spec``; ``data_spec``
    is its old name) or a Python iterable of ``{input name: array}`` dicts. ``labels``: integers, one per sample.
    """
    data_spec = image_spec or data_spec
    float_proto, quant_proto = load_model(float_model), load_model(quant_model)
    _check_pair(float_model, quant_model, float_proto, quant_proto)
    inputs = model_inputs(float_proto)
    _check_same_io(float_proto, quant_proto)
    label_array = load_labels(labels) if labels is not None else None
    thresholds = (thresholds or Thresholds()).resolved(label_array is not None)
    source = open_calibration(data, inputs, batch_size, max_samples, data_spec)
    check_label_count(source, label_array, max_samples)  # before either model runs
    provider_list = select_providers(providers)
    log.info("verifying on %s", ", ".join(provider_list))
    targets = _target(float_model, float_proto), _target(quant_model, quant_proto)
    sessions = tuple(_session(t, m, provider_list, threads) for t, m in zip(targets, (float_model, quant_model)))
    outputs = [o.name for o in float_proto.graph.output]

    stats = {name: OutputStats(name) for name in outputs}
    first: dict[str, np.ndarray] | None = None
    samples = batches = 0
    optimization: dict[str, dict | None] = {}
    total = source.num_samples if max_samples is None or source.num_samples is None else min(source.num_samples,
                                                                                                max_samples)
    bar = tqdm(total=total, desc="verifying (float + quantized)", unit="sample", leave=False)
    for batch in source:
        n = next(iter(batch.values())).shape[0]
        bar.update(n)
        if batches == 0:  # warm-up, untimed; and the guard: the same batch without graph optimizations
            for which, s, target, model in zip(("float", "quant"), sessions, targets, (float_model, quant_model)):
                check = check_optimizations(target, batch, outputs, _run(s, outputs, batch, 0), _describe(model),
                                            provider_list, threads)
                optimization[which] = check.to_dict() if check is not None else None
            first = batch
        results = [_run(s, outputs, batch, batches) for s in sessions]
        for name, ref, got in zip(outputs, *results):
            stats[name].update(np.asarray(ref), np.asarray(got), n)
        samples += n
        batches += 1
    bar.close()
    log.info("verified on %d samples in %d batches", samples, batches)
    latency = None
    if first is not None:
        timed = paired_latency(lambda: sessions[0].run(outputs, first), lambda: sessions[1].run(outputs, first),
                               min_runs=VERIFY_RUNS, min_seconds=VERIFY_SECONDS)
        latency = {**timed.to_dict(), "batch_size": next(iter(first.values())).shape[0]}

    accuracy = (_accuracy(stats, label_array, samples, labels, max_samples is not None)
                if label_array is not None else None)
    checks = _checks(stats, accuracy, thresholds)
    metrics = {
        "float_model": _describe(float_model), "quant_model": _describe(quant_model),
        "data": source.description, "samples": samples, "batches": batches, "batch_size": batch_size,
        "providers": provider_list,
        "outputs": {name: st.to_dict() for name, st in stats.items()},
        "accuracy": accuracy,
        "latency": latency,
        "graph_optimizations": optimization,
    }
    passed = all(c.passed for c in checks)
    notes = _notes(stats, accuracy, thresholds)
    steps = [] if passed else next_steps(float_model, quant_model, data, labels, data_spec)
    return VerifyResult(passed, metrics, checks, thresholds, notes, steps)


def _notes(stats: dict[str, OutputStats], accuracy: dict | None, t: Thresholds) -> list[str]:
    """Why the verdict is what it is: agreement reported but not gated when labels gave the accuracy drop."""
    notes = []
    agreements = [st for st in stats.values() if st.classifier and st.agreement is not None]
    if accuracy is not None and t.min_agreement is None and agreements:
        a = agreements[0]
        notes.append(f"top-1 agreement {a.agreement:.4f} is reported, not gated: with labels the gate is the "
                     f"accuracy drop ({accuracy['top1_drop'] * 100:+.2f} pt"
                     + (f", limit {t.max_top1_drop * 100:g} pt" if t.max_top1_drop is not None else "")
                     + "); samples where the two models pick different classes cost accuracy only when the float "
                     "model was right (--min-agreement X gates it too)")
    if accuracy is not None and t.max_top1_drop is not None:
        lo, hi = accuracy["top1_drop_ci95"]
        if lo < t.max_top1_drop < hi:
            notes.append(f"the limit ({t.max_top1_drop * 100:g} pt) lies inside the top-1 drop's 95% interval "
                         f"({lo * 100:+.2f} to {hi * 100:+.2f} pt; {accuracy['lost']} sample(s) lost, "
                         f"{accuracy['gained']} gained, of {accuracy['samples']}): the verdict holds for these "
                         "samples; more labeled samples would tell whether it holds for the data they come from")
    return notes


def next_steps(float_model: Any, quant_model: Any, data: Any, labels: Any, data_spec: Any) -> list[str]:
    """What to run after a failed check, with the user's own paths: the analyzer (where quantization hurts),
    then the accuracy-target search (layers back to float until the target holds)."""
    if not isinstance(float_model, (str, Path)) or not isinstance(data, (str, Path)):
        return ["qconvert analyze FLOAT_MODEL --calib CALIB_DIR --eval EVAL_DIR [--labels LABELS] -o analysis",
                "qconvert quantize FLOAT_MODEL --calib CALIB_DIR --target-metric top1|top1-agreement --eval EVAL_DIR "
                "-o OUT_DIR"]

    found = sibling_report(quant_model)
    doc = found[1] if found else {}
    calib = (doc.get("calibration") or {}).get("source")
    calib = calib if calib and Path(calib).exists() else "CALIB_DIR"
    source = (doc.get("binding") or {}).get("float_model") or {}
    model = source.get("path") or str(float_model)
    out = Path(quant_model).parent if isinstance(quant_model, (str, Path)) else Path(".")
    q = _quote
    spec = f" --image-spec {q(data_spec)}" if data_spec else ""
    lab = f" --labels {q(labels)}" if isinstance(labels, (str, Path)) else ""
    metric = "top1" if lab else "agreement"
    return [f"qconvert analyze {q(model)} --calib {q(calib)} --eval {q(data)}{lab}{spec} -o {q(out / 'analysis')}",
            f"qconvert quantize {q(model)} --calib {q(calib)}{spec} --target-metric {metric} --eval {q(data)}{lab} "
            f"--max-drop 0.01 -o {q(out / 'search')}"]


def _quote(x: Any) -> str:
    import shlex

    return shlex.quote(str(x))


def _qdq_nodes(model: onnx.ModelProto) -> int:
    return sum(n.op_type in QUANTIZED_MARKERS for n in model.graph.node)


def _check_pair(float_model: Any, quant_model: Any, float_proto: onnx.ModelProto,
                quant_proto: onnx.ModelProto) -> None:
    """Swapped arguments refused, the same model twice warned about, and the float model the quantized one was
    made from (:func:`converter.binding.check_float_for_qdq`)."""
    fq, qq = _qdq_nodes(float_proto), _qdq_nodes(quant_proto)
    if fq and not qq:
        raise ModelError(f"the models look swapped: the float model {_describe(float_model)} has {fq} "
                         f"quantize/dequantize node(s), the quantized model {_describe(quant_model)} has none",
                         "pass the float model first: qconvert verify FLOAT_MODEL QUANT_MODEL --data DIR")
    paths = isinstance(float_model, (str, Path)) and isinstance(quant_model, (str, Path))
    same = paths and Path(float_model).resolve() == Path(quant_model).resolve()
    if not same and paths and Path(float_model).stat().st_size == Path(quant_model).stat().st_size:
        same = sha256_file(float_model) == sha256_file(quant_model)  # two copies of one file
    if same:
        log.warning("the float and the quantized model are the same file (%s): every metric will be perfect; pass "
                    "the quantized model (<name>.qdq.onnx) second", _describe(quant_model))
        return
    if not qq:
        log.warning("the quantized model %s has no QuantizeLinear/DequantizeLinear node: is it quantized?",
                    _describe(quant_model))

    check_float_for_qdq(float_model, quant_model)


def _target(source: Any, proto: onnx.ModelProto) -> str | bytes:
    """What ORT loads: the path (external data next to it), else the serialized proto."""
    return str(source) if isinstance(source, (str, Path)) else proto  # a proto: create_session handles large ones


def _session(target: str | bytes, source: Any, providers: list[str], threads: int) -> ort.InferenceSession:
    try:
        return create_session(target, providers, "all", threads)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load {_describe(source)}: {str(exc).splitlines()[0]}",
                         "check the model runs in ONNX Runtime (onnxruntime.InferenceSession) on its own") from None


def _run(session: ort.InferenceSession, outputs: list[str], batch: dict[str, np.ndarray], index: int) -> list:
    try:
        return session.run(outputs, batch)
    except Exception as exc:
        raise CalibrationDataError(f"ONNX Runtime failed on batch {index}: {str(exc).splitlines()[0]}",
                                   "check that the data matches the models' input shapes") from None


def _check_same_io(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto) -> None:
    fin = [s.name for s in model_inputs(float_proto)]
    qin = [s.name for s in model_inputs(quant_proto)]
    fout = [o.name for o in float_proto.graph.output]
    qout = {o.name for o in quant_proto.graph.output}
    if sorted(fin) != sorted(qin) or not set(fout) <= qout:
        raise ModelError(f"the models do not have the same inputs/outputs: float {fin} -> {fout}, "
                         f"quantized {qin} -> {sorted(qout)}",
                         "compare a quantized model with the float model it was made from")


def _accuracy(stats: dict[str, OutputStats], labels: np.ndarray, samples: int, source: Any,
              truncated: bool) -> dict[str, Any]:
    out = next((s for s in stats.values() if s.classifier), None)
    if out is None:
        raise UserError("labels were given but no model output is classifier-like ([N, C] scores)",
                        "drop --labels, or verify a model whose output is [N, classes]")
    if len(labels) < samples or (len(labels) > samples and not truncated):
        where = str(source) if isinstance(source, (str, Path)) else "the labels array"
        raise CalibrationDataError(f"{where}: {len(labels)} labels for {samples} samples",
                                   "give exactly one label per sample, in the data's sorted file order (with "
                                   "--max-samples N the first N labels are used)")
    y = labels[:samples]
    fp, qp = np.concatenate(out.float_top1), np.concatenate(out.quant_top1)
    acc_f, acc_q = float((fp == y).mean()), float((qp == y).mean())
    paired = paired_top1(fp == y, qp == y)
    return {"output": out.name, "labels": str(source) if isinstance(source, (str, Path)) else "array",
            "samples": samples, "float": acc_f, "quant": acc_q, "top1_drop": acc_f - acc_q, "lost": paired["lost"],
            "gained": paired["gained"], "top1_drop_ci95": paired["drop_ci95"]}


def _checks(stats: dict[str, OutputStats], accuracy: dict | None, t: Thresholds) -> list[Check]:
    checks = []
    for name, st in stats.items():
        if t.min_cosine is not None:
            checks.append(Check(f"cosine[{name}]", st.cosine_mean, t.min_cosine))
        if t.min_sqnr is not None:
            checks.append(Check(f"sqnr_db[{name}]", st.sqnr_db, t.min_sqnr))
    if t.min_agreement is not None and t.min_agreement != "auto":
        classifiers = [st for st in stats.values() if st.classifier]
        checks += [Check(f"top1_agreement[{st.name}]", st.agreement, t.min_agreement) for st in classifiers]
        if not classifiers:
            checks.append(Check("top1_agreement", None, t.min_agreement))
    if t.max_top1_drop is not None:
        drop = accuracy["top1_drop"] if accuracy else None
        checks.append(Check("top1_drop", drop, t.max_top1_drop, higher_is_better=False))
    return checks


def _describe(model: Any) -> str:
    return str(model) if isinstance(model, (str, Path)) else "<ModelProto>"


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.4g}"


# --- terminal view ------------------------------------------------------------------------------------

def format_report(result: VerifyResult) -> str:
    """The human view of a result: a per-output table, accuracy, latency, checks; last line the verdict."""
    m = result.metrics
    lines = [f"verify {m['quant_model']} against {m['float_model']}",
             f"  on {m['samples']} samples from {m['data']} ({m['batches']} batches, {', '.join(m['providers'])})", ""]
    header = ("output", "shape", "cos mean", "cos min", "SQNR dB", "max abs err", "top-1 agree")
    rows = []
    for name, o in m["outputs"].items():
        sqnr = "inf" if o["identical"] else _fmt(o["sqnr_db"]) if o["sqnr_db"] is not None else "-inf"
        agree = f"{o['top1_agreement'] * 100:.2f}%" if o["top1_agreement"] is not None else "-"
        rows.append((name, "[" + ", ".join(map(str, o["shape"])) + "]", f"{o['cosine_mean']:.5f}",
                     f"{o['cosine_min']:.5f}", sqnr, f"{o['max_abs_error']:.4g}", agree))
    lines += _table(header, rows)
    acc = m["accuracy"]
    if acc:
        lines += ["", f"accuracy on {acc['samples']} labels (output {acc['output']!r}): float {acc['float'] * 100:.2f}%"
                      f"  quantized {acc['quant'] * 100:.2f}%  top-1 drop {acc['top1_drop'] * 100:+.2f} pt (95% "
                      f"interval {acc['top1_drop_ci95'][0] * 100:+.2f} to {acc['top1_drop_ci95'][1] * 100:+.2f} pt: "
                      f"{acc['lost']} lost, {acc['gained']} gained)"]
    if m.get("latency"):
        lines += ["", format_latency(m["latency"], f"per batch of {m['latency']['batch_size']}")]
    bad = {k: g for k, g in (m.get("graph_optimizations") or {}).items() if g and not g["agree"]}
    for which, g in bad.items():
        lines += ["", f"WARNING: ONNX Runtime {g['onnxruntime']}: graph optimizations change the "
                      f"{'quantized' if which == 'quant' else which} model's "
                      f"output {g['output']!r} (first batch: cosine {g['cosine']:.4f} against no optimizations); "
                      "see the README, 'ONNX Runtime versions'"]
    if result.checks:
        lines += ["", "checks:"]
        lines += [f"  {'ok  ' if c.passed and c.applicable else 'n/a ' if not c.applicable else 'FAIL'} "
                  f"{c.describe()}" for c in result.checks]
    if result.notes:
        lines += [""] + [f"note: {n}" for n in result.notes]
    if result.next_steps:
        lines += ["", "next: find where quantization hurts, or let the search keep the sensitive layers in float:"]
        lines += [f"  {s}" for s in result.next_steps]
    lines += ["", result.summary]
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)]
