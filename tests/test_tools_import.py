"""tools/: every script is a module of one package that imports without work and without editing sys.path, answers
``python -m tools.X --help``, and is listed in tools/README.md with that command; tools/benchlib's pieces measure what
they say on small models built here (no assets: every assets test points the fallback at a missing folder)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization import QuantType

import tools
import tools.benchlib
from tools import any_model_bench
from tools.benchlib import (
    AssetsError,
    ListReader,
    assets_root,
    compare_latency,
    compute_int8_share,
    latency_stats,
    ort_quantize_static,
    session,
)
from tools.benchlib import assets as bench_assets
from tools.benchlib.tasks import ROOT, child_env

MODULES = sorted(m.name for m in pkgutil.walk_packages(tools.benchlib.__path__, "tools.benchlib."))
TOOLS = sorted(m.name for m in pkgutil.iter_modules(tools.__path__, "tools.") if not m.ispkg)


@pytest.fixture
def no_assets(monkeypatch, tmp_path):
    """Neither --assets nor $CONVERTER_ASSETS, and the fallback folder missing: tests never read the real assets."""
    monkeypatch.delenv("CONVERTER_ASSETS", raising=False)
    monkeypatch.setattr(bench_assets, "FALLBACK", tmp_path / "no-fallback")
    return tmp_path / "no-fallback"


def test_every_module_imports():
    assert {"tools.benchlib.assets", "tools.benchlib.measure", "tools.benchlib.ort_baseline",
            "tools.benchlib.tasks"} <= set(MODULES)
    assert len(TOOLS) >= 25 and {"tools.bench_e2e", "tools.any_model_bench", "tools.aimet_interop"} <= set(TOOLS)
    for name in MODULES + TOOLS:
        module = importlib.import_module(name)
        assert module.__doc__, f"{name} has no docstring"


def test_importing_every_tool_does_no_work():
    """In a fresh interpreter with no assets anywhere: importing every tool opens no ONNX Runtime session, starts
    no process, reads nothing under the assets folder and adds nothing to sys.path."""
    code = textwrap.dedent(f"""
        import builtins, subprocess, sys
        import onnxruntime as ort
        def refuse(*a, **k):
            raise AssertionError("work at import time")
        ort.InferenceSession.__init__ = refuse
        subprocess.run = subprocess.Popen = refuse
        real_open = builtins.open
        def guarded_open(file, *a, **k):
            assert "assets" not in str(file), file
            return real_open(file, *a, **k)
        builtins.open = guarded_open
        before = list(sys.path)
        import importlib
        for name in {TOOLS!r}:
            importlib.import_module(name)
        # onnxruntime.transformers appends its own folder when imported; any other change is a tool's edit
        changed = [p for p in set(sys.path) ^ set(before) if not p.endswith("onnxruntime/transformers")]
        assert not changed, changed
        print("ok", len({TOOLS!r}))
    """)
    env = {**child_env(), "CONVERTER_ASSETS": "/nonexistent/assets"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", str(len(TOOLS))]


def _sys_path_edits(path: Path) -> list[int]:
    """Lines of ``path`` whose code touches ``sys.path`` (docstrings and comments do not count)."""
    tree = ast.parse(path.read_text())
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
            and isinstance(n.value, ast.Name) and n.value.id == "sys"]


def test_no_tool_edits_sys_path(tmp_path):
    files = sorted((ROOT / "tools").rglob("*.py"))
    assert len(files) >= 30
    assert {str(f.relative_to(ROOT)): _sys_path_edits(f) for f in files if _sys_path_edits(f)} == {}
    bad = tmp_path / "bad.py"  # the check itself finds an edit
    bad.write_text('"""sys.path in a docstring"""\nimport sys\n\nsys.path.insert(0, "x")  # sys.path\n')
    assert _sys_path_edits(bad) == [4]


def test_every_tool_answers_help():
    """``python -m tools.X --help`` for every tool: each module run as ``__main__`` the way ``-m`` runs it
    (``runpy.run_module``), all in one child interpreter so the imports are paid once; exit 0 and a usage text."""
    code = textwrap.dedent(f"""
        import contextlib, io, json, runpy, sys
        out = {{}}
        for name in {TOOLS!r}:
            sys.argv = [name, "--help"]
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                    runpy.run_module(name, run_name="__main__", alter_sys=True)
                code = "no exit"
            except SystemExit as exc:
                code = exc.code
            except BaseException as exc:
                code = repr(exc)
            out[name] = [code, buf.getvalue()]
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(TOOLS)
    failed = {name: (rc, text[-300:]) for name, (rc, text) in results.items()
              if rc not in (0, None) or "usage:" not in text}
    assert failed == {}


def test_readme_lists_every_tool_with_its_command():
    text = (ROOT / "tools" / "README.md").read_text()
    listed = set(re.findall(r"python -m (tools\.[a-z0-9_]+)", text))
    assert set(TOOLS) - listed == set()
    assert listed - set(TOOLS) == set()  # no command of a tool that does not exist
    assert not re.search(r"python tools/[a-z0-9_]+\.py", text)  # scripts run as modules


def _conv_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], rng.normal(size=8 * 27).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 16, 16])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _calib(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(2, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def test_assets_root_order_and_fallback(no_assets, monkeypatch, tmp_path):
    with pytest.raises(AssetsError) as exc:  # nothing given, fallback missing: says where it looked
        assets_root(None)
    assert "--assets not given" in exc.value.message and "$CONVERTER_ASSETS not set" in exc.value.message
    assert str(no_assets) in exc.value.message
    assert "CONVERTER_ASSETS" in exc.value.fix and "--assets" in exc.value.fix
    with pytest.raises(AssetsError) as exc:
        assets_root(tmp_path / "missing")
    assert str(tmp_path / "missing") in exc.value.message and "--assets" in exc.value.message
    assert assets_root(tmp_path) == tmp_path
    monkeypatch.setenv("CONVERTER_ASSETS", str(tmp_path / "env-missing"))
    with pytest.raises(AssetsError) as exc:  # a wrong variable is an error, not a reason to fall back
        assets_root(None)
    assert "$CONVERTER_ASSETS" in exc.value.message
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("CONVERTER_ASSETS", str(tmp_path / "env"))
    assert assets_root(None) == tmp_path / "env"
    assert assets_root(tmp_path) == tmp_path  # --assets wins over the variable
    monkeypatch.delenv("CONVERTER_ASSETS")
    no_assets.mkdir()
    assert assets_root(None) == no_assets  # the fallback, only when it exists


def test_cli_errors_are_one_message_and_exit_2(no_assets, capsys, tmp_path):
    assert any_model_bench.main(["--models", "resnet8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no assets folder given") and "\nfix: " in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written before the check
    assert any_model_bench.main(["--models", "digits_cnn,nope"]) == 2
    assert "unknown model(s) nope" in capsys.readouterr().err


def test_script_without_assets_exits_2_with_error_and_fix(tmp_path):
    """A script's own check, as a user meets it: one error/fix pair naming where it looked, exit 2."""
    env = {**child_env(), "CONVERTER_ASSETS": str(tmp_path / "missing")}
    proc = subprocess.run([sys.executable, "-m", "tools.bench_e2e", "--json", str(tmp_path / "r.json")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: assets folder {tmp_path / 'missing'} (from $CONVERTER_ASSETS) does not "
                                  "exist\nfix: pass --assets DIR")
    assert not (tmp_path / "r.json").exists()


def test_ort_baseline_and_int8_share(tmp_path):
    float_path = tmp_path / "conv.onnx"
    onnx.save(_conv_model(), str(float_path))
    before = float_path.read_bytes()
    seconds = ort_quantize_static(float_path, _calib(), tmp_path / "conv.ort.onnx")
    assert seconds > 0 and float_path.read_bytes() == before  # the input is not touched
    qdq = onnx.load(str(tmp_path / "conv.ort.onnx"))
    ops = [n.op_type for n in qdq.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    dq_w = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in
            [c.input[1] for c in qdq.graph.node if c.op_type == "Conv"]]
    assert len(dq_w) == 1 and helper.get_attribute_value(dq_w[0].attribute[0]) == 0  # per-channel, axis 0

    expected = {"int8": 0, "float": 1, "share": 0.0, "int8_ops": {}, "float_ops": {"FusedConv": 1},  # Conv + Relu
                "float_layers": ["conv"]}
    assert compute_int8_share(float_path) == {**expected, "counted": "optimized graph"}
    feed = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    assert compute_int8_share(float_path, feed) == {**expected, "counted": "profiled run"}
    for share in (compute_int8_share(tmp_path / "conv.ort.onnx"), compute_int8_share(tmp_path / "conv.ort.onnx", feed)):
        assert (share["int8"], share["float"], share["int8_ops"], share["share"]) == (1, 0, {"QLinearConv": 1}, 1.0)


def test_int8_share_counts_inside_if_bodies():
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"{name}_y"], name=f"{name}_mm")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4])])

    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    share = compute_int8_share(model)  # the graph: both branches
    assert share["float"] == 2 and share["int8"] == 0 and sorted(share["float_layers"]) == ["else_mm", "then_mm"]
    x = np.ones((1, 4), np.float32)
    for cond, taken in ((True, "then_mm"), (False, "else_mm")):  # a run: the branch it took
        share = compute_int8_share(model, {"c": np.array(cond), "x": x})
        assert (share["float"], share["float_layers"]) == (1, [taken])


def test_compare_latency_times_every_model(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_conv_model(0), str(a))
    onnx.save(_conv_model(1), str(b))
    lat = compare_latency({"a": a, "b": b}, {"x": np.zeros((1, 3, 16, 16), np.float32), "unused": np.zeros(1)},
                          runs=5, warmup=1, threads=1)
    assert set(lat) == {"a", "b"} and all(0 < v < 1000 for v in lat.values())


def test_list_reader_is_the_get_next_protocol():
    reader = ListReader(_calib(2))
    assert reader.get_next()["x"].shape == (2, 3, 16, 16) and reader.get_next() is not None
    assert reader.get_next() is None


def test_bench_digits_cnn_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert any_model_bench.main(["--models", "digits_cnn", "--runs", "3", "--json", str(out),
                                 "--out", str(tmp_path / "models")]) == 0
    data = json.loads(out.read_text())["models"]["digits_cnn"]
    rows = data["rows"]
    assert set(rows) == {"fp32", "ours_default", "ours_search", "ort_quantize_static"}
    fp32, default = rows["fp32"], rows["ours_default"]
    assert fp32["metrics"]["agreement"] == 1.0 and fp32["metrics"]["top1"] > 0.9  # bundled weights: 0.97
    assert fp32["int8"]["share"] == 0.0 and fp32["int8"]["float"] == 6 and fp32["x_fp32"] == 1.0
    assert default["int8"]["int8"] > 0 and default["metrics"]["agreement"] > 0.9
    assert rows["ort_quantize_static"]["int8"]["int8"] > 0
    s = rows["ours_search"]["search"]
    assert s["evaluator_calls"] >= 1 and "met" in s
    assert all(r["latency_ms"] > 0 for r in rows.values())
    assert "ours default (all-INT8)" in capsys.readouterr().out


def _input_zero_point(path) -> np.ndarray:
    model = onnx.load(str(path))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    zp = next(t for t in model.graph.initializer if t.name == q.input[2])
    return onnx.numpy_helper.to_array(zp)


def test_ort_baseline_forwards_overrides_and_reads_a_generator(tmp_path):
    """One baseline helper serves every tool: the usual settings by default (uint8 activations), a tool's own
    setting as a keyword (ORT's int8 activations, hand-picked op types), batches from a lazy generator."""
    float_path = tmp_path / "conv.onnx"
    onnx.save(_conv_model(), str(float_path))
    ort_quantize_static(float_path, _calib(), tmp_path / "u8.onnx")
    ort_quantize_static(float_path, (b for b in _calib()), tmp_path / "s8.onnx", activation_type=QuantType.QInt8)
    assert _input_zero_point(tmp_path / "u8.onnx").dtype == np.uint8
    assert _input_zero_point(tmp_path / "s8.onnx").dtype == np.int8
    ort_quantize_static(float_path, _calib(), tmp_path / "relu_only.onnx", op_types_to_quantize=["Relu"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "relu_only.onnx")).graph.node]
    assert "Conv" in ops and not any(n.op_type == "DequantizeLinear" and "w" in n.input[0]
                                     for n in onnx.load(str(tmp_path / "relu_only.onnx")).graph.node)


def test_opset11_model_is_upgraded_for_the_baseline(tmp_path):
    model = _conv_model()
    model.opset_import[0].version = 11
    src = tmp_path / "conv11.onnx"
    onnx.save(model, str(src))
    before = src.read_bytes()
    ort_quantize_static(src, _calib(), tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert q.opset_import[0].version >= 13 and src.read_bytes() == before  # the input stays opset 11, untouched
    x = _calib(1)[0]
    assert ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0].shape \
        == (2, 8, 16, 16)


def test_latency_stats_and_sessions_with_the_project_options(tmp_path):
    from converter.ort_session import SESSION_CONFIG

    a = tmp_path / "a.onnx"
    onnx.save(_conv_model(0), str(a))
    ready = session(a, "all", threads=1)
    saved = tmp_path / "opt.onnx"
    session(a, "extended", save_optimized=saved)
    assert [n.op_type for n in onnx.load(str(saved)).graph.node] == ["FusedConv"]  # ORT's optimized graph
    stats = latency_stats({"path": a, "session": ready, "proto": _conv_model(0)},
                          {"x": np.zeros((1, 3, 16, 16), np.float32)}, runs=7, warmup=1, threads=1)
    assert set(stats) == {"path", "session", "proto"}
    for s in stats.values():
        assert 0 < s["p10_ms"] <= s["median_ms"] <= s["p90_ms"] < 1000
    assert SESSION_CONFIG  # every benchlib session carries it (session_options adds each entry)


def test_child_env_puts_this_checkout_first(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = child_env(EXTRA="1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"] and env["EXTRA"] == "1"
