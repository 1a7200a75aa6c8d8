"""The shape of the package: imports run one way, no cycle, no hidden imports, a config without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parents[1] / "composer"


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str, bool]]]:
    """-> (composer modules imported at the top level, [(line, module, commented)] imported in a body)."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    top, inner = set(), []

    def names(node) -> list[str]:
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "composer":
                return [f"composer.{a.name}" for a in node.names]
            return [node.module]
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        return []

    for node in tree.body:
        for n in names(node):
            if n.startswith("composer."):
                top.add(n.split(".")[1])
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                for n in names(sub):
                    if n.startswith("composer"):
                        inner.append((sub.lineno, n, "#" in lines[sub.lineno - 1]
                                      or "#" in lines[sub.lineno - 2]))
    return top, inner


def test_no_import_circle_in_composer():
    G = nx.DiGraph()
    for f in PKG.glob("*.py"):
        top, _ = _imports(f)
        G.add_node(f.stem)
        for m in top:
            if m != f.stem and (PKG / f"{m}.py").exists():
                G.add_edge(f.stem, m)
    cycles = list(nx.simple_cycles(G))
    assert not cycles, f"import circles: {cycles}"


def test_function_level_imports_of_composer_say_why():
    """An import inside a function is there to avoid a heavy dependency, and says so in a comment."""
    bad = []
    for f in sorted(PKG.glob("*.py")):
        if f.stem == "cli":  # the command line imports lazily by design: --help must not load torch
            continue
        _, inner = _imports(f)
        bad += [f"{f.name}:{line} {m}" for line, m, commented in inner if not commented]
    assert not bad, f"imports hidden in function bodies without a reason: {bad}"


def test_config_and_task_specs_import_without_torch():
    """`--help`, `task list` and `task show` need neither torch nor transformers."""
    code = "import sys, composer.config, composer.tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_choice_lists_have_one_home():
    from composer import config, graph_io, heads, prompts, similarity, tasks, transfer

    assert heads.HEADS is config.HEADS is tasks.HEADS and prompts.INITS is config.INITS
    assert similarity.METRICS is config.SIMILARITY_METRICS
    assert graph_io.EDGE_METRICS is config.EDGE_METRICS and transfer.LINK_METRICS is config.LINK_METRICS
