"""``report.html``: one self-contained page drawn from ``report.json`` (no server, no network).

Plots are inline SVG drawn here (no plotting dependency); tables are plain HTML sorted by a few
lines of inline JavaScript (click a header; numeric cells sort by their ``data-v`` value, with
missing values last). The page only reads the report dict, so it can be re-rendered from a saved
``report.json`` with :func:`render_html`.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, Iterable

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:16px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c4cad6}nav{padding:6px 28px;background:#e8ebf0;position:sticky;top:0;z-index:2}
nav a{margin-right:16px;color:#2b4c9b;text-decoration:none}main{padding:8px 28px 40px}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 18px;margin:16px 0}
h2{font-size:18px;margin:4px 0 10px}.cards{display:flex;flex-wrap:wrap;gap:16px}
.card{border:1px solid #dde1e8;border-radius:6px;padding:10px 14px;min-width:240px;background:#fbfcfd}
.pass{color:#11793b;font-weight:600}.fail{color:#b3261e;font-weight:600}
table{border-collapse:collapse;font-size:12.5px;width:100%}
th,td{border-bottom:1px solid #e5e8ee;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#eef1f5;cursor:pointer;user-select:none}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
td.l,th.l{text-align:left}td.name{max-width:360px;overflow:hidden;text-overflow:ellipsis}
td.ops{max-width:190px;overflow:hidden;text-overflow:ellipsis}
.scroll{overflow-x:auto}.bad{background:#f8d3d0}.warn{background:#fbe7c6}.meh{background:#fdf6d8}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:10px}
.hist{border:1px solid #e5e8ee;border-radius:6px;padding:6px;background:#fbfcfd;font-size:11.5px}
.hist b{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
ol li{margin:2px 0}code{font-size:12px}.muted{color:#6b7385}svg text{font:10px system-ui,sans-serif}
"""

_JS = r"""
function cellValue(row, i) {
  const c = row.cells[i];
  if (c.dataset.v === undefined) return c.textContent.trim().toLowerCase();
  const v = parseFloat(c.dataset.v);
  return isNaN(v) ? null : v;
}
document.querySelectorAll('table.sortable th').forEach((th, i) => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0];
  const dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
  table.querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = dir;
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellValue(a, i), y = cellValue(b, i);
    if (x === null || y === null) return (x === null) - (y === null);
    const c = typeof x === 'number' && typeof y === 'number' ? (x === y ? 0 : x < y ? -1 : 1)
                                                          : String(x).localeCompare(String(y));
    return dir === 'asc' ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
}));
// report.html#sort=TABLE:COLUMN[:desc] opens with that table sorted (links, and the headless-browser test)
const m = location.hash.match(/^#sort=([\w-]+):(\d+)(:desc)?$/);
if (m) {
  const th = document.querySelectorAll('#' + m[1] + ' th')[+m[2]];
  if (th) { th.click(); if (m[3]) th.click(); }
}
"""


def num(v: Any) -> float | None:
    """A report value as a float (the JSON strings "inf"/"-inf"/"nan" included), or None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    return None


def fmt(v: Any, digits: int = 4, kind: str = "g") -> str:
    x = num(v)
    if x is None:
        return ""
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if kind == "f":
        return f"{x:.{digits}f}"
    if kind == "%":
        return f"{100 * x:.{digits}f}%"
    return f"{x:.{digits}g}"


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _sqnr_class(v: Any) -> str:
    x = num(v)
    if x is None or math.isnan(x):
        return ""
    return "bad" if x < 10 else "warn" if x < 20 else "meh" if x < 30 else ""


def td(v: Any, digits: int = 4, kind: str = "g", cls: str = "") -> str:
    x = num(v)
    data = "" if x is None else ("Infinity" if x == math.inf else "-Infinity" if x == -math.inf else repr(x))
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-v="{data}">{fmt(v, digits, kind)}</td>'


def td_text(s: Any, cls: str = "l") -> str:
    return f'<td class="{cls}" title="{esc(s)}">{esc(s)}</td>'


def table(table_id: str, headers: list[tuple[str, str]], rows: Iterable[str]) -> str:
    head = "".join(f'<th class="{c}" title="{esc(t)}">{esc(h)}</th>' for h, c, t in
                   ((h[0], "l" if h[1] == "l" else "", h[2] if len(h) > 2 else h[0]) for h in headers))
    return (f'<div class="scroll"><table id="{table_id}" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


# --- SVG ---------------------------------------------------------------------------------------------

def svg_histogram(hist: dict[str, Any], enc_min: Any, enc_max: Any, width: int = 280, height: int = 92) -> str:
    """Bars on a log scale; the encoding range as red dashed lines, zero as a grey line."""
    counts = hist["counts"]
    lo, hi = num(hist["lo"]), num(hist["hi"])
    pad_b, plot_h = 14, height - 18
    top = max(math.log1p(c) for c in counts) or 1.0
    bw = width / len(counts)
    path = []
    for i, c in enumerate(counts):
        if c:
            h = plot_h * math.log1p(c) / top
            path.append(f"M{i * bw:.1f} {height - pad_b:.1f}h{bw * 0.92:.1f}v{-h:.1f}h{-bw * 0.92:.1f}z")

    def x_of(v: float) -> float:
        return (v - lo) / (hi - lo) * width if hi > lo else 0.0

    marks = []
    if lo < 0 < hi:
        marks.append(f'<line x1="{x_of(0):.1f}" x2="{x_of(0):.1f}" y1="2" y2="{height - pad_b}" stroke="#999"/>')
    for v in (num(enc_min), num(enc_max)):
        if v is not None and math.isfinite(v):
            x = min(max(x_of(v), 1), width - 1)
            marks.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="2" y2="{height - pad_b}" stroke="#d62728" '
                         f'stroke-width="1.6" stroke-dasharray="4 2"/>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<path d="{"".join(path)}" fill="#4c78a8"/>{"".join(marks)}'
            f'<text x="0" y="{height - 2}">{esc(fmt(lo, 3))}</text>'
            f'<text x="{width}" y="{height - 2}" text-anchor="end">{esc(fmt(hi, 3))}</text></svg>')


def svg_line_chart(series: dict[str, list[float | None]], colors: dict[str, str], labels: list[str],
                   y_label: str, width: int = 1100, height: int = 246, x_ticks: list[str] | None = None) -> str:
    """One polyline per series over the layer index; +inf is drawn at the top, with a tooltip per point.

    The x axis is labelled with ``x_ticks`` (default: the layer index), the layer table's # column."""
    finite = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not finite:
        return '<p class="muted">no data</p>'
    y0, y1 = min(finite), max(finite)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 1, y1 + 1
    left, right, top, bottom = 70, 10, 10, 38
    pw, ph = width - left - right, height - top - bottom
    n = max(len(labels), 2)

    def xy(i: int, v: float) -> tuple[float, float]:
        v = y1 if v == math.inf else y0 if v == -math.inf else v
        return left + pw * i / (n - 1), top + ph * (1 - (v - y0) / (y1 - y0))

    parts = []
    decimals = max(0, min(8, math.ceil(-math.log10(y1 - y0)) + 1))
    for k in range(5):
        v = y0 + (y1 - y0) * k / 4
        _, y = xy(0, v)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6eb"/>'
                     f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{esc(fmt(v, decimals, "f"))}</text>')
    step = max(1, math.ceil(len(labels) / 12))
    ticks = sorted(set(range(0, len(labels), step)) | ({len(labels) - 1} if labels else set()))
    axis_y = top + ph
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{axis_y:.1f}" y2="{axis_y:.1f}" stroke="#9aa3ad"/>')
    for i in ticks:
        x, _ = xy(i, y0)
        parts.append(f'<line class="xtick" x1="{x:.1f}" x2="{x:.1f}" y1="{axis_y:.1f}" y2="{axis_y + 4:.1f}" '
                     f'stroke="#9aa3ad"/><text class="xlabel" x="{x:.1f}" y="{axis_y + 15:.1f}" text-anchor="middle">'
                     f'<title>{esc(labels[i])}</title>{esc(x_ticks[i] if x_ticks else i)}</text>')
    for name, values in series.items():
        pts = [(i, v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in pts))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colors[name]}" stroke-width="1.5"/>')
        for i, v in pts:
            x, y = xy(i, v)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.4" fill="{colors[name]}">'
                         f'<title>{esc(labels[i])}: {esc(name)} {esc(fmt(v, 4))}</title></circle>')
    legend = "".join(f'<tspan fill="{colors[k]}" dx="12">■ {esc(k)}</tspan>' for k in series)
    parts.append(f'<text x="{left}" y="{height - 4}">{esc(y_label)} (y) vs layer (x: graph position, the # '
                 f'column of the layer table){legend}</text>')
    return f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">{"".join(parts)}</svg>'


def svg_bars(items: list[tuple[str, float]], lo: float, hi: float, width: int = 420) -> str:
    row, label_w = 22, 130
    height = row * len(items) + 4
    parts = []
    for k, (name, v) in enumerate(items):
        frac = 0.0 if hi <= lo else max(0.0, min(1.0, (v - lo) / (hi - lo)))
        y = k * row + 2
        parts.append(f'<text x="0" y="{y + 14}">{esc(name)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{(width - label_w - 70) * frac:.1f}" height="{row - 6}" '
                     f'fill="#4c78a8"/><text x="{width - 64}" y="{y + 14}">{esc(fmt(v, 6))}</text>')
    return f'<svg width="{width}" height="{height}" role="img">{"".join(parts)}</svg>'


def svg_sparkline(values: list[Any], width: int = 220, height: int = 28) -> str:
    xs = [num(v) for v in values]
    finite = [v for v in xs if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return ""
    y0, y1 = min(finite), max(finite)
    span = (y1 - y0) or 1.0
    pts = []
    for i, v in enumerate(xs):
        if v is None or math.isnan(v):
            continue
        v = y1 if v == math.inf else y0 if v == -math.inf else v
        pts.append(f"{width * i / max(len(xs) - 1, 1):.1f},{height - 2 - (height - 4) * (v - y0) / span:.1f}")
    return (f'<svg width="{width}" height="{height}" role="img"><polyline points="{" ".join(pts)}" fill="none" '
            f'stroke="#4c78a8" stroke-width="1"/></svg>')


# --- sections ----------------------------------------------------------------------------------------

def _summary(r: dict[str, Any]) -> str:
    cards = []
    ev = r["evaluation"]
    if "sanity" in r:
        s = r["sanity"]
        status = '<span class="pass">PASSED</span>' if s["passed"] else '<span class="fail">FAILED</span>'
        cards.append(f'<div class="card" id="sanity"><h3>FP32 sanity {status}</h3>'
                     f'preprocessed model: output cosine {fmt(s["preprocessed"]["output_cosine"], 8)}, '
                     f'max |diff| {fmt(s["preprocessed"]["max_abs_diff"], 3)}<br>'
                     f'QDQ with quantizers bypassed: cosine {fmt(s["quantizers_bypassed"]["output_cosine"], 8)}, '
                     f'max |diff| {fmt(s["quantizers_bypassed"]["max_abs_diff"], 3)}</div>')
    if "split" in r:
        s = r["split"]
        items = [("FP32", num(s["fp32"])), ("weights only", num(s["weights_only"])),
                 ("activations only", num(s["activations_only"])), ("all quantized", num(s["all_quantized"]))]
        lo = min(v for _, v in items)
        lo = lo - 0.1 * (max(v for _, v in items) - lo) - 1e-9
        cos = s.get("output_cosine")
        extra = ""
        if cos:
            extra = ("<p>output cosine vs FP32: " + ", ".join(
                f'{esc(k.replace("_", " "))} {fmt(cos[k], 6)}' for k in ("weights_only", "activations_only",
                                                                          "all_quantized")) + "</p>")
        cards.append(f'<div class="card" id="split"><h3>Weights vs activations ({esc(ev["metric"])}, '
                     f'{ev["samples"]} samples)</h3>{svg_bars(items, lo, max(v for _, v in items))}{extra}'
                     f'<p><b>{esc(s["verdict"])}</b></p></div>')
    rows = {x["name"]: x for x in r["layers"]}
    worst = []
    for name in r["worst_layers"]:
        x = rows[name]
        extra = []
        if "sensitivity" in x:
            extra.append(f'only-this-quantized {fmt(x["sensitivity"]["only_this_quantized"], 6)}')
        if "shadow" in x:
            extra.append(f'shadow SQNR {fmt(x["shadow"]["sqnr_db"], 3)} dB')
        worst.append(f'<li><code>{esc(name)}</code> ({esc(x["label"])}) {esc(", ".join(extra))}</li>')
    cards.append(f'<div class="card" id="worst"><h3>Worst layers</h3><ol>{"".join(worst)}</ol></div>')
    if "recommendations" in r:
        items = []
        for rec in r["recommendations"]:
            ev_text = ", ".join(f"{k} {v}" for k, v in rec["evidence"].items() if v is not None)
            items.append(f'<li><b>{esc(rec["technique"])}</b>: <code>{esc(rec["flag"])}</code><br>'
                         f'{esc(rec["reason"])}<br><small>evidence: {esc(ev_text)}</small></li>')
        a = r.get("assessment") or {}
        none = (f"none, nothing to fix: INT8 {a['metric']} {fmt(a['int8'], 6)} vs FP32 {fmt(a['fp32'], 6)}, drop "
                f"{fmt(a['drop'], 6)} within the tolerance {fmt(a['tolerance'], 6)} ({a['tolerance_from']})"
                if a.get("nothing_to_fix") else "none: no evidence for a technique")
        body = f'<ol>{"".join(items)}</ol>' if items else f"<p>{esc(none)}</p>"
        cards.append(f'<div class="card" id="recommendations"><h3>What to try (in order)</h3>{body}</div>')
    return f'<section><h2>Summary</h2><div class="cards">{"".join(cards)}</div></section>'


def _charts(r: dict[str, Any]) -> str:
    layers = r["layers"]
    labels = [f'{x["name"]} ({x["label"]})' for x in layers]
    ticks = [str(x["position"]) for x in layers]
    parts = []
    sq = {"propagated": [num(x.get("propagated", {}).get("sqnr_db")) for x in layers],
          "shadow": [num(x.get("shadow", {}).get("sqnr_db")) for x in layers]}
    sq = {k: v for k, v in sq.items() if any(e is not None for e in v)}
    if sq:
        parts.append(svg_line_chart(sq, {"propagated": "#d62728", "shadow": "#4c78a8"}, labels, "SQNR dB",
                                    x_ticks=ticks))
    if any("sensitivity" in x for x in layers):
        sens = {"only this quantized": [num(x.get("sensitivity", {}).get("only_this_quantized")) for x in layers],
                "only this float": [num(x.get("sensitivity", {}).get("only_this_float")) for x in layers]}
        parts.append(svg_line_chart(sens, {"only this quantized": "#d62728", "only this float": "#2ca02c"}, labels,
                                    r["evaluation"]["layer_metric"], x_ticks=ticks))
    return f'<section id="charts"><h2>Per-layer error along the network</h2>{"".join(parts)}</section>'


_LAYER_HEADERS = [
    ("#", "", "graph position of the layer's first node"), ("layer", "l"), ("ops", "l"),
    ("only this quantized", "", "metric with only this layer's quantizers enabled (lower = more sensitive)"),
    ("only this float", "", "metric with only this layer's quantizers disabled (higher = more gain)"),
    ("prop. SQNR dB", "", "whole QDQ model vs float, at this layer's output"), ("prop. cosine", ""),
    ("prop. MSE", ""), ("shadow SQNR dB", "", "this layer alone, float inputs fake-quantized"),
    ("shadow cosine", ""), ("shadow MSE", ""), ("enc min", ""), ("enc max", ""), ("obs min", ""), ("obs max", ""),
    ("clipped", "", "fraction of calibration values beyond the encoding range by more than half a step"),
    ("weight SQNR dB", ""), ("worst channel SQNR dB", ""),
]


def _layer_table(r: dict[str, Any]) -> str:
    rows = []
    for x in r["layers"]:
        sens, prop, shad = x.get("sensitivity", {}), x.get("propagated", {}), x.get("shadow", {})
        act, w = x.get("activation", {}), x.get("weight", {})
        rows.append(
            f'<tr id="layer-{esc(x["name"])}">{td(x["position"])}{td_text(x["name"], "l name")}{td_text(x["label"], "l ops")}'
            f'{td(sens.get("only_this_quantized"), 6, "f")}{td(sens.get("only_this_float"), 6, "f")}'
            f'{td(prop.get("sqnr_db"), 2, "f", _sqnr_class(prop.get("sqnr_db")))}{td(prop.get("cosine"), 6, "f")}'
            f'{td(prop.get("mse"), 3)}{td(shad.get("sqnr_db"), 2, "f", _sqnr_class(shad.get("sqnr_db")))}'
            f'{td(shad.get("cosine"), 6, "f")}{td(shad.get("mse"), 3)}{td(act.get("encoding_min"), 4)}'
            f'{td(act.get("encoding_max"), 4)}{td(act.get("observed_min"), 4)}{td(act.get("observed_max"), 4)}'
            f'{td(act.get("clipped_fraction"), 3, "%")}{td(w.get("sqnr_db"), 2, "f", _sqnr_class(w.get("sqnr_db")))}'
            f'{td(w.get("min_channel_sqnr_db"), 2, "f", _sqnr_class(w.get("min_channel_sqnr_db")))}</tr>')
    return (f'<section id="layers-section"><h2>Layers ({len(rows)})</h2><p class="muted">Click a header to sort. '
            f'SQNR cells: red &lt; 10 dB, orange &lt; 20 dB, yellow &lt; 30 dB.</p>'
            f'{table("layers", _LAYER_HEADERS, rows)}</section>')


def _histograms(r: dict[str, Any]) -> str:
    order = {n: i for i, n in enumerate(r["worst_layers"])}
    layers = sorted((x for x in r["layers"] if "histogram" in x.get("activation", {})),
                    key=lambda x: (order.get(x["name"], len(order)), x["position"]))
    cards = []
    for x in layers:
        a = x["activation"]
        cards.append(f'<div class="hist"><b title="{esc(a["tensor"])}">{esc(x["name"])}</b>'
                     f'<span class="muted">{esc(x["label"])} → {esc(a["tensor"])}</span><br>'
                     f'{svg_histogram(a["histogram"], a.get("encoding_min"), a.get("encoding_max"))}<br>'
                     f'range [{esc(fmt(a.get("encoding_min"), 4))}, {esc(fmt(a.get("encoding_max"), 4))}], '
                     f'clipped {esc(fmt(a.get("clipped_fraction"), 3, "%"))}</div>')
    if not cards:
        return ""
    return (f'<section id="histograms"><h2>Activation histograms (layer outputs, worst layers first)</h2>'
            f'<p class="muted">Calibration histogram, log counts; red dashed lines: the encoding range; grey: zero.</p>'
            f'<div class="grid">{"".join(cards)}</div></section>')


def _weights(r: dict[str, Any]) -> str:
    rows = []
    for x in r["layers"]:
        w = x.get("weight")
        if not w:
            continue
        rows.append(f'<tr>{td_text(x["name"], "l name")}{td_text(w["tensor"], "l name")}'
                    f'{td_text("x".join(map(str, w["shape"])))}{td_text("yes" if w["per_channel"] else "no")}'
                    f'{td(w["sqnr_db"], 2, "f", _sqnr_class(w["sqnr_db"]))}'
                    f'{td(w.get("min_channel_sqnr_db"), 2, "f", _sqnr_class(w.get("min_channel_sqnr_db")))}'
                    f'{td(w.get("worst_channel"))}{td(w.get("mean_channel_sqnr_db"), 2, "f")}'
                    f'{td(len(w.get("negligible_channels", [])))}'
                    f'<td class="l">{svg_sparkline(w.get("channel_sqnr_db", []))}</td></tr>')
    if not rows:
        return ""
    headers = [("layer", "l"), ("weight", "l"), ("shape", "l"), ("per channel", "l"), ("SQNR dB", ""),
               ("worst channel SQNR dB", ""), ("worst channel", ""), ("mean channel SQNR dB", ""),
               ("negligible channels", "", "max |w| below 1e-4 of the layer's median (dead channels): left out of "
                "the worst/mean figures"), ("per-channel SQNR", "l")]
    return f'<section id="weights"><h2>Weights</h2>{table("weight-table", headers, rows)}</section>'


def _details(r: dict[str, Any]) -> str:
    plan = r.get("plan", {})
    floats = ", ".join(plan.get("float_nodes", [])) or "none"
    return (f'<section id="details"><h2>Details</h2><p><b>Nodes kept in float:</b> {esc(floats)}</p>'
            f'<p><b>Timings:</b> {esc(json.dumps(r.get("timings", {})))}</p>'
            f'<details><summary>configuration</summary><pre>{esc(json.dumps(r.get("config"), indent=1))}\n'
            f'{esc(json.dumps(r.get("analysis_config"), indent=1))}</pre></details></section>')


def render_html(report: dict[str, Any]) -> str:
    ev, cal, cfg = report["evaluation"], report["calibration"], report["config"]
    title = f'Quantization analysis: {report["model"].get("source") or "model"}'
    sub = (f'target {esc(cfg["target"])}, {esc(cal["method"])} calibration on {cal["samples"]} samples; '
           f'metric {esc(ev["metric"])} on {ev["samples"]} samples, per-layer {esc(ev["layer_metric"])} on '
           f'{ev["layer_samples"]}; {report["model"]["layers"]} layers; converter {esc(report["converter_version"])}')
    nav = ('<nav><a href="#sanity">summary</a><a href="#charts">charts</a><a href="#layers-section">layers</a>'
           '<a href="#histograms">histograms</a><a href="#weights">weights</a><a href="#details">details</a></nav>')
    body = "".join([_summary(report), _charts(report), _layer_table(report), _histograms(report), _weights(report),
                    _details(report)])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{_CSS}</style></head><body><header><h1>{esc(title)}</h1><p>{sub}</p></header>{nav}'
            f'<main>{body}</main><script>{_JS}</script></body></html>\n')
