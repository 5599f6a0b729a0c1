"""The book: the smoke build, its HTML, the runner's failure modes, and the Colab notebooks.

`smoke_book` builds the whole book once per session with `lvae book --profile smoke` (runs in the
build-local registry _build/smoke-results, HTML in _build/test-book/html); the browser test in
test_book_browser.py reuses it.
"""
from __future__ import annotations

import ast
import builtins
import functools
import json
import os
import re
import subprocess
import symtable
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "_build" / "test-book"

jupytext = pytest.importorskip("jupytext", reason="the book extras are not installed (pip install -e .[book])")
pytest.importorskip("papermill", reason="the book extras are not installed (pip install -e .[book])")

from lvae.book import build as bookbuild  # noqa: E402
from lvae.book import chapter as book  # noqa: E402
from lvae.book import plan as book_plan  # noqa: E402


def _lvae(*args: str, cwd: Path = ROOT, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvae.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def smoke_book() -> Path:
    return _build_smoke_book()


@functools.cache
def _build_smoke_book() -> Path:
    if os.environ.get("LVAE_TEST_REUSE_BOOK") and (OUT / "html" / "intro.html").exists():
        return OUT  # development only: reuse the last smoke build
    t0 = time.perf_counter()
    proc = _lvae("book", "--profile", "smoke", "--out", str(OUT))
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"smoke book failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (OUT / "build-seconds.json").write_text(json.dumps({"seconds": round(seconds, 1)}))
    return OUT


class _Pages(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.error_outputs = 0
        self.stderr_outputs = 0
        self.scripts: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "img" and a.get("src"):
            self.imgs.append(a["src"])
        if "output" in classes and ("error" in classes or "traceback" in classes):
            self.error_outputs += 1
        if "output" in classes and "stderr" in classes:
            self.stderr_outputs += 1
        if tag == "script":
            self.scripts.append(a.get("src") or a.get("type") or "")
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])


def _parse(path: Path) -> tuple[_Pages, str]:
    text = path.read_text()
    p = _Pages()
    p.feed(text)
    return p, text


def test_every_chapter_has_a_page(smoke_book):
    html = smoke_book / "html"
    for chapter in bookbuild.toc_chapters():
        assert (html / f"{chapter}.html").exists(), f"no page for chapter {chapter}"


def test_no_error_outputs_and_every_image_resolves(smoke_book):
    html = smoke_book / "html"
    for chapter in bookbuild.toc_chapters():
        pages, text = _parse(html / f"{chapter}.html")
        assert pages.error_outputs == 0, f"{chapter}: error output cell"
        assert "Traceback (most recent call last)" not in text, f"{chapter}: traceback in the page"
        assert pages.stderr_outputs == 0, f"{chapter}: stderr output (warnings) in the page"
        for src in pages.imgs:
            if src.startswith("data:"):
                continue
            target = (html / unquote(urlparse(src).path)).resolve()
            assert target.is_file(), f"{chapter}: <img src={src!r}> does not resolve"


def test_figures_and_glued_numbers_are_present(smoke_book):
    html = smoke_book / "html"
    for chapter in ("intro", "methods", "warmup", "batchnorm", "latent", "samples"):
        pages, text = _parse(html / f"{chapter}.html")
        assert any(not s.startswith("data:") for s in pages.imgs), f"{chapter}: no figure"
    _, intro = _parse(html / "intro.html")
    glued = re.findall(r'<span class="pasted-text">([^<]*)</span>', intro)
    assert any("smoke" in g and "epochs" in g for g in glued), "the budget sentence is not glued into the prose"
    assert sum(bool(re.fullmatch(r"-?\d+\.\d\d", g)) for g in glued) >= 4, f"too few glued numbers: {glued}"
    # the speed table of the reproduce chapter comes from benchmarks/results.json
    reproduce = (html / "reproduce.html").read_text()
    assert "benchmarks/results.json (benchmarks/bench.py)" in reproduce and "library fp32 compiled" in reproduce


def test_widget_state_is_embedded_and_js_served_locally(smoke_book):
    html = smoke_book / "html"
    pages, text = _parse(html / "latent.html")
    assert "application/vnd.jupyter.widget-state+json" in pages.scripts
    state = re.search(r'<script type="application/vnd.jupyter.widget-state\+json">(.*?)</script>', text, re.S)
    models = json.loads(state.group(1))["state"]
    names = {m["model_name"] for m in models.values()}
    assert {"StackModel", "IntSliderModel", "ImageModel", "LinkModel"} <= names
    srcs = [src.split("?")[0] for src in pages.scripts]
    assert srcs.index("_static/widgets/require.js") < srcs.index("_static/widgets/embed-amd.js")
    assert "_static/mathjax/tex-mml-chtml.js" in srcs
    assert (html / "_static" / "widgets" / "embed-amd.js").stat().st_size > 1_000_000
    for chapter in bookbuild.toc_chapters():
        page = (html / f"{chapter}.html").read_text()
        assert "cdn.jsdelivr.net" not in page and "cdnjs.cloudflare.com" not in page, f"{chapter}: CDN script"
        if chapter != "latent":  # 4 MB of widget JavaScript only where there are widgets
            assert "widgets/embed-amd.js" not in page


def test_colab_launch_link_on_every_chapter(smoke_book):
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = urlparse(cfg["repository"]["url"]).path.strip("/")
    for chapter in bookbuild.toc_chapters():
        pages, _ = _parse(smoke_book / "html" / f"{chapter}.html")
        branch = cfg["repository"]["branch"]
        want = f"https://colab.research.google.com/github/{repo}/blob/{branch}/book/{chapter}.ipynb"
        assert want in pages.links, f"{chapter}: no Colab link {want}"
        assert (ROOT / "book" / f"{chapter}.ipynb").exists()


def test_injected_parameters_are_hidden(smoke_book):
    nb = json.loads((smoke_book / "executed" / "book" / "intro.ipynb").read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "remove-cell" in injected[0]["metadata"]["tags"]
    assert "profile = \"smoke\"" in "".join(injected[0]["source"])


# -- Colab notebooks -----------------------------------------------------------------------------
@pytest.mark.parametrize("chapter", bookbuild.toc_chapters())
def test_paired_notebook_in_sync(chapter):
    md = ROOT / "book" / f"{chapter}.md"
    committed = (ROOT / "book" / f"{chapter}.ipynb").read_text()
    expected = jupytext.writes(jupytext.read(md), fmt="ipynb")
    assert bookbuild.notebook_text_key(committed) == bookbuild.notebook_text_key(expected), (
        f"book/{chapter}.ipynb is out of sync with book/{chapter}.md; run `make notebooks`")
    assert all(not c.get("outputs") for c in json.loads(committed)["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("chapter", bookbuild.toc_chapters())
def test_chapter_installs_lvae_from_the_configured_repository(chapter):
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    nb = jupytext.read(ROOT / "book" / f"{chapter}.md")
    install, parameters, setup = [c for c in nb.cells if c.cell_type == "code"][:3]
    assert "import lvae" in install.source and f'REPO = "{url}"' in install.source
    # the book extra (ipywidgets, ...) everywhere, not only where lvae was missing
    assert './lvae-repo[book]' in install.source and 'lvae.book.chapter.install_extra("book")' in install.source
    assert "parameters" in parameters.metadata.get("tags", [])
    params = bookbuild.notebook_parameters(ROOT / "book" / f"{chapter}.md")
    assert params["profile"] == "cpu" and set(params) - {"profile"} <= set(book_plan.PARAMETERS)
    # the set-up: the chapter's imports, then one library call that is passed every parameter by name
    # (not a copy of its steps in every chapter, and nothing read from or put into the notebook's globals)
    assert "remove-cell" in setup.metadata.get("tags", [])
    *imports, call = ast.parse(setup.source).body
    assert imports and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in imports), f"{chapter}: third cell"
    want = "P = setup(profile, " + ", ".join(f"{k}={k}" for k in params if k != "profile") + ")"
    assert ast.unparse(call) == want, f"{chapter}: third cell ends {ast.unparse(call)!r}, not {want!r}"


def _chapter_code(chapter: str) -> str:
    """The code cells of a chapter as one Python module (IPython syntax made Python)."""
    from IPython.core.inputtransformer2 import TransformerManager

    tm = TransformerManager()
    nb = jupytext.read(ROOT / "book" / f"{chapter}.md")
    return "\n".join(tm.transform_cell(c.source) for c in nb.cells if c.cell_type == "code")


def unbound_and_unused(code: str) -> tuple[set[str], set[str]]:
    """(names the code uses that it neither imports nor assigns and that are not builtins, names it
    imports and never uses), read from the compiler's symbol tables: a use inside a function, class
    or comprehension counts when the name is the module's."""
    top = symtable.symtable(code, "<chapter>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used = {s.get_name() for s in top.get_symbols() if s.is_referenced()}

    def visit(table: symtable.SymbolTable) -> None:
        for child in table.get_children():
            used.update(s.get_name() for s in child.get_symbols() if s.is_global() and s.is_referenced())
            visit(child)

    visit(top)
    imported = {s.get_name() for s in top.get_symbols() if s.is_imported()}
    return used - bound - set(dir(builtins)), imported - used


def test_unbound_and_unused_names_are_found():
    code = "import os\nfrom x import a, b\ndef f(y):\n    return y + a + zz\nL = [j for j in range(3) if j > k]\n"
    assert unbound_and_unused(code) == ({"zz", "k"}, {"os", "b"})


@pytest.mark.parametrize("chapter", bookbuild.toc_chapters())
def test_chapter_uses_only_names_it_imports_or_assigns(chapter):
    """Where a name in a chapter comes from is in the chapter: nothing is put into its namespace
    from outside (papermill's injected cell only repeats the parameters cell's names)."""
    unbound, unused = unbound_and_unused(_chapter_code(chapter))
    assert not unbound, f"book/{chapter}.md uses {sorted(unbound)} without importing or assigning them"
    assert not unused, f"book/{chapter}.md imports {sorted(unused)} and never uses them"


# -- the runner's failure modes ------------------------------------------------------------------
def _mini_book(tmp_path: Path, body: str) -> Path:
    (tmp_path / "book").mkdir()
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    (tmp_path / "_config.yml").write_text("title: t\nexecute:\n  execute_notebooks: 'off'\n")
    header = (ROOT / "book" / "intro.md").read_text().split("---\n")[1]
    (tmp_path / "book" / "intro.md").write_text(
        "---\n" + header + "---\n\n# Mini\n\n```{code-cell} ipython3\n:tags: [parameters]\n\nprofile = \"cpu\"\n"
        "epochs = None\n```\n\n" + body)
    return tmp_path


def test_failing_chapter_names_chapter_and_cell_and_never_reaches_html(tmp_path):
    root = _mini_book(tmp_path, "```{code-cell} ipython3\nx = 1\n```\n\n```{code-cell} ipython3\n"
                                "raise ValueError('boom in the chapter')\n```\n")
    with pytest.raises(book_plan.BookError) as e:
        bookbuild.build("smoke", root=root, out=tmp_path / "_build", log=lambda *a: None)
    msg = str(e.value)
    assert "'intro'" in msg and "cell" in msg and "ValueError" in msg and "boom in the chapter" in msg
    assert not (tmp_path / "_build" / "executed" / "book" / "intro.ipynb").exists()
    assert not (tmp_path / "_build" / "html").exists()
    assert (tmp_path / "_build" / "executed" / "failed" / "intro.ipynb").exists()  # kept for inspection


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_unknown_profile_and_parameter_are_refused_before_any_work(tmp_path):
    t0 = time.perf_counter()
    proc = _lvae("book", "--profile", "nope", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "unknown profile 'nope'" in proc.stderr and "smoke" in proc.stderr
    proc = _lvae("book", "--profile", "smoke", "-p", "learning_rate=3", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "learning_rate" in proc.stderr and "epochs" in proc.stderr
    proc = _lvae("book", "--profile", "smoke", "--chapter", "nope", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "unknown chapter" in proc.stderr
    proc = _lvae("book", "--profile", "smoke", "-p", "epochs", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "NAME=VALUE" in proc.stderr
    assert not (tmp_path / "b").exists(), "work started before the request was validated"
    assert time.perf_counter() - t0 < 120


def test_resolve_profile_overrides():
    p = book_plan.resolve_profile("smoke", epochs=3, depths=[1], seed=2, iw_k=None)
    assert (p.epochs, p.depths, p.seeds, p.iw_k) == (3, (1,), (2,), 50)
    with pytest.raises(Exception, match="unknown chapter parameter"):
        book_plan.resolve_profile("smoke", lr=1)


# -- chapter parameters: papermill's way, one-line errors ----------------------------------------
@pytest.mark.parametrize("value, depths", [("[1]", (1,)), ("[1, 2]", (1, 2)), ("2", (2,)), ([1, 2], (1, 2)), (3, (3,))])
def test_papermill_parameters_are_read_as_yaml(value, depths):
    """`papermill -p depths "[1]"` passes the string "[1]"; `-y "depths: [1]"` the list."""
    p = book_plan.resolve_profile("smoke", depths=value, epochs="3", seed="2", test_subset="null")
    assert (p.depths, p.epochs, p.seeds, p.test_subset) == (depths, 3, (2,), 500)


@pytest.mark.parametrize("name, value, example", [
    ("depths", "abc", '-p depths "[1, 2]"'), ("depths", "[0]", '-p depths "[1, 2]"'),
    ("depths", "[1, x", '-p depths "[1, 2]"'), ("epochs", "three", "-p epochs 3"), ("epochs", 2.5, "-p epochs 3"),
    ("seed", -1, "-p seed 1"), ("dataset", "cifar", "-p dataset mnist"), ("iw_k", True, "-p iw_k 50"),
])
def test_bad_parameter_is_one_line_naming_it(name, value, example):
    with pytest.raises(book_plan.ParameterError) as e:
        book.setup("smoke", **{name: value})
    msg = str(e.value)
    assert "\n" not in msg and f"papermill parameter {name}={value!r}" in msg and example in msg, msg
    assert e.value._render_traceback_() == [f"ParameterError: {msg}"]  # what the notebook shows: one line


def test_bad_profile_is_one_line():
    with pytest.raises(book_plan.ParameterError, match=r"profile='nope' .*smoke.*e\.g\. -p profile smoke"):
        book.setup("nope")


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_lvae_book_names_the_parameter_in_its_own_syntax(tmp_path):
    proc = _lvae("book", "--profile", "smoke", "-p", "depths=abc", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "depths='abc'" in line and "-p depths=[1,2]" in line
    assert not (tmp_path / "b").exists()


# -- which registry a chapter reads --------------------------------------------------------------
def test_repository_is_found_from_a_source_checkout():
    assert book_plan.repository() == ROOT


def _fake_repository(tmp_path: Path, runs: list[str]) -> Path:
    """A repository with some of the committed runs (config, metrics, provenance; no weights)."""
    repo = tmp_path / "repo"
    (repo / "lvae").mkdir(parents=True)
    (repo / "lvae" / "__init__.py").write_text("")
    (repo / "pyproject.toml").write_text("[project]\nname = 'lvae'\n")
    for name in runs:
        src = ROOT / "results" / name
        (repo / "results" / name).mkdir(parents=True)
        for f in ("config.json", "metrics.jsonl", "provenance.json"):
            (repo / "results" / name / f).write_bytes((src / f).read_bytes())
        (repo / "results" / name / "checkpoint.pt").write_bytes(b"local only")
    return repo


def test_registry_rule(tmp_path, monkeypatch):
    """All runs committed -> the committed registry; otherwise a scratch registry with the reusable
    committed runs copied in and the rest announced (epochs, time) before anything trains;
    $LVAE_RESULTS set by the user wins, and the value setup() itself set does not count as the user's."""
    from lvae.registry.runs import RESULTS_ENV

    monkeypatch.delenv(RESULTS_ENV, raising=False)
    monkeypatch.setattr(book_plan, "_registry_set_by_setup", None)
    P = book_plan.resolve_profile("cpu", depths=[1])
    names = [c.dir_name for c in book_plan.profile_configs(P)]
    assert len(names) == len(P.variants) and all("-1-" in n for n in names)
    repo = _fake_repository(tmp_path, names)
    monkeypatch.setattr(book_plan, "repository", lambda: repo)
    plan = book_plan.plan_registry(P)
    assert (plan.path, plan.source, plan.reuse, plan.train) == (repo / "results", "committed", (), ())
    assert "nothing to train" in plan.describe()

    # another profile, or parameters that change the runs: never results/
    P2 = book_plan.resolve_profile("cpu", depths=[1, 2])
    plan = book_plan.plan_registry(P2)
    assert plan.source == "scratch" and plan.path == repo / "_build" / "cpu-results"
    assert sorted(p.name for p in plan.reuse) == sorted(names)
    trained = [name for name, *_ in plan.train]
    assert len(trained) == len(P.variants) and all("-2-" in n for n in trained)
    text = plan.describe()
    assert "first trains 4 run(s)" in text and "10 epochs" in text and trained[0] in text
    plan.apply()
    assert os.environ[RESULTS_ENV] == str(repo / "_build" / "cpu-results")
    copied = repo / "_build" / "cpu-results" / names[0]
    assert (copied / "metrics.jsonl").exists() and not (copied / "checkpoint.pt").exists()
    assert sorted(p.name for p in (repo / "results").iterdir()) == sorted(names)  # results/ untouched
    again = book_plan.plan_registry(P2)  # setup's own $LVAE_RESULTS is not a user's choice: same rule, nothing to copy
    assert (again.source, again.reuse, [t[0] for t in again.train]) == ("scratch", (), trained)
    assert book_plan.plan_registry(P).source == "committed"

    # more epochs than the committed runs have: trained in scratch, the time scaled from the committed runs
    plan = book_plan.plan_registry(book_plan.resolve_profile("cpu", depths=[1], epochs=20))
    assert plan.source == "scratch" and plan.reuse == () and len(plan.train) == len(names)
    from lvae.registry.runs import Run

    for name, epochs, seconds, device in plan.train:
        wall = Run(repo / "results" / name).provenance["wall_seconds"]  # 10 epochs, one IW-5000 evaluation
        assert epochs == 20 and 1.2 * wall < seconds < 2.5 * wall and device.startswith("cpu")
    assert "about" in plan.describe() and " min in all at the speed of the committed runs (cpu" in plan.describe()

    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "mine"))  # the user asked for this registry
    plan = book_plan.plan_registry(P)
    assert (plan.path, plan.source, len(plan.train)) == (tmp_path / "mine", "env", len(names))


def test_registry_without_a_repository_is_a_scratch_one(monkeypatch):
    from lvae.registry.runs import RESULTS_ENV

    monkeypatch.delenv(RESULTS_ENV, raising=False)
    monkeypatch.setattr(book_plan, "_registry_set_by_setup", None)
    monkeypatch.setattr(book_plan, "repository", lambda: None)
    plan = book_plan.plan_registry(book_plan.resolve_profile("smoke"))
    assert plan.source == "scratch" and plan.path.name == "smoke-results" and "not installed from a clone" in plan.why
    assert "no committed run" in plan.describe()


def test_setup_returns_the_profile_and_its_registry_and_defines_nothing(monkeypatch):
    from lvae.registry.profiles import Profile
    from lvae.registry.runs import RESULTS_ENV

    monkeypatch.delenv(RESULTS_ENV, raising=False)
    monkeypatch.setattr(book_plan, "_registry_set_by_setup", None)
    ns = {"profile": "cpu", "depths": "[1]", "epochs": None, "setup": book.setup}
    before = dict(ns)
    exec("P = setup(profile, depths=depths, epochs=epochs)", ns)
    P = ns.pop("P")
    ns.pop("__builtins__")
    assert ns == before and all(ns[k] is before[k] for k in ns)  # the chapter's namespace: only P is new
    assert isinstance(P, Profile) and P.depths == (1,) and P.epochs == book_plan.load_profile("cpu").epochs
    assert P.plan.source == "committed" and P.plan.path == ROOT / "results"
    assert os.environ[RESULTS_ENV] == str(ROOT / "results")


def test_registry_table_lists_only_the_runs_given():
    from lvae.registry.runs import Run
    from lvae.report.registry_tables import registry_rows

    run = Run(ROOT / "results" / "mnist-vae-1-21e2840653")
    assert [r["run"] for r in registry_rows(runs=[run])] == [run.name]


def test_install_extra_installs_only_what_is_missing(monkeypatch):
    calls = []
    monkeypatch.setattr(book.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    reqs = book.extra_requirements("book")
    assert any(r.startswith("ipywidgets") for r in reqs) and any(r.startswith("papermill") for r in reqs)
    book.install_extra("book")
    assert calls == []  # the test environment has the book extra
    monkeypatch.setattr(book, "extra_requirements", lambda extra: ["ipywidgets>=8.1,<9", "no-such-package-lvae>=1"])
    book.install_extra("book")
    assert calls and calls[0][-1:] == ["no-such-package-lvae>=1"] and calls[0][1:4] == ["-m", "pip", "install"]


# -- the book's prerequisites --------------------------------------------------------------------
def test_missing_npm_is_reported_before_any_chapter_runs(tmp_path, monkeypatch):
    root = _mini_book(tmp_path, "```{code-cell} ipython3\nx = 1\n```\n")
    monkeypatch.setenv("LVAE_BOOK_JS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-npm-here"))

    def executed(*a, **k):
        raise AssertionError("a chapter ran before the npm check")

    monkeypatch.setattr(bookbuild, "execute_chapter", executed)
    with pytest.raises(book_plan.BookError, match=r"needs npm .*install Node\.js"):
        bookbuild.build("smoke", root=root, out=tmp_path / "_build", log=lambda *a: None)


def test_environment_yml_matches_pyproject():
    """Core dependencies from conda with pyproject's version ranges; every extra through pip from
    pyproject itself; nothing else but the interpreter, cpuonly, pip and Node.js (npm)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    conda = [d for d in env if isinstance(d, str)]
    [pip] = [d["pip"] for d in env if isinstance(d, dict)]
    conda_name = {"torch": "pytorch"}

    def split(req: str) -> tuple[str, str]:
        name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", req.split(";")[0].strip()).groups()
        return conda_name.get(name.lower(), name.lower()), ",".join(sorted(spec.replace(" ", "").split(",")))

    want = dict(split(r) for r in project["dependencies"])
    have = dict(split(d) for d in conda if not re.match(r"(python|cpuonly|pip|nodejs)\b", d))
    assert have == want
    assert any(d.startswith("nodejs") for d in conda), "npm (Node.js) is a prerequisite of the book"
    extras = ",".join(sorted(project["optional-dependencies"]))
    assert pip == [f"-e .[{extras}]"]


# -- chapters run with papermill, as their users run them ----------------------------------------
def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """The repository as a fresh clone has it: the sources and chapters of this working tree and the
    committed runs (training in progress here does not reach it)."""
    dest = tmp_path_factory.mktemp("clone") / "lvae-repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "lvae", "book",
                            "pyproject.toml", "README.md", "LICENSE"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    files += subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            (dest / f).write_bytes((ROOT / f).read_bytes())
    return dest


def _papermill(notebook: Path, out: Path, cwd: Path, pythonpath: Path, *params: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LVAE_")}
    env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([sys.executable, "-m", "papermill", str(notebook), str(out), "--kernel", "python3",
                           *params], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc


def _setup_output(executed: Path) -> str:
    nb = json.loads(executed.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "P = setup(profile" in "".join(cell["source"]):
            return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))
    raise AssertionError("no set-up cell")


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_chapter_from_a_plain_install_in_another_folder_reads_the_committed_runs(repo_copy, tmp_path):
    """Colab after a restart: lvae is a plain (non-editable) install of the clone, the kernel runs in
    another folder, no LVAE_* variable is set. The chapter reads the clone's committed runs and
    trains nothing (it used to train all 20 models into ./results)."""
    site = tmp_path / "site-packages"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(repo_copy)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    assert not (site / "lvae" / "pyproject.toml").exists() and (site / "lvae" / "book" / "chapter.py").exists()
    before = _listing(repo_copy / "results")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _papermill(repo_copy / "book" / "intro.ipynb", tmp_path / "out.ipynb", elsewhere, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = _setup_output(tmp_path / "out.ipynb")
    assert f"Run registry: {repo_copy / 'results'} (the committed runs)" in said and "nothing to train" in said
    assert _listing(repo_copy / "results") == before, "the chapter wrote into the committed registry"
    assert list(elsewhere.iterdir()) == [] and not (repo_copy / "_build").exists(), "the chapter trained something"


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_papermill_depths_list_from_the_repository_root(repo_copy, tmp_path):
    """`papermill book/<chapter>.ipynb out -p depths "[1]"` from the repository root works and
    leaves results/ as it was."""
    before = _listing(repo_copy / "results")
    proc = _papermill(Path("book") / "intro.ipynb", tmp_path / "out.ipynb", repo_copy, repo_copy,
                      "-p", "depths", "[1]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to train" in _setup_output(tmp_path / "out.ipynb")
    nb = json.loads((tmp_path / "out.ipynb").read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "depths = \"[1]\"" in "".join(injected[0]["source"])
    assert _listing(repo_copy / "results") == before and not (repo_copy / "_build").exists()


# -- the small things of issue 13: bibliography labels, the samples page names its models ------------
def _bibliography_labels(page: str) -> list[str]:
    """The labels of a page's bibliography entries (sphinxcontrib-bibtex: <span class="label">[...]</span>)."""
    spans = re.findall(r'<div class="citation"[^>]*>\s*<span class="label">(.*?)</span>\s*</span>', page, re.S)
    return [re.sub(r"<[^>]+>", "", s).strip("[]") for s in spans]


def test_bibliography_style_labels_are_author_year():
    """lvae.book.bibstyle labels every entry of book/references.bib "Last et al., year" (not pybtex's
    alpha labels such as "SonderbyRMaaloe+16"), and the labels are unique."""
    from pybtex.database import parse_file
    from pybtex.plugin import find_plugin

    from lvae.book import bibstyle

    bibstyle.register()
    style = find_plugin("pybtex.style.formatting", bibstyle.NAME)()
    entries = parse_file(ROOT / "book" / "references.bib").entries.values()
    labels = {e.key: e.label for e in style.format_entries(entries)}
    assert labels["sonderby2016ladder"] == "Sønderby et al., 2016"
    assert labels["rezende2015variational"] == "Rezende and Mohamed, 2015"
    assert len(set(labels.values())) == len(labels), labels
    for label in labels.values():
        assert re.fullmatch(r"[^\W\d_][^,]*, \d{4}[a-z]?", label), label
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["sphinx"]["config"]["bibtex_default_style"] == bibstyle.NAME
    assert "lvae.book.bibstyle" in cfg["sphinx"]["extra_extensions"]


def test_bibliography_renders_author_year_labels(smoke_book):
    page = (smoke_book / "html" / "reproduce.html").read_text()
    labels = _bibliography_labels(page)
    assert "Sønderby et al., 2016" in labels, labels
    assert all(re.fullmatch(r"[^\W\d_][^,]*, \d{4}[a-z]?", label) for label in labels), labels
    assert "SonderbyRMaaloe+16" not in page


def test_samples_page_names_the_models_that_made_it(smoke_book):
    """Every figure of the samples page is glued to the model that made it: variant, depth, seed,
    epochs and registry run, read from the run, and the budget."""
    from lvae.book.plots import label
    from lvae.registry.profiles import load_profile

    P = load_profile("smoke")
    _, text = _parse(smoke_book / "html" / "samples.html")
    glued = [g.replace("‘", "'").replace("’", "'")  # the prose's typographic quotes
             for g in re.findall(r'<span class="pasted-text">([^<]*)</span>', text)]
    for v in ("lvae_bn_wu", "vae_bn_wu"):
        assert f"{label(v)} {P.max_depth}-layer, seed {P.seeds[0]}, {P.epochs} epochs" in glued, glued
        assert any(re.fullmatch(rf"mnist-{v}-{P.max_depth}-[0-9a-f]{{10}}", g) for g in glued), glued
    assert P.budget() in glued


def test_table_marks_phrases_and_keeps_values_whole():
    """lvae.book.chapter.Table marks a cell with a line longer than 14 characters as a phrase (it may wrap);
    values such as "not run" are unmarked, and lvae.css keeps those on one line."""
    html = book.table([{"model": "VAE+BN+WU 3-layer (best VAE)", "ours": "not run", "L": ("-85.23", "L50 (100 images)"),
                        "latent": "64-32-16-8-4", "n": 3.0}])._repr_html_()
    cells = re.findall(r"<td( class=\"lvae-phrase\")?>(.*?)</td>", html)
    assert [(bool(cls), text) for cls, text in cells] == [
        (True, "VAE+BN+WU 3-layer (best VAE)"), (False, "not run"), (True, "-85.23<br>L50 (100 images)"),
        (False, "64-32-16-8-4"), (False, "3.00")]
    css = (ROOT / "book" / "_static" / "lvae.css").read_text()
    assert "table.lvae-table td { white-space: nowrap; }" in css and "td.lvae-phrase { white-space: normal;" in css
