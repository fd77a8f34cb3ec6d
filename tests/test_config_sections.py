"""Configuration in sections (issue 27): the alias table, flags from the field metadata, one validator, and the
accuracy search from a config file, a batch job file and the Python API."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

import converter
from converter import config as config_module
from converter.cli import build_parser, config_from_args, main
from converter.config import ALIASES, SECTIONS, QuantConfig, SearchConfig
from converter.errors import ConfigError

from .test_search import data, sensitive_model

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture()
def search_dir(tmp_path):
    """The sensitive 4-MatMul model (one layer the search must keep in float) with calibration and eval folders."""
    onnx.save(sensitive_model(), tmp_path / "m.onnx")
    for folder, seed in (("calib", 1), ("eval", 2)):
        (tmp_path / folder).mkdir()
        for i, batch in enumerate(data(seed)):
            np.save(tmp_path / folder / f"s{i}.npy", batch["x"])
    return tmp_path


# --- the alias table and the sections -----------------------------------------------------------------------

def test_every_field_has_a_section_path_and_one_alias_row():
    fields = [f.name for f in dataclasses.fields(QuantConfig) if f.name != "search"]
    assert sorted(ALIASES) == sorted(fields)
    paths = list(ALIASES.values())
    assert len(set(paths)) == len(paths)  # one field per path
    assert {p.split(".")[0] for p in paths} | {"search"} == set(SECTIONS)
    # each registered technique owns one section, techniques.<name>: its switch there, its options below it
    from converter.techniques import REGISTRY

    for technique in REGISTRY:
        paths = [ALIASES[n] for n in technique.config_fields]
        if technique.switch:  # switched on by another field's choice: its options live in that field's section
            sections = {ALIASES[k].split(".")[0] for k, _ in technique.switch}
            assert all(p.split(".")[0] in sections for p in paths), technique.name
        else:
            assert f"techniques.{technique.name}" in paths, technique.name
            # its options below it; shared settings (runtime.device) or another technique's it combines with
            # (AdaQuant reads block reconstruction's iterations) may be read too
            assert all(p.startswith(("techniques.", "runtime.")) for p in paths), (technique.name, paths)


def test_section_views_read_the_fields():
    c = QuantConfig(weight_bits=4, cle=True, cle_relu6="min", bias_correction=False)
    assert c.weights.bits == 4 and c.weights.per_channel is True and c.calibration.method == "minmax"
    assert c.techniques.cle.relu6 == "min" and c.techniques.bias_correction is None
    assert c.techniques.smoothquant.alpha == 0.5 and c.encodings.version == "1.0.0" and c.runtime.threads == 0
    with pytest.raises(AttributeError):
        c.weights.bitz  # noqa: B018
    # a union-typed key takes any of its types from a file (alpha: a number or auto)
    assert QuantConfig.from_dict({"techniques": {"smoothquant": {"alpha": "auto"}}}).smoothquant_alpha == "auto"
    assert QuantConfig.from_dict({"techniques": {"smoothquant": {"alpha": 0.7}}}).techniques.smoothquant.alpha == 0.7


def test_flat_and_sectioned_files_give_one_config_and_byte_identical_outputs(search_dir, caplog):
    flat = _write(search_dir / "flat.yaml", """\
        target: ort-cpu
        weight_bits: 8
        per_channel: false
        calib_method: percentile
        percentile: 99.9
        smoothquant: false
        cle: true
        cle_relu6: keep
        exclude_nodes: [MatMul_0]
        encodings_version: 2.0.0
        """)
    sectioned = _write(search_dir / "sectioned.yaml", """\
        target: {name: ort-cpu, exclude_nodes: [MatMul_0]}
        weights: {bits: 8, per_channel: false}
        calibration: {method: percentile, percentile: 99.9}
        techniques: {smoothquant: null, cle: {relu6: keep}}
        encodings: {version: 2.0.0}
        """)
    config_module._warned.clear()
    with caplog.at_level(logging.WARNING, logger="converter"):
        a = QuantConfig.from_file(flat)
        QuantConfig.from_file(flat)  # the note is logged once per key
    notes = [r.getMessage() for r in caplog.records if "flat spelling" in r.getMessage()]
    assert any("'weight_bits'" in n and "'weights.bits'" in n and "line 2" in n for n in notes)
    assert sum("'weight_bits'" in n for n in notes) == 1
    assert not any("'target'" in n for n in notes)  # target: NAME is the short form, not deprecated
    b = QuantConfig.from_file(sectioned)
    assert a == b and a.per_channel is False and a.cle and not a.smoothquant and a.exclude_nodes == ("MatMul_0",)
    assert QuantConfig.from_dict(a.to_sections()) == a  # the sectioned form round-trips
    hashes = []
    for cfg, out in ((flat, "o1"), (sectioned, "o2")):
        assert main(["quantize", str(search_dir / "m.onnx"), "--calib", str(search_dir / "calib"), "-o",
                     str(search_dir / out), "--config", str(cfg), "-q"]) == 0
        hashes.append([(search_dir / out / f"m{s}").read_bytes() for s in (".qdq.onnx", ".encodings")])
    assert hashes[0] == hashes[1]


@pytest.mark.parametrize("text, message, line", [
    ("weights:\n  bits: 4\n  bitz: 4\n", "unknown config key 'weights.bitz'", 3),
    ("techniques:\n  cle: 3\n", "'techniques.cle'", 2),
    ("weights: 4\n", "config section 'weights'", 1),
    ("weight_bits: 4\nweights: {bits: 8}\n", "sets 'weights.bits' again", 2),
    ("calibration:\n  percentile: high\n", "'percentile'", 2),
    ("search:\n  metric: cosine\n  eval: e\n  max_dorp: 0.1\n", "unknown config key 'search.max_dorp'", 4),
    ("search:\n  metric: cosine\n", "needs evaluation data", None),
])
def test_one_validator_names_file_and_line(tmp_path, text, message, line):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        QuantConfig.from_file(path)
    assert message in err.value.message and str(path) in err.value.message
    if line:
        assert f"line {line}" in err.value.message


def test_job_file_search_errors_name_the_line(tmp_path):
    from converter.batch import load_job_file

    (tmp_path / "m.onnx").write_bytes(b"")
    path = _write(tmp_path / "jobs.yaml", """\
        jobs:
          - model: m.onnx
            calib: calib
            search:
              metric: cosine
              eval: eval
              strategy: fastest
        """)
    with pytest.raises(ConfigError, match=r"config key 'search.strategy' in .*jobs.yaml.*line 7 must be one of gallop"):
        load_job_file(path)
    path.write_text(path.read_text().replace("strategy: fastest", "max_dorp: 1"))
    with pytest.raises(ConfigError, match=r"'search.max_dorp' in .*jobs.yaml.*line 7"):
        load_job_file(path)


# --- flags and help from the field metadata ----------------------------------------------------------------------

def _quantize_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["quantize"]


def test_every_config_flag_comes_from_a_field():
    p = _quantize_parser()
    by_flag = {s: a for a in p._actions for s in a.option_strings}
    for cls in (QuantConfig, SearchConfig):
        for f in dataclasses.fields(cls):
            for flag in f.metadata.get("flags", ()):
                assert flag in by_flag, flag
                assert by_flag[flag].dest == f.metadata["cli"].get("dest", f.name)
    # and nothing besides them and the command's own arguments
    own = {"model", "config", "calib", "calib_spec", "output_dir", "name", "help", "verbose", "quiet"}
    dests = {f.metadata["cli"].get("dest", f.name) for cls in (QuantConfig, SearchConfig)
             for f in dataclasses.fields(cls) if f.metadata.get("flags")}
    assert {a.dest for a in p._actions} - dests == own
    assert "(default: 16)" in p.format_help().replace("\n", " ").replace("  ", " ")  # from the field's default


def test_flags_set_the_fields_and_override_the_config_file():
    base = QuantConfig(weight_bits=4, custom_op_libraries=("a.so",), search=SearchConfig(metric="cosine", eval="e"))
    args = build_parser().parse_args(["quantize", "m", "--calib", "c", "-o", "o", "--weight-bits", "8",
                                      "--per-tensor", "--no-smoothquant", "--exclude-nodes", "a, b",
                                      "--custom-op-library", "b.so", "--max-drop", "0.02", "--no-give-back",
                                      "--evaluate", "f.py:fn"])
    c = config_from_args(args, base)
    assert (c.weight_bits, c.per_channel, c.smoothquant, c.exclude_nodes) == (8, False, False, ("a", "b"))
    assert c.custom_op_libraries == ("a.so", "b.so")  # appended to the file's
    assert c.search.max_drop == 0.02 and c.search.give_back is False and c.search.evaluator == "f.py:fn"
    assert c.search.eval == "e"  # the file's search keys the command line leaves alone
    untouched = config_from_args(build_parser().parse_args(["quantize", "m", "--calib", "c", "-o", "o"]), base)
    assert untouched == base


def test_readme_config_table_lists_every_field_and_its_flags():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [r for r in text.splitlines() if r.startswith("| `") and "|" in r[1:]]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for key in re.findall(r"`([a-z0-9_]+)`", cells[0]):
            table[key] = cells[1] if len(cells) > 1 else ""
    missing, wrong = [], []
    for f in dataclasses.fields(QuantConfig):
        if f.name == "search":
            continue
        if f.name not in table:
            missing.append(f.name)
            continue
        for flag in f.metadata["flags"][:1]:
            shown = flag if f.metadata["cli"].get("action") != "BooleanOptionalAction" else "-" + flag.lstrip("-")
            if flag not in table[f.name] and shown.replace("-", "") not in table[f.name].replace("-", ""):
                wrong.append(f"{f.name}: {flag}")
    assert not missing, f"QuantConfig fields the README's config table lacks: {missing}"
    assert not wrong, f"README rows without their field's flag: {wrong}"
    para = text[text.index("**The `search:` section**"):]
    para = " ".join(para[:para.index("\n\n")].split())
    for f in dataclasses.fields(SearchConfig):
        flags = f.metadata["flags"]
        assert (f"`{f.name}` `{flags[0]}`" if flags else f"`{f.name}`") in para, \
            f"README's search paragraph lacks {f.name}"


# --- the search everywhere -----------------------------------------------------------------------------------

SEARCH_CONFIG = """\
    techniques: {smoothquant: null}
    search:
      metric: cosine
      eval: eval
      max_latency_ratio: 1000
      %s
    """


def test_config_file_with_a_search_section_runs_the_search(search_dir, capsys):
    met = _write(search_dir / "met.yaml", SEARCH_CONFIG % "max_drop: 0.001")
    unmet = _write(search_dir / "unmet.yaml", SEARCH_CONFIG % "min_metric: 1.5")
    args = ["quantize", str(search_dir / "m.onnx"), "--calib", str(search_dir / "calib")]
    assert main(args + ["-o", str(search_dir / "out"), "--config", str(met)]) == 0
    out = capsys.readouterr().out
    assert "accuracy target met" in out
    s = json.loads((search_dir / "out" / "m.report.json").read_text())["search"]
    assert s["met"] and [x["name"] for x in s["fallback_layers"]] == ["MatMul_3"]
    assert s["final_metric"] >= s["threshold"] == pytest.approx(s["baseline_metric"] - 0.001)
    assert s["latency"]["final_vs_fp32"] > 0
    # the command line overrides the file's search keys: an unreachable floor exits 1, the best model written
    assert main(args + ["-o", str(search_dir / "out2"), "--config", str(met), "--min-metric", "1.5"]) == 1
    assert main(args + ["-o", str(search_dir / "out3"), "--config", str(unmet)]) == 1
    assert "not met" in capsys.readouterr().err
    s = json.loads((search_dir / "out3" / "m.report.json").read_text())["search"]
    assert s["met"] is False and s["threshold"] == 1.5 and (search_dir / "out3" / "m.qdq.onnx").is_file()


def test_batch_jobs_run_the_search_met_and_unmet(search_dir, capsys):
    jobs = _write(search_dir / "jobs.yaml", """\
        defaults: {techniques: {smoothquant: null}}
        output_dir: out
        jobs:
          - name: met
            model: m.onnx
            calib: calib
            search: {metric: cosine, eval: eval, max_drop: 0.001, max_latency_ratio: 1000}
          - name: unmet
            model: m.onnx
            calib: calib
            search: {metric: cosine, eval: eval, min_metric: 1.5, max_latency_ratio: 1000}
        """)
    assert main(["batch", str(jobs)]) == 1
    printed = capsys.readouterr().out
    assert "met, 1 float" in printed and "NOT met" in printed
    summary = {j["name"]: j for j in json.loads((search_dir / "out" / "summary.json").read_text())["jobs"]}
    ok, bad = summary["met"], summary["unmet"]
    assert ok["status"] == "ok" and ok["search"]["met"] is True and ok["search"]["float_layers"] == ["MatMul_3"]
    assert ok["search"]["final_metric"] >= ok["search"]["threshold"] and ok["search"]["latency_vs_fp32"] > 0
    assert bad["status"] == "failed" and bad["stage"] == "search" and bad["search"]["met"] is False
    assert bad["search"]["final_metric"] < 1.5 and "not met" in bad["error"]
    assert (search_dir / "out" / "unmet" / "unmet.qdq.onnx").is_file()  # the best model found, still written
    report = json.loads((search_dir / "out" / "met" / "met.report.json").read_text())
    assert report["search"]["final_metric"] == ok["search"]["final_metric"]
    rows = {r["job"]: r for r in csv.DictReader((search_dir / "out" / "summary.csv").open())}
    assert rows["met"]["search_met"] == "True" and rows["met"]["float_layers"] == "1"
    assert rows["unmet"]["search_met"] == "False"


def test_python_api_takes_the_search_section(search_dir):
    config = QuantConfig(smoothquant=False, search=SearchConfig(metric="cosine", eval=str(search_dir / "eval"),
                                                                max_drop=0.001, max_latency_ratio=1000))
    res = converter.quantize(str(search_dir / "m.onnx"), str(search_dir / "calib"), config,
                             output_dir=search_dir / "api")
    assert res.report["search"]["met"] and [x["name"] for x in res.report["search"]["fallback_layers"]] == ["MatMul_3"]
    assert res.report["config"]["search"]["metric"] == "cosine"
    with pytest.raises(converter.TargetNotMetError):
        converter.quantize(str(search_dir / "m.onnx"), str(search_dir / "calib"),
                           config.replace(search=config.search.replace(min_metric=1.5)), output_dir=search_dir / "x")


def test_job_file_sections_merge_key_by_key(tmp_path):
    """A job's config overrides the defaults key by key, whichever spelling either uses."""
    from converter.batch import load_job_file

    (tmp_path / "m.onnx").write_bytes(b"")
    path = _write(tmp_path / "jobs.yaml", """\
        defaults: {weights: {bits: 4, per_channel: false}, calib_method: percentile}
        jobs:
          - {name: a, model: m.onnx, calib: c, config: {weights: {per_channel: true}}}
          - {name: b, model: m.onnx, calib: c, config: {weight_bits: 8, calibration: {method: entropy}}}
        """)
    a, b = load_job_file(path).jobs
    assert (a.config.weight_bits, a.config.per_channel, a.config.calib_method) == (4, True, "percentile")
    assert (b.config.weight_bits, b.config.per_channel, b.config.calib_method) == (8, False, "entropy")
    assert a.config.search is None
