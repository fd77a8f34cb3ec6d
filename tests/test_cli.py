"""The command line as a newcomer meets it: help, version, names, and every early check (issue 13)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from converter import __version__
from converter.cli import build_parser, main
from converter.options import QDQ_SUFFIX

from .conftest import ROOT, parse, run
from .test_errors import GOOD, MODEL, calib_dir, model_path, quantize_cli  # noqa: F401 (fixture)

DIGITS_CALIB = ROOT / "calib_data" / "digits"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    import numpy
    import onnx
    import onnxruntime

    out = capsys.readouterr().out.strip()
    assert exc.value.code == 0 and out.startswith(f"qconvert {__version__} (") and "\n" not in out
    for name, module in (("onnxruntime", onnxruntime), ("onnx", onnx), ("numpy", numpy)):
        assert f"{name} {module.__version__}" in out, out
    assert "torch " in out and "python " in out


def test_every_option_has_help_and_shows_its_default():
    for name, sub in _subparsers(build_parser()).items():
        text = sub.format_help()
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            takes_value = not isinstance(action, argparse._StoreConstAction)
            if takes_value and not action.required:
                shown = sub._get_formatter()._get_help_string(action)
                assert "default" in shown, f"{name} {action.option_strings[0]}: no default in {shown!r}"
        assert "-v, --verbose" in text


def test_old_option_spellings_still_work_but_are_hidden():
    parsers = _subparsers(build_parser())
    assert "--data-spec" not in parsers["verify"].format_help() and "--image-spec" in parsers["verify"].format_help()
    assert "--evaluate " not in parsers["analyze"].format_help() and "--evaluator" in parsers["analyze"].format_help()
    args = build_parser().parse_args(["verify", "a", "b", "--data", "d", "--data-spec", "s.yaml"])
    assert args.data_spec == "s.yaml"
    args = build_parser().parse_args(["quantize", "m", "--calib", "c", "-o", "o", "--calib-spec", "s.yaml"])
    assert args.calib_spec == "s.yaml"


def test_one_spelling_per_concept_old_spellings_are_hidden_aliases():
    """--eval is the evaluation data on every command (verify/compare's --data parses, unseen); top1-agreement is
    the metric's name (agreement parses); --image-spec the spec (--calib-spec/--data-spec parse)."""
    parsers = _subparsers(build_parser())
    for command in ("verify", "compare"):
        text = parsers[command].format_help()
        assert "--eval DIR" in text and "--data" not in text, command
        for option in ("--eval", "--data"):
            old_spec = "--data-spec" if command == "verify" else "--calib-spec"
            argv = [command, "a", "b", option, "d", "--image-spec" if option == "--eval" else old_spec, "s"]
            args = build_parser().parse_args(argv)
            assert args.data == "d" and (args.data_spec if command == "verify" else args.calib_spec) == "s"
    assert "--eval" in parsers["analyze"].format_help() and "--eval" in parsers["quantize"].format_help()
    for spelling in ("agreement", "top1-agreement"):
        args = build_parser().parse_args(["quantize", "m", "--calib", "c", "-o", "o", "--target-metric", spelling])
        assert args.target_metric == "top1-agreement"
        args = build_parser().parse_args(["analyze", "m", "--calib", "c", "-o", "o", "--metric", spelling])
        assert args.metric == "top1-agreement"
    assert "{top1,top1-agreement,cosine,sqnr}" in parsers["quantize"].format_help()


def test_quantize_help_is_grouped_by_concern():
    text = _subparsers(build_parser())["quantize"].format_help()
    titles = ["model:", "data:", "target:", "activations:", "weights:", "calibration:", "techniques:", "search:",
              "encodings:", "runtime:", "output:"]  # the config sections (converter.config.SECTIONS), in help order
    at = [text.index(f"\n{t}\n") for t in titles]
    assert at == sorted(at), "groups out of order"
    section = lambda t: text[text.index(f"\n{t}\n"):]  # noqa: E731
    assert section("data:").index("--calib ") < section("data:").index("calibration:")
    assert section("weights:").index("--weight-bits") < section("weights:").index("techniques:")
    assert section("techniques:").index("--adaround,") < section("techniques:").index("search:")
    assert section("runtime:").index("--custom-op-library") < section("runtime:").index("output:")
    assert len(text.split("\n\n")[0].splitlines()) == 1  # usage is one line, not 35


def test_usage_errors_are_one_short_message(capsys):
    for argv, needle in ((["quantize", "m", "--calib", "c", "-o", "o", "--target", "foo"], "invalid choice: 'foo'"),
                         (["verify", "a", "b"], "the following arguments are required: --eval"),
                         (["nope"], "invalid choice: 'nope'")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and needle in err, err
        assert err.startswith("error: ") and "fix: see 'qconvert" in err and "usage:" not in err
        assert len(err.strip().splitlines()) == 2, err


@pytest.mark.parametrize("argv,option", [
    (["verify", "a", "b", "--eval", "d", "--min-cosine", "2"], "--min-cosine 2"),
    (["verify", "a", "b", "--eval", "d", "--min-agreement", "1.5"], "--min-agreement 1.5"),
    (["verify", "a", "b", "--eval", "d", "--max-top1-drop", "-0.1"], "--max-top1-drop -0.1"),
    (["quantize", "m", "--calib", "c", "-o", "o", "--target-metric", "cosine", "--max-float-fraction", "3"],
     "--max-float-fraction 3"),
    (["quantize", "m", "--calib", "c", "-o", "o", "--percentile", "120"], "--percentile 120"),
])
def test_thresholds_out_of_range_are_rejected(capsys, argv, option):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"error: {option} is out of range" in err and "fix:" in err
    main_ok = build_parser().parse_args(["verify", "a", "b", "--eval", "d", "--min-cosine", "0.99",
                                         "--min-agreement", "none"])
    assert main_ok.min_cosine == 0.99 and main_ok.min_agreement == "none"


def test_batch_help_documents_the_job_file():
    text = _subparsers(build_parser())["batch"].format_help()
    for key in ("defaults:", "output_dir:", "jobs:", "model:", "calib:", "image_spec:", "verify:", "eval:",
                "min_agreement", "num_cpus", "--resume"):
        assert key in text, key
    assert "pydoc" not in text


def test_export_opset_help_names_the_real_default():
    from converter.export import DEFAULT_OPSETS

    text = " ".join(_subparsers(build_parser())["export"].format_help().split())
    assert f"default: {DEFAULT_OPSETS['dynamo']} with the dynamo exporter" in text
    assert f"{DEFAULT_OPSETS['torchscript']} with --exporter torchscript" in text


def _cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "converter", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_verbose_after_the_subcommand_gives_debug_logging(model_path, tmp_path):
    calib = calib_dir(tmp_path, {f"s{i}": GOOD + i for i in range(20)})
    proc = _cli("quantize", model_path, "--calib", calib, "-o", tmp_path / "out", "-v")
    assert proc.returncode == 0, proc.stderr
    assert f"qconvert {__version__} quantize" in proc.stderr and "activation tensors on" in proc.stderr
    assert "preprocessed" in proc.stderr and "plan:" in proc.stderr
    assert "CUDAExecutionProvider not available" in proc.stderr  # the notice is debug-level
    proc = _cli("quantize", model_path, "--calib", calib, "-o", tmp_path / "out2")
    assert proc.returncode == 0 and "CUDAExecutionProvider" not in proc.stderr and "plan:" not in proc.stderr


def test_quantize_never_writes_over_its_input(digits, tmp_path, capsys):
    """The README's old quick start: the float model in the output folder, same stem."""
    out = tmp_path / "out"
    out.mkdir()
    model = out / "digits.onnx"
    shutil.copy(digits["path"], model)
    before = model.read_bytes()
    assert main(["quantize", str(model), "--calib", str(DIGITS_CALIB), "-o", str(out)]) == 0
    assert model.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["digits.encodings", "digits.onnx", f"digits{QDQ_SUFFIX}",
                                                     "digits.report.json"]
    # an input whose name is an output name: refused before any work, the input untouched
    clash = out / f"m{QDQ_SUFFIX}"
    shutil.copy(digits["path"], clash)
    capsys.readouterr()
    code, err = quantize_cli(capsys, clash, DIGITS_CALIB, out, "--name", "m")
    assert code == 2 and "would overwrite the input" in err and "--name" in err and "Traceback" not in err
    assert clash.read_bytes() == before and not (out / "m.encodings").exists()
    # a file of an output's name that no earlier run wrote (no report of ours lists it) is not overwritten
    (out / "other.encodings").write_text("mine")
    shutil.copy(digits["path"], out / "other.onnx")
    code, err = quantize_cli(capsys, out / "other.onnx", DIGITS_CALIB, out)
    assert code == 2 and "other.encodings already exists and is not the output of an earlier" in err
    assert (out / "other.encodings").read_text() == "mine" and not (out / "other.qdq.onnx").exists()
    # an earlier run's outputs are replaced
    assert main(["quantize", str(model), "--calib", str(DIGITS_CALIB), "-o", str(out)]) == 0


def test_name_with_a_path_separator_is_refused(model_path, tmp_path, capsys):
    calib = calib_dir(tmp_path, {"a": GOOD})
    for name in ("../escaped", "sub/m", ".."):
        code, err = quantize_cli(capsys, model_path, calib, tmp_path / "out", "--name", name)
        assert code == 2 and "not a plain file name" in err and "fix:" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.qdq.onnx").exists()


def test_unknown_exclude_node_is_an_error(digits, tmp_path, capsys):
    code, err = quantize_cli(capsys, digits["path"], DIGITS_CALIB, tmp_path / "out", "--exclude-nodes",
                             "/stem/stem.0/Conv,nosuchnode")
    assert code == 2 and "no node named 'nosuchnode'" in err and "fix:" in err
    assert not (tmp_path / "out").exists()  # the folder this run created is gone again
    code, err = quantize_cli(capsys, digits["path"], DIGITS_CALIB, tmp_path / "out", "--exclude-nodes",
                             "/stem/stem.0/Conv")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "digits.report.json").read_text())
    assert "/stem/stem.0/Conv" in report["summary"]["float_nodes"]


@pytest.mark.parametrize("flags", [["--max-drop", "0.01"], ["--eval", "x"], ["--strategy", "sequential"],
                                   ["--relative-drop"]])
def test_search_flags_without_a_metric_are_an_error(model_path, tmp_path, capsys, flags):
    code, err = quantize_cli(capsys, model_path, calib_dir(tmp_path, {"a": GOOD}), tmp_path / "out", *flags)
    assert code == 2 and flags[0] in err and "--target-metric" in err and "fix:" in err
    assert not (tmp_path / "out").exists()


def test_one_calibration_sample_warns(model_path, tmp_path, capsys, caplog):
    code, err = quantize_cli(capsys, model_path, calib_dir(tmp_path, {"a": GOOD}), tmp_path / "out")
    assert code == 0 and "only 1 calibration sample" in caplog.text


def test_compare_shape_mismatch_and_unrelated_models(model_path, digits, tmp_path, capsys):
    """Same tensor names, another input shape: exit 2 with a fix (it was a raw traceback)."""
    other = tmp_path / "other.onnx"
    other.write_bytes(parse(MODEL.replace("float[N,3,4,4] x", "float[N,3,8,8] x"),
                            W=np.ones((2, 3, 1, 1), np.float32)).SerializeToString())
    assert main(["compare", str(model_path), str(other), "--data", str(calib_dir(tmp_path, {"a": GOOD}))]) == 2
    err = capsys.readouterr().err
    assert "input 'x' has shape" in err and "fix:" in err and "Traceback" not in err
    relu = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,1,8,8] input) => (float[N,1,8,8] output) { output = Relu(input) }""")
    (tmp_path / "relu.onnx").write_bytes(relu.SerializeToString())
    assert main(["compare", str(digits["path"]), str(tmp_path / "relu.onnx"), "--data", str(DIGITS_CALIB)]) == 2
    err = capsys.readouterr().err
    assert "share only their output name" in err and "tensors compared" not in err


def test_factory_exceptions_are_user_errors(tmp_path, capsys):
    (tmp_path / "nets.py").write_text(
        "def broken():\n    raise RuntimeError('weights file is corrupt')\n"
        "def needs_pkg():\n    import no_such_package_for_qconvert\n")
    for factory, words in (("broken", "the factory raised RuntimeError: weights file is corrupt"),
                           ("needs_pkg", "needs a package that is not installed")):
        out = tmp_path / "o" / "m.onnx"
        code = main(["export", f"{tmp_path / 'nets.py'}:{factory}", "--input-shape", "1,3,8,8", "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "fix:" in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()
    assert "pip install" in err


def test_output_locations_are_checked_before_any_work(digits, tmp_path, capsys):
    """An unwritable output fails at once, naming the right option, and no work is done."""
    bad = "/proc/qconvert-test/x.json"
    cases = [
        (["export", "nosuch.py:build", "--input-shape", "1,1,8,8", "-o", "/proc/qconvert-test/d.onnx"], "-o/--output"),
        (["verify", str(digits["path"]), str(digits["path"]), "--data", str(DIGITS_CALIB), "--json", bad], "--json"),
        (["compare", str(digits["path"]), str(digits["path"]), "--data", str(DIGITS_CALIB), "--json", bad],
         "--json"),
        (["validate", str(digits["path"]), "--json", bad], "--json"),
        (["quantize", str(digits["path"]), "--calib", str(DIGITS_CALIB), "-o", "/proc/qconvert-test"],
         "-o/--output-dir"),
    ]
    for argv, option in cases:
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 2, (argv, captured.err)
        assert option in captured.err and "cannot write" in captured.err, captured.err
        assert captured.out == ""  # nothing ran: no results printed (export did not even build the module)
        # verify's fix used to name -o/--output-dir, which verify does not have
        assert argv[0] == "quantize" or "--output-dir" not in captured.err


def test_digits_weights_are_bundled_not_trained():
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'models'); import digits_cnn, time; "
                           "t = time.perf_counter(); digits_cnn.build(); print(time.perf_counter() - t)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "training" not in proc.stderr and float(proc.stdout) < 2.0


def readme_commands() -> list[str]:
    """Every qconvert command in the README's bash blocks, continuation lines joined, comments and [optional]
    parts dropped, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split(" #")[0] if not line.startswith("#") else "")
            commands += [c.strip() for c in line.split("&&") if c.strip().startswith("qconvert ")]
    return commands


def test_readme_usage_commands_run_as_written(tmp_path):
    """All README commands, the quick start first (the EfficientNet ones are test_end_to_end's), verbatim in a copy
    of the repo's files: each exits 0."""
    commands = [c for c in readme_commands() if "efficientnet" not in c and "effnet" not in c]
    assert len(commands) >= 12 and any(c.startswith("qconvert batch examples/jobs.yaml") for c in commands)
    for folder in ("models", "calib_data", "eval_data", "examples"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    stdout = []
    for cmd in commands:
        proc = subprocess.run([sys.executable, "-m", "converter", *cmd.split()[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
        stdout.append(proc.stdout)
    # the quick start (its first three commands) ends with the accuracy on the held-out digits and PASSED
    assert commands[2].startswith("qconvert verify out/digits.onnx out/digits.qdq.onnx")
    assert "accuracy on 597 labels" in stdout[2] and stdout[2].rstrip().endswith("PASSED")
    x = np.load(tmp_path / "eval_data" / "digits" / "heldout.npz")["input"]
    y = np.loadtxt(tmp_path / "eval_data" / "digits_labels.txt", dtype=np.int64)
    fp32 = (run(tmp_path / "out" / "digits.onnx", {"input": x})[0].argmax(1) == y).mean()
    int8 = (run(tmp_path / "out" / f"digits{QDQ_SUFFIX}", {"input": x})[0].argmax(1) == y).mean()
    assert fp32 > 0.95 and int8 >= fp32 - 0.01
    summary = json.loads((tmp_path / "out" / "batch" / "summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["ok", "ok"]
    assert (tmp_path / "out" / "digits.again.qdq.onnx").is_file()  # apply-encodings
    html = (tmp_path / "out" / "analysis" / "report.html").read_text()
    assert html.count('class="xlabel"') >= 2  # the line charts' x axes are labelled
    analysis = json.loads((tmp_path / "out" / "analysis" / "report.json").read_text())
    assert analysis["evaluation"]["samples"] == 597  # --eval-samples 0: all of them


def test_analyze_says_how_many_eval_samples_and_when_the_metric_ties(digits, tmp_path, caplog):
    from converter import QuantConfig
    from converter.analysis import analyze
    from converter.analysis.analyzer import AnalysisConfig

    eval_dir = ROOT / "eval_data" / "digits"
    labels = ROOT / "eval_data" / "digits_labels.txt"
    res = analyze(digits["path"], DIGITS_CALIB, QuantConfig(), tmp_path, eval_data=eval_dir, labels=labels,
                  analysis=AnalysisConfig(eval_samples=16, steps=("split",)))
    assert "first 16 evaluation samples only" in caplog.text and "--eval-samples 0 uses all" in caplog.text
    split = res.report["split"]
    assert res.report["evaluation"]["samples"] == 16
    if split["fp32"] == split["weights_only"] == split["activations_only"] == split["all_quantized"]:
        assert split["verdict"].startswith("top1 is the same for all variants on 16 samples; by output cosine")
    else:
        assert split["verdict"] in ("activations hurt more", "weights hurt more")
