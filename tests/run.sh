#!/usr/bin/env bash
# The README's test command: install what the tests need, then run them (2-5 minutes on 2 cores).
# torch's CPU build first (an unpinned torch pulls a multi-GB CUDA build), then the package with its test
# extras, then Chromium (Debian package) for tests/test_analysis.py, which renders report.html headless.
set -euo pipefail
cd "$(dirname "$0")/.."
# Both installs use constraints.txt, the exact versions CI tests (a fresh install is the tested one).
python -m pip install -q torch==2.13.0 -c constraints.txt
python -m pip install -q -e '.[dev]' -c constraints.txt
python -c 'import onnxruntime, onnx, numpy; print("onnxruntime", onnxruntime.__version__, "onnx", onnx.__version__, "numpy", numpy.__version__)'
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt=(apt-get); else apt=(sudo apt-get); fi
    "${apt[@]}" update -q && "${apt[@]}" install -y -q chromium
fi
python -m pytest -q "$@"
