"""The one execution-provider resolver (ort_session.select_providers) and the one labels loader
(calib.readers.load_labels) that verify, analyze, calibration and the search share."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from converter.calib.readers import load_labels
from converter.errors import CalibrationDataError, UserError
from converter.ort_session import create_session, select_providers

from .conftest import parse

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_select_providers_auto_cpu_cuda(caplog):
    """auto: CUDA then CPU where available, else CPU; cpu: CPU; cuda without CUDA: one error naming the fix."""
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    assert select_providers("auto") == (["CUDAExecutionProvider", "CPUExecutionProvider"] if HAS_CUDA
                                        else ["CPUExecutionProvider"])
    if HAS_CUDA:
        assert select_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        with pytest.raises(UserError, match="no CUDA support") as e:
            select_providers("cuda")
        assert "--providers cpu" in e.value.fix


def test_select_providers_lists(caplog):
    """Comma lists, short names and full names: the available ones in order, the rest skipped with a warning;
    none available is an error. The chosen providers open a real session."""
    with caplog.at_level(logging.WARNING, logger="converter"):
        chosen = select_providers("tensorrt,cpu")
    assert chosen == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in caplog.text
    assert select_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="none of the requested execution providers"):
        select_providers("coreml")
    model = parse("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) { y = Relu(x) }
""")
    sess = create_session(model, chosen)
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    assert sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]


def test_load_labels_forms(tmp_path):
    """.npy, text (one per line or any whitespace), sequences, [N, 1] arrays and whole floats give the same
    int64 labels; None stays None."""
    want = [3, 0, 7, 7, 1]
    np.save(tmp_path / "l.npy", np.array(want, np.int32))
    (tmp_path / "lines.txt").write_text("\n".join(map(str, want)) + "\n\n")
    (tmp_path / "spaces.txt").write_text("3 0\t7\n7 1")
    np.save(tmp_path / "col.npy", np.array(want, np.int64)[:, None])
    np.save(tmp_path / "floats.npy", np.array(want, np.float32))
    for source in ("l.npy", "lines.txt", "spaces.txt", "col.npy", "floats.npy"):
        got = load_labels(tmp_path / source)
        assert got.dtype == np.int64 and got.tolist() == want, source
    assert load_labels(want).tolist() == want and load_labels(str(tmp_path / "l.npy")).tolist() == want
    assert load_labels(None) is None


def test_load_labels_errors(tmp_path):
    """Every bad labels input is one CalibrationDataError (exit 2 from the CLI) naming the file and the fix."""
    (tmp_path / "words.txt").write_text("cat\ndog\n")
    np.save(tmp_path / "frac.npy", np.array([0.5, 1.0]))
    np.save(tmp_path / "grid.npy", np.zeros((2, 3), np.int64))
    cases = {tmp_path / "missing.txt": "labels file not found", tmp_path / "words.txt": "must be an integer",
             tmp_path / "frac.npy": "1-D array of integers", tmp_path / "grid.npy": "1-D array of integers"}
    for source, message in cases.items():
        with pytest.raises(CalibrationDataError, match=message) as e:
            load_labels(source)
        assert e.value.fix, source
