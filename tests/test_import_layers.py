"""The import layers of converter/, enforced: every import (module level and inside functions) is read with ``ast``,
the module graph is built, and an import cycle or an import from a lower layer into a higher one fails.

LAYERS below is the rule, written once (docs/architecture.md explains it). A module a layer does not name fails
too: a new module is placed in a layer when it is added. Imports under ``if TYPE_CHECKING:`` are checked against
the layers but do not count as cycles (they never run). Imports inside functions are allowed where they respect
the layers: they defer a heavy package (torch) or a worker-only path, never dodge a cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own layer and the layers before it. A prefix names a module and, when it is
# a package, every module in it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaf", ("converter._version", "converter.ops", "converter.errors", "converter.progress", "converter.timing",
              "converter.metrics", "converter.resources")),
    ("graph", ("converter.graph",)),
    ("settings", ("converter.schema", "converter.config", "converter.options")),
    ("runtime", ("converter.ort_session", "converter.binding", "converter.export")),
    ("calib", ("converter.calib",)),
    ("quant", ("converter.quant",)),
    ("passes and checks", ("converter.techniques", "converter.validation", "converter.verify")),
    ("flow", ("converter.pipeline", "converter.report", "converter.encodings_file")),
    ("search and analysis", ("converter.search", "converter.analysis")),
    ("batch", ("converter.batch", "converter.executors")),
    ("cli", ("converter.cli", "converter.commands", "converter.__main__", "converter")),
)
# leaf modules every layer reads: they import nothing from converter at all
PURE_LEAVES = ("converter._version", "converter.ops", "converter.errors")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (or the package whose __init__ an import runs)
    line: int
    lazy: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        kind = " (inside a function)" if self.lazy else " (TYPE_CHECKING)" if self.type_only else ""
        return f"{self.source} -> {self.target}  [{self.source.replace('.', '/')}.py:{self.line}]{kind}"


def find_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root/package`` (a package is its __init__.py)."""
    mods = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _is_package(mods: dict[str, Path], name: str) -> bool:
    return mods[name].name == "__init__.py"


def _resolve(mods: dict[str, Path], name: str) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return ids


def _in_function(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            ids.update(id(n) for n in ast.walk(node) if n is not node)
    return ids


def import_edges(root: Path, package: str) -> tuple[dict[str, Path], list[Edge]]:
    """Every import of a ``package`` module by a ``package`` module, with the package __init__ files an import runs
    (importing ``a.b.c`` from outside ``a.b`` runs ``a/b/__init__.py``; the top package's own __init__ excepted:
    it is the public facade, run by every import)."""
    mods = find_modules(root, package)
    edges: list[Edge] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy, type_only = _in_function(tree), _type_checking_nodes(tree)
        here = name if _is_package(mods, name) else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in targets:
                if not (t == package or t.startswith(package + ".")):
                    continue
                found = _resolve(mods, t)
                if found is None:
                    continue
                hits = {found}
                parts = found.split(".")
                for i in range(2, len(parts)):  # parent packages below the top one
                    parent = ".".join(parts[:i])
                    if not (name == parent or name.startswith(parent + ".")):
                        hits.add(parent)
                for hit in sorted(hits):
                    edge = Edge(name, hit, node.lineno, id(node) in lazy, id(node) in type_only)
                    if hit != name and edge not in edges:
                        edges.append(edge)
    return mods, edges


def layer_of(name: str, layers=LAYERS) -> int | None:
    """Index of the layer whose longest prefix names ``name``."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def upward_edges(edges: list[Edge], layers=LAYERS) -> list[str]:
    bad = []
    for e in edges:
        src, dst = layer_of(e.source, layers), layer_of(e.target, layers)
        if src is not None and dst is not None and dst > src:
            bad.append(f"{e}: layer '{layers[src][0]}' imports the higher layer '{layers[dst][0]}'")
    return bad


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), runtime imports only."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if not e.type_only:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _cycle_report(comps: list[list[str]], edges: list[Edge]) -> str:
    lines = []
    for comp in comps:
        inside = set(comp)
        lines.append("cycle: " + ", ".join(comp))
        lines += [f"    {e}" for e in edges if e.source in inside and e.target in inside and not e.type_only]
    return "\n".join(lines)


# --- the converter package -----------------------------------------------------------------------------------------

def test_every_module_has_a_layer():
    mods, _ = import_edges(ROOT, "converter")
    missing = [m for m in mods if layer_of(m) is None]
    assert not missing, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {missing}"
    assert len(mods) > 60  # the walk found the package


def test_no_upward_imports():
    _, edges = import_edges(ROOT, "converter")
    lazy = sum(e.lazy for e in edges)
    assert len(edges) > 300 and lazy > 0  # module-level and function-level imports were both read
    bad = upward_edges(edges)
    assert not bad, "imports against the layer order (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycles():
    _, edges = import_edges(ROOT, "converter")
    comps = cycles(edges)
    assert not comps, "import cycles:\n" + _cycle_report(comps, edges)


def test_pure_leaves_import_nothing_of_converter():
    _, edges = import_edges(ROOT, "converter")
    bad = [str(e) for e in edges if e.source in PURE_LEAVES]
    assert not bad, bad


def test_only_cli_layer_prints_or_parses_arguments():
    """Library code logs and returns data; printing and argparse live in converter/cli.py and converter/commands/.
    The batch job worker (converter/batch.py's ``_worker_main``, run as ``python -m converter.batch``) is a process
    entry point of its own: its stdout is the job's log."""
    allowed = {"converter.cli", "converter.__main__", "converter.batch"}
    mods = find_modules(ROOT, "converter")
    bad = []
    for name, path in mods.items():
        if name in allowed or name.startswith("converter.commands"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} print()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if "argparse" in names:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports argparse")
    assert not bad, "CLI code in library modules (move it to converter/commands/):\n" + "\n".join(bad)


def test_each_command_module_is_a_dispatched_subcommand():
    """converter/commands/<name>.py defines add_args and run, and cli.COMMANDS dispatches a subcommand to it."""
    from converter.cli import COMMANDS

    cli_text = (ROOT / "converter" / "cli.py").read_text(encoding="utf-8")
    for path in sorted((ROOT / "converter" / "commands").glob("*.py")):
        if path.stem in ("__init__", "argtypes", "config_flags"):  # helpers the subcommands share, no subcommand
            continue
        defined = {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}
        assert {"add_args", "run"} <= defined, path
        assert f'_lazy("commands.{path.stem}")' in cli_text, f"{path.stem} is not dispatched by converter/cli.py"
    assert {"validate", "verify", "batch", "analyze", "compare"} <= set(COMMANDS)


# --- the checker itself, on a package built to break each rule -----------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_cycles_and_upward_edges(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "from . import b\n",  # a <-> b: a cycle inside one layer
        "pkg/low/b.py": "def f():\n    from .a import x  # inside a function: still an edge\n",
        "pkg/low/c.py": "def g():\n    from ..high import h  # upward, hidden in a function\n",
        "pkg/low/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import E\n",
        "pkg/low/e.py": "from .d import D\n",  # d <-> e only through TYPE_CHECKING: not a cycle
        "pkg/high.py": "import pkg.low.c\nfrom pkg.low import a\n",
    })
    layers = (("low", ("pkg.low",)), ("high", ("pkg.high", "pkg")))
    mods, edges = import_edges(tmp_path, "pkg")
    assert set(mods) == {"pkg", "pkg.low", "pkg.low.a", "pkg.low.b", "pkg.low.c", "pkg.low.d", "pkg.low.e",
                         "pkg.high"}
    lazy = [e for e in edges if e.lazy]
    assert {(e.source, e.target) for e in lazy} == {("pkg.low.b", "pkg.low.a"), ("pkg.low.c", "pkg.high")}
    # pkg.high importing pkg.low.c also runs pkg/low/__init__.py
    assert ("pkg.high", "pkg.low") in {(e.source, e.target) for e in edges}
    bad = upward_edges(edges, layers)
    assert len(bad) == 1 and "pkg.low.c -> pkg.high" in bad[0] and "pkg/low/c.py:2" in bad[0], bad
    assert sorted(cycles(edges)) == [["pkg.high", "pkg.low.c"], ["pkg.low.a", "pkg.low.b"]]  # d <-> e is not one
    assert layer_of("pkg.low.a", layers) == 0 and layer_of("pkg.high", layers) == 1 and layer_of("x", layers) is None
