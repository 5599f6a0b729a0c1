"""The package's layering: the import graph between lvae's modules has no cycle, and no module
imports a sibling inside a function (a hidden import hides a cycle or a layering breach).

The graph is read from the source with :mod:`ast`, so the check needs nothing installed and
sees every import, including those inside functions that a run would never reach.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lvae"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__main__")


def _sibling(node: ast.AST) -> list[str]:
    """The lvae modules one import statement names (``from . import a, b``, ``from .x import y``,
    ``import lvae.x``, ``from lvae import x``)."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 or node.module == "lvae" or (node.module or "").startswith("lvae."):
            base = (node.module or "").removeprefix("lvae").lstrip(".")
            if base:
                return [base.split(".")[0]]
            return [a.name for a in node.names if a.name in MODULES]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("lvae.")]
    return []


def imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules imported at import time, [(line, module) imported inside a function])."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"lvae/{module}.py")
    top: set[str] = set()
    hidden: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = [m for m in _sibling(child) if m != module and m in MODULES]
            if in_function:
                hidden.extend((child.lineno, m) for m in names)
            elif not _type_checking_only(child, node):
                top.update(names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, hidden


def _type_checking_only(child: ast.AST, parent: ast.AST) -> bool:
    return (isinstance(parent, ast.If) and isinstance(parent.test, ast.Name) and parent.test.id == "TYPE_CHECKING"
            and child in parent.body)


def graph() -> dict[str, set[str]]:
    return {m: imports(m)[0] for m in MODULES}


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := dfs(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := dfs(m)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_hidden_imports_are_seen(tmp_path, monkeypatch):
    src = "from . import a\ndef f():\n    from .b import x\n    import lvae.c\n"
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", ["a", "b", "c", "m"])
    (tmp_path / "m.py").write_text(src)
    assert imports("m") == ({"a"}, [(3, "b"), (4, "c")])


def test_the_package_import_graph_has_no_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


@pytest.mark.parametrize("module", MODULES)
def test_no_sibling_import_inside_a_function(module):
    hidden = imports(module)[1]
    assert not hidden, f"lvae/{module}.py imports siblings inside functions: " + ", ".join(
        f"line {line}: {m}" for line, m in hidden) + " (import at the top; a cycle means a module is in the wrong layer)"


def test_the_readme_module_table_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    missing = [m for m in MODULES if m != "__init__" and f"`lvae/{m}.py`" not in readme]
    assert not missing, f"README.md's module table lacks {missing}"


def dynamic_imports(module: str) -> list[int]:
    """Lines where ``module`` loads a module by name (``importlib.import_module``, ``__import__``): an
    import that neither the import graph nor the checks above see."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"lvae/{module}.py")
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
        or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))]


def test_dynamic_imports_are_seen(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    (tmp_path / "m.py").write_text("import importlib\nx = importlib.import_module('lvae.plots')\n"
                                   "y = __import__('os')\n")
    assert dynamic_imports("m") == [2, 3]


@pytest.mark.parametrize("module", MODULES)
def test_no_module_is_loaded_by_name(module):
    lines = dynamic_imports(module)
    assert not lines, f"lvae/{module}.py loads modules by name at lines {lines}: import them at the top"


def test_the_registry_imports_neither_the_training_step_nor_the_data():
    """runs.py is the registry: evaluating a stored run (evaluate_run) lives with the step's evaluation."""
    assert not imports("runs")[0] & {"train", "datasets", "data", "engine", "training"}
