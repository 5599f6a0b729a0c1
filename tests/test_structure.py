"""The package's layout and layering.

``lvae/`` is a few folders named by job (model, data, registry, training, report, book) over the
typed configuration (``lvae/config.py``), with the command line (``lvae/cli.py``) on top. Each
folder's ``__init__.py`` says what it holds and which folders it may import ("May import: ...");
these tests read every import with :mod:`ast` (so nothing needs installing and every import is
seen, also one inside a function that a run would never reach) and check:

* the folders import only what their docstrings allow, and the modules of the package have no cycle;
* no module imports another inside a function or loads one by name (a hidden import hides a cycle
  or a layering breach);
* every module is listed in its folder's docstring and in the README's module table.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lvae"
ROOT_MODULES = {"__init__", "config", "cli"}  # the public API, the configuration, the command line


def module_name(path: Path, package: Path) -> str:
    """``lvae/model/gaussian.py`` -> ``model.gaussian``; a folder's ``__init__.py`` -> ``model``."""
    parts = path.relative_to(package).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def all_modules(package: Path | None = None) -> dict[str, Path]:
    package = package or PACKAGE
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))
            if "__pycache__" not in p.parts and p.stem != "__main__"}


MODULES = all_modules()
FOLDERS = sorted({m.split(".")[0] for m in MODULES if "." in m})


def folder(module: str) -> str:
    """The folder a module lives in, or the module itself at the package's root."""
    return module.split(".")[0]


def _resolve(module: str, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The lvae modules one import statement names (``from lvae.x import y``, ``from lvae.x import
    mod``, ``import lvae.x.y``, ``from . import a``, ``from ..x import y``)."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            here = module.split(".") if modules[module].name == "__init__.py" and "." not in module and \
                module != "__init__" else module.split(".")[:-1]
            base = here[: len(here) - node.level + 1] if node.level > 1 else here
            target = ".".join(base + ([node.module] if node.module else []))
        elif node.module == "lvae" or (node.module or "").startswith("lvae."):
            target = node.module.removeprefix("lvae").lstrip(".")
        else:
            return []
        found = [f"{target}.{a.name}".lstrip(".") for a in node.names
                 if f"{target}.{a.name}".lstrip(".") in modules]
        if target in modules and len(found) < len(node.names):
            found.append(target)
        return found
    if isinstance(node, ast.Import):
        out = []
        for a in node.names:
            if a.name.startswith("lvae."):
                name = a.name.removeprefix("lvae.")
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                out += [name] if name else []
        return out
    return []


def imports(module: str, modules: dict[str, Path] | None = None) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules imported at import time, [(line, module) imported inside a function])."""
    modules = modules or MODULES
    tree = ast.parse(modules[module].read_text(), filename=str(modules[module]))
    top: set[str] = set()
    hidden: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = [m for m in _resolve(module, child, modules) if m != module]
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


def graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = modules or MODULES
    return {m: imports(m, modules)[0] for m in modules}


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


def allowed_folders(folder_name: str) -> set[str]:
    """The folders ``lvae/<folder_name>/__init__.py`` says it may import ("May import: lvae.a, lvae.b")."""
    doc = ast.get_docstring(ast.parse((PACKAGE / folder_name / "__init__.py").read_text())) or ""
    found = re.search(r"^May import: (.*)$", doc, flags=re.M)
    assert found, f"lvae/{folder_name}/__init__.py: its docstring needs a line 'May import: lvae.x, ...'"
    return {name.strip().removeprefix("lvae.") for name in found[1].split(",") if name.strip()}


def listed_modules(folder_name: str) -> set[str]:
    """The modules ``lvae/<folder_name>/__init__.py``'s docstring lists (``* ``name`` -- ...``)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / folder_name / "__init__.py").read_text())) or ""
    return set(re.findall(r"^\* ``(\w+)`` --", doc, flags=re.M))


def layering_breaches(g: dict[str, set[str]]) -> list[str]:
    """Every import from a folder into a folder its docstring does not allow."""
    allowed = {f: allowed_folders(f) | {f} for f in FOLDERS}
    allowed["config"] = {"config"}
    breaches = []
    for m, deps in sorted(g.items()):
        if folder(m) not in allowed:  # lvae/__init__.py and lvae/cli.py: on top
            continue
        breaches += [f"lvae.{m} imports lvae.{d}" for d in sorted(deps) if folder(d) not in allowed[folder(m)]]
    return breaches


# -- the checkers catch what they look for ------------------------------------------------------------
def test_cycle_finder_finds_a_planted_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_form_is_seen(tmp_path):
    pkg = tmp_path / "lvae"
    (pkg / "model").mkdir(parents=True)
    for name in ("__init__.py", "config.py", "model/__init__.py", "model/a.py", "model/b.py", "model/c.py"):
        (pkg / name).write_text("")
    (pkg / "model" / "m.py").write_text(
        "from lvae.model import a\nfrom lvae.config import X\nfrom .b import y\nimport lvae.model.c as c\n"
        "def f():\n    from lvae.model.b import x\n    import lvae.config\n")
    modules = all_modules(pkg)
    assert imports("model.m", modules) == ({"model.a", "config", "model.b", "model.c"},
                                           [(6, "model.b"), (7, "config")])


def test_a_layering_breach_is_found():
    g = {**graph(), "model.gaussian": {"training.loop"}}
    assert layering_breaches(g) == ["lvae.model.gaussian imports lvae.training.loop"]


# -- the package -------------------------------------------------------------------------------------
def test_the_package_is_folders_by_job():
    assert FOLDERS == ["book", "data", "model", "registry", "report", "training"]
    loose = sorted(m for m in MODULES if "." not in m and m not in FOLDERS)
    assert loose == sorted(ROOT_MODULES), f"modules at lvae/'s root other than {sorted(ROOT_MODULES)}: {loose}"


@pytest.mark.parametrize("folder_name", FOLDERS)
def test_each_folder_says_what_it_holds(folder_name):
    present = {m.split(".")[1] for m in MODULES if folder(m) == folder_name and "." in m}
    listed = listed_modules(folder_name)
    assert listed == present, (f"lvae/{folder_name}/__init__.py's docstring lists {sorted(listed)}, the folder "
                               f"holds {sorted(present)}")


def test_folders_import_only_the_folders_their_docstrings_allow():
    assert layering_breaches(graph()) == []


def test_the_configuration_imports_nothing_of_lvae():
    assert imports("config")[0] == set()


def test_the_package_import_graph_has_no_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_folder_graph_has_no_cycle():
    folders = {f: {folder(d) for m, deps in graph().items() if folder(m) == f for d in deps} - {f}
               for f in {folder(m) for m in MODULES}}
    found = cycle(folders)
    assert found is None, "folders import each other: " + " -> ".join(found)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_lvae_import_inside_a_function(module):
    hidden = imports(module)[1]
    assert not hidden, f"lvae.{module} imports lvae modules inside functions: " + ", ".join(
        f"line {line}: {m}" for line, m in hidden) + " (import at the top; a cycle means a module is in the wrong layer)"


def test_the_readme_module_table_lists_every_module_by_folder():
    readme = (PACKAGE.parent / "README.md").read_text()
    missing = [m for m in MODULES if m not in ("__init__", *FOLDERS)
               and f"`lvae/{m.replace('.', '/')}.py`" not in readme]
    assert not missing, f"README.md's module table lacks {missing}"
    for f in FOLDERS:
        assert re.search(rf"^#+ .*`lvae/{f}/`", readme, flags=re.M), f"README.md has no heading for `lvae/{f}/`"


def dynamic_imports(path: Path) -> list[int]:
    """Lines where a file loads a module by name (``importlib.import_module``, ``__import__``): an
    import that neither the import graph nor the checks above see."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
        or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))]


def test_dynamic_imports_are_seen(tmp_path):
    (tmp_path / "m.py").write_text("import importlib\nx = importlib.import_module('lvae.book.plots')\n"
                                   "y = __import__('os')\n")
    assert dynamic_imports(tmp_path / "m.py") == [2, 3]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_loaded_by_name(module):
    lines = dynamic_imports(MODULES[module])
    assert not lines, f"lvae.{module} loads modules by name at lines {lines}: import them at the top"


def test_the_registry_imports_neither_the_training_step_nor_the_data():
    """registry.runs is the registry: evaluating a stored run (evaluate_run) lives with the step's evaluation."""
    assert not {folder(m) for m in imports("registry.runs")[0]} & {"training", "data"}


def test_the_command_line_does_not_load_matplotlib():
    """``lvae train`` / ``lvae runs`` start without the figures' library (the book's build loads it
    when it runs)."""
    import subprocess
    code = "import sys, lvae.cli; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
