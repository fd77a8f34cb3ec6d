#!/usr/bin/env bash
# The README's test command: install what the tests need, then run them (2-5 minutes on 2 cores).
# torch's CPU build first, then the package with its test extras, then Chromium (Debian package) for
# tests/test_analysis.py, which renders report.html headless.
#
# torch: from PyPI alone, `torch==2.13.0` on Linux x86-64 is the CUDA build (plus ~20 nvidia/cuda packages).
# PyTorch's CPU index (TORCH_INDEX_URL) holds 2.13.0+cpu, which pip prefers to PyPI's 2.13.0 (a local version
# sorts above its public one; the constraint torch==2.13.0 matches both). It is an *extra* index so torch's own
# dependencies still come from PyPI at the versions constraints.txt pins, and a machine that cannot reach it
# (CI: a local wheel folder, no route to download.pytorch.org) fails over in seconds instead of retrying for
# minutes (--retries 0 --timeout 10). TORCH_INDEX_URL= (empty) skips the index.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
torch_index=()
if [ -n "$TORCH_INDEX_URL" ]; then torch_index=(--extra-index-url "$TORCH_INDEX_URL" --retries 0 --timeout 10); fi
# Both installs use constraints.txt, the exact versions CI tests (a fresh install is the tested one).
python -m pip install -q torch==2.13.0 -c constraints.txt "${torch_index[@]}"
python -m pip install -q -e '.[dev]' -c constraints.txt
python -c 'import torch, onnxruntime, onnx, numpy; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__, "onnx", onnx.__version__, "numpy", numpy.__version__)'
torch_version=$(python -c 'import torch; print(torch.__version__)')
if [ "$(uname -s)" = Linux ] && [[ "$torch_version" != *+cpu* ]]; then
    echo "note: torch $torch_version is not the CPU build (+cpu): the tests pass, but it is several GB larger" >&2
fi
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt=(apt-get); else apt=(sudo apt-get); fi
    "${apt[@]}" update -q && "${apt[@]}" install -y -q chromium
fi
python -m pytest -q "$@"
