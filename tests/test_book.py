"""The book: the smoke build, its HTML, the runner's failure modes, and the Colab notebooks.

`smoke_book` builds the whole book once per session with `lvae book --profile smoke` (runs in the
build-local registry _build/smoke-results, HTML in _build/test-book/html); the browser test in
test_book_browser.py reuses it.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
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

from lvae import book  # noqa: E402


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
    for chapter in book.toc_chapters():
        assert (html / f"{chapter}.html").exists(), f"no page for chapter {chapter}"


def test_no_error_outputs_and_every_image_resolves(smoke_book):
    html = smoke_book / "html"
    for chapter in book.toc_chapters():
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
    for chapter in book.toc_chapters():
        page = (html / f"{chapter}.html").read_text()
        assert "cdn.jsdelivr.net" not in page and "cdnjs.cloudflare.com" not in page, f"{chapter}: CDN script"
        if chapter != "latent":  # 4 MB of widget JavaScript only where there are widgets
            assert "widgets/embed-amd.js" not in page


def test_colab_launch_link_on_every_chapter(smoke_book):
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = urlparse(cfg["repository"]["url"]).path.strip("/")
    for chapter in book.toc_chapters():
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
@pytest.mark.parametrize("chapter", book.toc_chapters())
def test_paired_notebook_in_sync(chapter):
    md = ROOT / "book" / f"{chapter}.md"
    committed = (ROOT / "book" / f"{chapter}.ipynb").read_text()
    expected = jupytext.writes(jupytext.read(md), fmt="ipynb")
    assert book.notebook_text_key(committed) == book.notebook_text_key(expected), (
        f"book/{chapter}.ipynb is out of sync with book/{chapter}.md; run `make notebooks`")
    assert all(not c.get("outputs") for c in json.loads(committed)["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("chapter", book.toc_chapters())
def test_chapter_installs_lvae_from_the_configured_repository(chapter):
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    nb = jupytext.read(ROOT / "book" / f"{chapter}.md")
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "import lvae" in first_code.source and f'REPO = "{url}"' in first_code.source
    params = book.notebook_parameters(ROOT / "book" / f"{chapter}.md")
    assert params["profile"] == "cpu" and set(params) - {"profile"} <= set(book.OVERRIDES)


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
    with pytest.raises(book.BookError) as e:
        book.build("smoke", root=root, out=tmp_path / "_build", log=lambda *a: None)
    msg = str(e.value)
    assert "'intro'" in msg and "cell" in msg and "ValueError" in msg and "boom in the chapter" in msg
    assert not (tmp_path / "_build" / "executed" / "book" / "intro.ipynb").exists()
    assert not (tmp_path / "_build" / "html").exists()
    assert (tmp_path / "_build" / "executed" / "failed" / "intro.ipynb").exists()  # kept for inspection


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
    p = book.resolve_profile("smoke", epochs=3, depths=[1], seed=2, iw_samples=None)
    assert (p.epochs, p.depths, p.seeds, p.iw_samples) == (3, (1,), (2,), 50)
    with pytest.raises(Exception, match="unknown chapter parameter"):
        book.resolve_profile("smoke", lr=1)
