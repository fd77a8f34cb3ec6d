"""What a new user meets first (issue 25, point 8): data in the shapes users have it, outputs where they expect
them, custom ONNX Runtime ops, progress display. Real ONNX Runtime sessions, measured numbers."""

from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import converter
from converter import QuantConfig, quantize
from converter import ort_session
from converter.calib import readers
from converter.calib.readers import bounded_batch_size, model_inputs, open_calibration, sample_bytes
from converter.cli import main
from converter.errors import ConfigError, OutputError, UserError

from .conftest import ROOT, parse

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
m (float[N,3,4,4] x) => (float[N,2,4,4] y) {
  c = Conv(x, W)
  y = Relu(c)
}
"""


def conv_model() -> onnx.ModelProto:
    return parse(MODEL, W=np.random.default_rng(0).normal(0, 0.3, (2, 3, 1, 1)).astype(np.float32))


def samples(n: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (n, 3, 4, 4)).astype(dtype)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- data as users have it --------------------------------------------------------------------------

def test_float64_and_plain_array_give_the_same_encodings_as_float32_dicts(tmp_path):
    """numpy's default float64, and one array for a single-input model, are what the float32 dicts are."""
    x = samples(40)
    ref = quantize(conv_model(), [{"x": x[i:i + 8]} for i in range(0, 40, 8)], QuantConfig(), tmp_path / "ref",
                   name="m")
    got = quantize(conv_model(), x.astype(np.float64), QuantConfig(), tmp_path / "f64", name="m")
    assert ref.report["calibration"]["samples"] == got.report["calibration"]["samples"] == 40
    assert ref.encodings_path.read_bytes() == got.encodings_path.read_bytes()
    lists = quantize(conv_model(), [x[i].astype(np.float64) for i in range(40)], QuantConfig(), tmp_path / "list",
                     name="m")  # an iterable of arrays, one sample each
    assert lists.encodings_path.read_bytes() == ref.encodings_path.read_bytes()


def test_float64_npy_files_on_the_command_line(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(conv_model().SerializeToString())
    for suffix, dtype in (("32", np.float32), ("64", np.float64)):
        d = tmp_path / f"calib{suffix}"
        d.mkdir()
        for i, s in enumerate(samples(20, dtype)):
            np.save(d / f"{i:03d}.npy", s)
        assert main(["quantize", str(model), "--calib", str(d), "-o", str(tmp_path / f"out{suffix}")]) == 0
    assert (tmp_path / "out32" / "m.encodings").read_bytes() == (tmp_path / "out64" / "m.encodings").read_bytes()


def test_plain_array_for_a_two_input_model_is_a_clear_error(tmp_path):
    m = parse("""
<ir_version: 8, opset_import: ["" : 17]>
m (float[N,4] a, float[N,4] b) => (float[N,4] y) { y = Add(a, b) }
""")
    with pytest.raises(UserError, match="one array but the model has 2 inputs"):
        quantize(m, np.zeros((4, 4), np.float32), QuantConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # and the folder this call created is gone again


def test_image_folder_layout_is_found_recursively_in_sorted_order(tmp_path):
    photos = sorted(p for p in (ROOT / "calib_data" / "photos").iterdir() if p.suffix == ".jpg")
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    flat.mkdir()
    shutil.copy(ROOT / "calib_data" / "photos" / "preprocess.yaml", flat)
    shutil.copy(ROOT / "calib_data" / "photos" / "preprocess.yaml", nested.parent / "spec.yaml")
    for i, p in enumerate(photos):
        shutil.copy(p, flat / f"{i:02d}_{p.name}")
        cls = nested / f"class_{i % 3}"  # torchvision ImageFolder: one folder per class
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, cls / f"{i:02d}_{p.name}")
    (nested / ".thumbs").mkdir()
    shutil.copy(photos[0], nested / ".thumbs" / "hidden.jpg")  # hidden folders are not data
    shutil.copy(ROOT / "calib_data" / "photos" / "preprocess.yaml", nested)
    inputs = [readers.InputSpec("input", np.dtype(np.float32), (None, 3, 224, 224))]
    src = open_calibration(nested, inputs, batch_size=4)
    assert src.kind == "images" and src.num_samples == len(photos)
    rel = [p.relative_to(nested).as_posix() for p in src.items]
    assert rel == sorted(rel) and rel[0].startswith("class_0/")
    # the same images give the same samples, whatever the folder layout
    by_name = {p.name: b for p, b in zip(src.items, [s for b in src for s in b["input"]])}
    flat_src = open_calibration(flat, inputs, batch_size=4)
    for p, s in zip(flat_src.items, [s for b in flat_src for s in b["input"]]):
        np.testing.assert_array_equal(by_name[p.name], s)


def test_npz_with_a_stored_label_warns_and_is_used(tmp_path, caplog):
    d = tmp_path / "calib"
    d.mkdir()
    x = samples(12)
    for i in range(12):
        np.savez(d / f"{i:02d}.npz", x=x[i], label=np.int64(i % 3))
    caplog.set_level(logging.WARNING, logger="converter")
    res = quantize(conv_model(), d, QuantConfig(), tmp_path / "out", name="m")
    assert res.report["calibration"]["samples"] == 12
    warned = [r.getMessage() for r in caplog.records if "'label'" in r.getMessage()]
    assert len(warned) == 1 and "ignored" in warned[0] and "model inputs: x" in warned[0]
    ref = quantize(conv_model(), [{"x": x}], QuantConfig(), tmp_path / "ref", name="m")
    assert res.encodings_path.read_bytes() == ref.encodings_path.read_bytes()
    for f in d.iterdir():  # a missing input is still an error
        np.savez(f, label=np.int64(0), other=x[0])
    with pytest.raises(UserError, match=r"the model expects \['x'\]"):
        quantize(conv_model(), d, QuantConfig(), tmp_path / "out2", name="m")


def test_label_count_mismatch_is_found_before_any_model_runs(tmp_path, monkeypatch):
    import converter.verify as verify_module

    d = tmp_path / "eval"
    d.mkdir()
    for i in range(6):
        np.savez(d / f"{i}.npz", x=samples(2))  # .npz batches: the count comes from the array headers
    src = open_calibration(d, model_inputs(conv_model()), 16)
    assert src.num_samples == 12

    def no_session(*a, **kw):
        raise AssertionError("a model ran before the labels were checked")

    monkeypatch.setattr(verify_module, "_session", no_session)
    with pytest.raises(UserError, match="11 labels for the 12 samples"):
        converter.verify(conv_model(), conv_model(), d, labels=np.zeros(11, np.int64))
    with pytest.raises(UserError, match="3 labels for the 4 samples used"):
        converter.verify(conv_model(), conv_model(), d, labels=np.zeros(3, np.int64), max_samples=4)
    from converter.search import BuiltinEvaluator

    monkeypatch.setattr("converter.search.evaluate.make_session", no_session)
    with pytest.raises(UserError, match="11 labels for the 12 samples"):
        BuiltinEvaluator("top1", conv_model(), d, np.zeros(11, np.int64))


# --- batch size bound --------------------------------------------------------------------------------

BIG = """
<ir_version: 8, opset_import: ["" : 17]>
m (float[N,8,64,64] x) => (float[N,32,64,64] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, W)
  y = Relu(c)
}
"""


def test_huge_batch_size_is_capped_by_the_stated_rule(tmp_path, caplog, monkeypatch):
    model = parse(BIG, W=np.random.default_rng(0).normal(0, 0.1, (32, 8, 3, 3)).astype(np.float32))
    per_sample = (8 + 32 + 32) * 64 * 64 * 4  # x, c, y per sample
    assert sample_bytes(model) == per_sample
    inputs = model_inputs(model)
    assert bounded_batch_size(inputs, 16) == 16  # the default is never capped
    assert bounded_batch_size(inputs, 100000) == (1 << 30) // per_sample == 910
    assert bounded_batch_size(inputs, 500) == 500  # 500 samples fit 1 GiB
    assert bounded_batch_size(inputs, 100000, budget=1) == 16  # never below the default
    # what a run sees: batches of the capped size, with a warning that names the rule
    monkeypatch.setattr(readers, "BATCH_MEMORY_BUDGET", 40 * per_sample)
    caplog.set_level(logging.WARNING, logger="converter")
    x = np.random.default_rng(2).normal(0, 1, (100, 8, 64, 64)).astype(np.float32)
    sizes = [b["x"].shape[0] for b in open_calibration([{"x": x}], inputs, batch_size=1000)]
    assert sizes == [40, 40, 20]
    assert any("batch size 1000 capped to 40" in r.getMessage() for r in caplog.records)


# --- outputs -----------------------------------------------------------------------------------------

def test_output_dir_is_required_in_the_python_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="output_dir is required"):
        quantize(conv_model(), [{"x": samples(4)}])
    assert list(tmp_path.iterdir()) == []  # no out/ in the current directory


def test_a_data_error_leaves_no_empty_output_folder(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(UserError, match="NaN/Inf"):
        quantize(conv_model(), [{"x": np.full((2, 3, 4, 4), np.nan, np.float32)}], QuantConfig(), out)
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(UserError):
        quantize(conv_model(), [{"x": np.full((2, 3, 4, 4), np.nan, np.float32)}], QuantConfig(), existing)
    assert existing.is_dir()  # a folder the user made stays


def test_calibration_folder_as_output_folder_is_refused(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(conv_model().SerializeToString())
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, s in enumerate(samples(20)):
        np.save(calib / f"{i:03d}.npy", s)
    before = sorted(p.name for p in calib.iterdir())
    code = main(["quantize", str(model), "--calib", str(calib), "-o", str(calib)])
    err = capsys.readouterr().err
    assert code == 2 and "is the data folder --calib" in err and "fix:" in err and "Traceback" not in err
    assert sorted(p.name for p in calib.iterdir()) == before
    code = main(["quantize", str(model), "--calib", str(calib), "-o", str(calib / "sub" / "..")])  # same folder
    assert code == 2 and sorted(p.name for p in calib.iterdir()) == before


def test_a_torch_module_leaves_its_float_onnx_beside_the_outputs(tmp_path):
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    torch.manual_seed(0)
    module = Tiny()
    data = [{"input": samples(8)}]
    res = quantize(module, data, QuantConfig(), tmp_path / "out", example_inputs=torch.zeros(1, 3, 4, 4))
    float_path = tmp_path / "out" / "Tiny.onnx"
    assert float_path.is_file() and res.model_path.name == "Tiny.qdq.onnx"
    x = samples(8)
    want = module(torch.from_numpy(x)).detach().numpy()
    got = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)  # the float model the encodings belong to
    again = quantize(module, data, QuantConfig(), tmp_path / "out", example_inputs=torch.zeros(1, 3, 4, 4))
    assert again.encodings_path.read_bytes() == res.encodings_path.read_bytes()  # its own export is replaced
    float_path.write_bytes(conv_model().SerializeToString())  # a file this tool did not export is never replaced
    with pytest.raises(OutputError, match="no float model this tool exported"):
        quantize(module, data, QuantConfig(), tmp_path / "out", example_inputs=torch.zeros(1, 3, 4, 4))
    assert float_path.read_bytes() == conv_model().SerializeToString()


def test_export_refuses_to_overwrite_without_force(tmp_path, capsys):
    pytest.importorskip("torch")
    spec = tmp_path / "net.py"
    spec.write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), "
                    "torch.nn.ReLU())\n")
    out = tmp_path / "net.onnx"
    out.write_text("my notes")
    argv = ["export", f"{spec}:build", "--input-shape", "1,3,8,8", "-o", str(out), "--exporter", "torchscript"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and out.read_text() == "my notes"
    assert main(argv + ["--force"]) == 0
    model = onnx.load(out)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"]
    assert model.opset_import[0].version == 17  # torchscript's default, as --help says


def test_public_api_at_top_level():
    for name in ("quantize", "verify", "auto_quantize", "AccuracyTarget", "BuiltinEvaluator", "TargetNotMetError",
                 "apply_encodings", "export_torch", "use_custom_op_libraries", "QuantConfig"):
        assert name in converter.__all__ and hasattr(converter, name), name
    import converter.verify as verify_module  # still the module, and callable as its function

    assert verify_module.Thresholds is converter.Thresholds and callable(converter.verify)


# --- custom-op libraries -----------------------------------------------------------------------------

@pytest.fixture()
def custom_op_model(tmp_path, monkeypatch):
    """Conv -> ai.onnx.contrib::NegPos (onnxruntime-extensions) -> pos - neg = |c| -> Conv; a fresh registry."""
    ext = pytest.importorskip("onnxruntime_extensions")
    monkeypatch.setattr(ort_session, "CUSTOM_OP_LIBRARIES", [])
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("NegPos", ["c"], ["neg", "pos"], domain="ai.onnx.contrib", name="negpos"),
             helper.make_node("Sub", ["pos", "neg"], ["a"], name="abs"),
             helper.make_node("Conv", ["a", "W2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "W"),
                               numpy_helper.from_array(rng.normal(0, 0.3, (2, 4, 1, 1)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.contrib", 1)], ir_version=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, s in enumerate(rng.normal(0, 1, (24, 3, 8, 8))):
        np.save(calib / f"{i:03d}.npy", s)  # float64, as numpy makes it
    return path, calib, ext.get_library_path()


def test_validate_agrees_with_itself_on_custom_ops(custom_op_model, capsys):
    path, _, lib = custom_op_model
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "ort-load" in out and "--custom-op-library PATH" in out
    assert "custom-domain" not in out  # no "keep them, the rest is quantized" beside "cannot load"
    assert main(["validate", str(path), "--custom-op-library", lib]) == 0
    out = capsys.readouterr().out
    assert "ort-load" not in out and "custom-domain" in out and "same custom-op library" in out


def test_quantize_and_verify_with_a_custom_op_library(custom_op_model, tmp_path, capsys):
    path, calib, lib = custom_op_model
    out = tmp_path / "out"
    assert main(["quantize", str(path), "--calib", str(calib), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "NegPos" in err and "--custom-op-library" in err and not out.exists()
    assert main(["quantize", str(path), "--calib", str(calib), "-o", str(out), "--custom-op-library", lib]) == 0
    qdq = onnx.load(out / "m.qdq.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) >= 2
    assert any(n.domain == "ai.onnx.contrib" for n in qdq.graph.node)
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    x = np.random.default_rng(3).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out / "m.qdq.onnx"), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert cosine(ref, got) > 0.99
    capsys.readouterr()
    assert main(["verify", str(path), str(out / "m.qdq.onnx"), "--eval", str(calib), "--custom-op-library", lib,
                 "--min-agreement", "none"]) == 0


def test_custom_op_library_from_the_config_and_the_python_api(custom_op_model, tmp_path, capsys):
    path, calib, lib = custom_op_model
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"custom_op_libraries: [{lib}]\n")
    assert main(["quantize", str(path), "--calib", str(calib), "-o", str(tmp_path / "a"), "--config", str(cfg)]) == 0
    report = (tmp_path / "a" / "m.report.json").read_text()
    assert "custom_op_libraries" in report
    ort_session.CUSTOM_OP_LIBRARIES.clear()
    res = quantize(str(path), calib, QuantConfig(custom_op_libraries=[lib]), tmp_path / "b")
    assert res.encodings_path.read_bytes() == (tmp_path / "a" / "m.encodings").read_bytes()
    with pytest.raises(ConfigError, match="custom-op library not found"):
        converter.use_custom_op_libraries(tmp_path / "nope.so")
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not a library")
    assert main(["validate", str(path), "--custom-op-library", str(bad)]) == 2
    assert "cannot load the custom-op library" in capsys.readouterr().err


# --- progress ----------------------------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal_and_never_under_quiet(monkeypatch):
    from converter.progress import tqdm

    log = logging.getLogger("converter")
    monkeypatch.setattr(log, "level", logging.INFO)
    tty, pipe = _Tty(), io.StringIO()
    for _ in tqdm(range(3), desc="calibrating", file=tty):
        pass
    for _ in tqdm(range(3), desc="calibrating", file=pipe):
        pass
    assert "calibrating" in tty.getvalue() and pipe.getvalue() == ""
    monkeypatch.setattr(log, "level", logging.WARNING)  # -q
    quiet = _Tty()
    for _ in tqdm(range(3), desc="calibrating", file=quiet):
        pass
    assert quiet.getvalue() == ""


def test_every_progress_bar_goes_through_the_one_rule():
    """No module imports tqdm's bar directly: each long step follows converter.progress's rule."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "converter").rglob("*.py")
                 if p.name != "progress.py" and "from tqdm import" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_job_file_spellings_and_library_paths(tmp_path):
    """Job files take the command line's spellings (image_spec, verify.eval), the old ones still, and a
    custom_op_libraries path relative to the job file (workers run in their own folder)."""
    from converter.batch import load_job_file

    (tmp_path / "m.onnx").write_bytes(conv_model().SerializeToString())
    (tmp_path / "calib").mkdir()
    (tmp_path / "spec.yaml").write_text("resize: 8\n")
    new = tmp_path / "new.yaml"
    new.write_text("defaults: {custom_op_libraries: [libs/ops.so]}\njobs:\n  - model: m.onnx\n    calib: calib\n"
                   "    image_spec: spec.yaml\n    verify: {eval: calib, image_spec: spec.yaml}\n")
    old = tmp_path / "old.yaml"
    old.write_text("jobs:\n  - model: m.onnx\n    calib: calib\n    calib_spec: spec.yaml\n"
                   "    verify: {data: calib, data_spec: spec.yaml}\n")
    a, b = load_job_file(new).jobs[0], load_job_file(old).jobs[0]
    assert a.calib_spec == b.calib_spec == str(tmp_path / "spec.yaml")
    assert a.verify.data == b.verify.data and a.verify.data_spec == b.verify.data_spec == str(tmp_path / "spec.yaml")
    assert a.config.custom_op_libraries == (str(tmp_path / "libs" / "ops.so"),)
    both = tmp_path / "both.yaml"
    both.write_text("jobs:\n  - model: m.onnx\n    calib: calib\n    calib_spec: spec.yaml\n    image_spec: spec.yaml\n")
    with pytest.raises(ConfigError, match="same setting"):
        load_job_file(both)
    with pytest.raises(ConfigError, match="job file not found") as exc:
        load_job_file(tmp_path / "nope.yaml")
    assert "--config" not in exc.value.fix


def test_error_hints_name_the_option_the_user_gave(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(conv_model().SerializeToString())
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(ROOT / "calib_data" / "photos" / "coffee.jpg", d)
    assert main(["quantize", str(model), "--calib", str(d), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--image-spec FILE" in err and "--calib-spec" not in err
    assert main(["quantize", str(model), "--calib", str(d), "-o", str(tmp_path / "out"), "--image-spec",
                 str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "image preprocessing spec not found" in err and "--image-spec" in err and "--config" not in err
    assert main(["batch", str(tmp_path / "jobs.yaml")]) == 2
    err = capsys.readouterr().err
    assert "job file not found" in err and "--config" not in err
