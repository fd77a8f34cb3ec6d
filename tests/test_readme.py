"""The README and docs/ against the code: options, config keys, links and Python examples.

The README's `qconvert` command lines run verbatim in tests/test_cli.py (test_readme_usage_commands_run_as_written);
here: every flag the documents name exists in the parser of the command it is given to, every config key in the
README's table is a QuantConfig field (or an alias of one), every relative link and #anchor resolves, and the
Python examples run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys

import yaml

from converter import config as config_module
from converter.cli import build_parser
from converter.config import QuantConfig

from .conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tools" / "README.md"]
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def subcommand_options() -> dict[str, set[str]]:
    """Subcommand -> the option strings its --help shows (hidden old spellings excluded), plus the global ones."""
    parser = build_parser()
    common = {s for a in parser._actions for s in a.option_strings}
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: common | {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
            for name, p in subs.choices.items()}


def config_keys() -> set[str]:
    """QuantConfig's fields, and the keys of any alias table config.py keeps for old spellings."""
    keys = {f.name for f in dataclasses.fields(QuantConfig)}
    for name, value in vars(config_module).items():
        if "ALIAS" in name.upper() and isinstance(value, dict):
            keys |= {k for k in value if isinstance(k, str)}
    return keys


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def command_lines(text: str) -> list[tuple[str, str]]:
    """(subcommand, text) for each `qconvert SUB ...` line of the bash blocks (continuations joined) and for each
    comment line right after one (`# [--flag ...]`: more options of that command)."""
    found = []
    for block in code_blocks(text, "bash"):
        current = None
        for line in block.replace("\\\n", " ").splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                if current:
                    found.append((current, stripped))
                continue
            current = None
            for part in stripped.split("&&"):
                m = re.match(r"\s*qconvert\s+([a-z-]+)(.*)", part.split(" #")[0])
                if m:
                    current = m.group(1)
                    found.append((current, m.group(2)))
    return found


def readme_table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with ``header``, as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_every_documented_command_line_uses_real_options():
    options = subcommand_options()
    bad, seen = [], 0
    for path in DOCS:
        for sub, text in command_lines(path.read_text(encoding="utf-8")):
            if sub not in options:
                bad.append(f"{path.name}: unknown command qconvert {sub}")
                continue
            for flag in FLAG.findall(text):
                seen += 1
                if flag not in options[sub]:
                    bad.append(f"{path.name}: qconvert {sub} has no {flag}")
    assert not bad, bad
    assert seen >= 40  # the README's and docs' examples name a few dozen options


def test_readme_quantize_options_exist_in_quantize_help():
    """The config table's flag column and the paragraph of flags without a config key: all of them quantize's."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quantize = subcommand_options()["quantize"]
    flags = [f for row in readme_table(text, "| key | flag |") for f in FLAG.findall(row[1])]
    for start in ("Flags without a config key", "**The `search:` section**"):
        paragraph = text[text.index(start):]
        flags += FLAG.findall(paragraph[:paragraph.index("\n\n")])
    assert len(flags) >= 40
    missing = sorted({f for f in flags if f not in quantize})
    assert not missing, f"README names quantize options that `qconvert quantize --help` lacks: {missing}"


def test_readme_config_keys_are_quantconfig_fields():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = readme_table(text, "| key | flag |")
    keys = [k for row in rows for k in re.findall(r"`([a-z0-9_]+)`", row[0])]
    assert len(keys) >= 30
    unknown = sorted(set(keys) - config_keys())
    assert not unknown, f"README's config table names keys QuantConfig does not take: {unknown}"
    # the default column is QuantConfig's default, key by key ("none", "all" and "the target's": unset)
    fields = {f.name: f for f in dataclasses.fields(QuantConfig)}
    wrong = []
    for row in rows:
        row_keys = re.findall(r"`([a-z0-9_]+)`", row[0])
        cells = [c.strip() for c in row[2].split(",")] if len(row_keys) > 1 else [row[2].strip()]
        assert len(cells) == len(row_keys), row
        for key, cell in zip(row_keys, cells):
            if key not in fields:
                continue  # an alias: its field's row documents the default
            f = fields[key]
            actual = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            documented = None if cell in ("none", "all", "the target's") else yaml.safe_load(cell.strip("`"))
            if isinstance(actual, tuple):
                actual = list(actual)
            if documented != actual:
                wrong.append(f"{key}: README {cell}, QuantConfig {actual!r}")
    assert not wrong, wrong


def test_every_flag_the_readme_names_exists_somewhere():
    """Prose too: a flag the README mentions outside code (pip's aside) belongs to some qconvert command."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    known = set().union(*subcommand_options().values())
    unknown = sorted({f for f in FLAG.findall(prose) if f not in known} - {"--index-url"})
    assert not unknown, unknown


def test_readme_job_file_keys_are_the_schema():
    from converter.batch import JOB_KEYS, TOP_KEYS, VERIFY_KEYS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = readme_table(text, "| job key |")
    job_keys = {k for row in rows for k in re.findall(r"`([a-z_]+)`", row[0])}
    assert job_keys == set(JOB_KEYS), job_keys ^ set(JOB_KEYS)
    verify_row = next(row for row in rows if row[0] == "`verify`")
    listed = set(re.search(r"\{([^}]*)\}", verify_row[1]).group(1).replace(" ", "").split(","))
    assert listed == set(VERIFY_KEYS), listed ^ set(VERIFY_KEYS)
    intro = text[text.index("**Job files**"):text.index("| job key |")]
    assert set(TOP_KEYS) <= set(re.findall(r"`([a-z_]+)`", intro))


def _slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    bad = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                bad.append(f"{path.name}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md":
                prose = re.sub(r"```.*?```", "", dest.read_text(encoding="utf-8"), flags=re.S)
                anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", prose, re.M)}
                if anchor not in anchors:
                    bad.append(f"{path.name}: {target} (no heading #{anchor})")
    assert not bad, bad


def test_python_examples_run(tmp_path):
    """The README's and docs/search.md's Python blocks, verbatim, in a copy of the bundled data after the quick
    start's export (the digits CNN: seconds)."""
    for folder in ("models", "calib_data", "eval_data"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "converter", "-q", "export", "models/digits_cnn.py:build", "--input-shape",
                    "1,1,8,8", "-o", "out/digits.onnx"], cwd=tmp_path, env=env, check=True, timeout=300)
    blocks = []
    for path in (ROOT / "README.md", ROOT / "docs" / "search.md"):
        blocks += [b for b in code_blocks(path.read_text(encoding="utf-8"), "python") if "out/digits.onnx" in b]
    assert len(blocks) >= 2
    script = tmp_path / "examples.py"
    script.write_text("\n\n".join(blocks) + "\nassert check.passed and result.report['search']['met']\n"
                      "print('examples ran')\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "examples ran" in proc.stdout, proc.stderr[-3000:]
    assert (tmp_path / "out" / "py" / "digits.qdq.onnx").is_file()
    assert (tmp_path / "out" / "py-iter" / "digits.qdq.onnx").is_file()  # quantized from Python data

