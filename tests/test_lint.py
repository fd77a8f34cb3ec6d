"""The lint rules of pyproject.toml ([tool.ruff]) hold on the whole repository (issue 27: a ruff configuration,
passing in CI)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_ruff_passes_on_the_repository():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_ruff_finds_an_unused_import(tmp_path):
    """The check can fail: the same configuration flags a file with an unused import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                          str(bad)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "F401" in run.stdout
