"""Execute the book's chapters with papermill and build the HTML (``lvae book``).

Each chapter is a jupytext MyST-markdown file in ``book/`` with a ``parameters``-tagged cell.
:func:`build` validates the profile and every override and checks that the JavaScript the pages
need is at hand (npm, or its cache) *before any chapter runs*, says which run registry the
chapters will use and what they will train (:func:`lvae.book.plan.plan_registry`), executes each
chapter with papermill into a staging folder (``_build/executed/``), fails on the first cell error
with the chapter and cell named (the half-executed notebook is deleted, never built), tags the
injected parameters cell ``remove-cell``, then runs ``jupyter-book build`` with execution off over
the staged notebooks, with a table of contents generated from the root ``_toc.yml``.

All JavaScript the pages need beyond the theme (``requirejs``, ``@jupyter-widgets/html-manager``
for the kernel-free widgets, MathJax 3) comes from the npm registry once (cached in
``~/.cache/lvae/book-js``) and is served from the book's own ``_static/``: pages work offline
(:mod:`lvae.book.assets`, also the small Sphinx extension that orders those scripts and keeps the
4 MB widget manager off pages without widgets).

What chapters call (their set-up, ``glue``, ``table``) lives in :mod:`lvae.book.chapter`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from lvae.book.assets import book_assets, fetch_book_js
from lvae.book.plan import BookError, ParameterError, plan_registry, resolve_profile
from lvae.config import ConfigError
from lvae.registry.profiles import available, load_profile
from lvae.registry.runs import RESULTS_ENV

ROOT = Path(__file__).resolve().parents[2]
BOOK_DIR = "book"
STATIC_SRC = "_lvae_static"  # staged static folder (copied to _static/ in the HTML)


# -- chapters ------------------------------------------------------------------------------------
def toc_chapters(root: Path = ROOT) -> list[str]:
    """Chapter names (``book/<name>.md``) in table-of-contents order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    names = [toc["root"]]
    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        names += [c["file"] for c in part.get("chapters", [])]
    return [Path(n).name for n in names]


def notebook_parameters(md_path: Path) -> dict[str, Any]:
    """The names and defaults of the ``parameters`` cell of a jupytext markdown chapter."""
    import jupytext

    nb = jupytext.read(md_path)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            ns: dict[str, Any] = {}
            exec(compile(cell.source, str(md_path), "exec"), {}, ns)  # literals only, by convention
            return ns
    raise BookError(f"{md_path.name}: no cell tagged 'parameters'; add one (profile = \"cpu\", ...)")


def check_request(profile: str, chapters: Sequence[str], params: dict[str, Any], root: Path = ROOT) -> list[str]:
    """Validate profile, chapter names and parameters before any work; return the chapters to run."""
    if profile not in available():
        raise BookError(f"unknown profile {profile!r}; choose one of {available()} (lvae/registry/profiles.yml)")
    try:
        load_profile(profile)
    except ConfigError as e:
        raise BookError(str(e)) from None
    if "profile" in params:
        raise BookError("give the profile with --profile NAME, not as a parameter")
    all_chapters = toc_chapters(root)
    wanted = list(chapters) or all_chapters
    bad = [c for c in wanted if c not in all_chapters]
    if bad:
        raise BookError(f"unknown chapter(s) {bad}; chapters: {all_chapters}")
    for c in wanted:
        known = notebook_parameters(root / BOOK_DIR / f"{c}.md")
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise BookError(f"chapter {c!r} has no parameter(s) {unknown}; its parameters: {sorted(known)}")
    try:
        resolve_profile(profile, style="lvae book", **params)
    except ParameterError as e:
        raise BookError(str(e)) from None
    return wanted


def execute_chapter(md_path: Path, out_path: Path, profile: str, params: dict[str, Any], cwd: Path,
                    log=print) -> float:
    """Execute one chapter with papermill into ``out_path``; raise BookError naming the failing cell.

    The notebook is executed into a temporary file next to ``out_path`` and moved into place only
    when every cell succeeded; on failure the partial notebook is deleted (kept in
    ``<out>/failed/`` for inspection, outside the book sources).
    """
    import jupytext
    import nbformat
    import papermill as pm

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_in = out_path.with_name(f".{md_path.stem}.input.ipynb")
    tmp_out = out_path.with_name(f".{md_path.stem}.running.ipynb")
    nb = jupytext.read(md_path)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_in)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(tmp_in), str(tmp_out), parameters={"profile": profile, **params},
                            kernel_name="python3", cwd=str(cwd), progress_bar=False, log_output=False)
    except pm.PapermillExecutionError as e:
        failed = out_path.parent.parent / "failed"
        failed.mkdir(parents=True, exist_ok=True)
        if tmp_out.exists():
            shutil.move(str(tmp_out), failed / f"{md_path.stem}.ipynb")
        out_path.unlink(missing_ok=True)
        src = (e.source or "").strip().splitlines()
        first = src[0] if src else ""
        raise BookError(f"chapter {md_path.stem!r} failed in code cell [{e.exec_count}] (starting {first!r}): "
                        f"{e.ename}: {e.evalue} [partial notebook: {failed / (md_path.stem + '.ipynb')}]") from None
    except BaseException:  # also Ctrl-C (KeyboardInterrupt): no partial notebook is left next to the chapters
        tmp_out.unlink(missing_ok=True)
        out_path.unlink(missing_ok=True)
        raise
    finally:
        tmp_in.unlink(missing_ok=True)
    executed = nbformat.read(tmp_out, as_version=4)
    for cell in executed.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    nbformat.write(executed, tmp_out)
    os.replace(tmp_out, out_path)
    seconds = time.perf_counter() - t0
    log(f"  {md_path.stem}: executed in {seconds:.0f} s")
    return seconds


def notebook_text_key(text: str) -> str:
    """A notebook's JSON with the random cell ids removed (what "in sync" compares)."""
    nb = json.loads(text)
    for cell in nb.get("cells", []):
        cell.pop("id", None)
    return json.dumps(nb, sort_keys=True)


def sync_notebooks(root: Path = ROOT, check: bool = False) -> list[str]:
    """Write ``book/<chapter>.ipynb`` (outputs stripped, for Colab) from each ``book/<chapter>.md``,
    after setting the install cell's ``REPO = "..."`` to ``repository.url`` of ``_config.yml``.

    With ``check`` nothing is written; returns the chapters whose notebook is out of sync.
    """
    import jupytext

    url = yaml.safe_load((root / "_config.yml").read_text())["repository"]["url"]
    stale = []
    for c in toc_chapters(root):
        md = root / BOOK_DIR / f"{c}.md"
        text = md.read_text()
        fixed = re.sub(r'REPO = "[^"]*"', f'REPO = "{url}"', text)
        if fixed != text:
            stale.append(c)
            if not check:
                md.write_text(fixed)
        text = jupytext.writes(jupytext.reads(fixed, fmt="md:myst"), fmt="ipynb")
        target = root / BOOK_DIR / f"{c}.ipynb"
        if not target.exists() or notebook_text_key(target.read_text()) != notebook_text_key(text):
            if c not in stale:
                stale.append(c)
            if not check:
                target.write_text(text)
    return stale


# -- HTML ----------------------------------------------------------------------------------------
def stage_sources(executed: Path, src: Path, chapters: Iterable[str], root: Path = ROOT) -> None:
    """A jupyter-book source folder ``src``: config, generated toc, static files, executed notebooks."""
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    present = [c for c in chapters if (executed / f"{c}.ipynb").exists()]
    if not present:
        raise BookError(f"no executed chapters in {executed}; run `lvae book --profile NAME` first")
    for c in present:
        shutil.copy2(executed / f"{c}.ipynb", src / f"{c}.ipynb")
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    keep = set(present)
    root_name = Path(toc["root"]).name
    if root_name not in keep:
        raise BookError(f"the book's root chapter {root_name!r} was not executed; include it (--chapter {root_name})")
    new_toc: dict[str, Any] = {"format": "jb-book", "root": root_name}
    parts = []
    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        chs = [{"file": Path(c["file"]).name} for c in part.get("chapters", []) if Path(c["file"]).name in keep]
        if chs:
            parts.append({**{k: v for k, v in part.items() if k != "chapters"}, "chapters": chs})
    if parts:
        new_toc["parts"] = parts
    (src / "_toc.yml").write_text(yaml.safe_dump(new_toc, sort_keys=False))
    for bib in (root / BOOK_DIR).glob("*.bib"):
        shutil.copy2(bib, src / bib.name)
    # Static files go to a folder *not* named _static: jupyter-book would add every .js under a
    # _static source folder (all of MathJax's) to every page. Sphinx copies it to _static/.
    static = src / STATIC_SRC
    if (root / BOOK_DIR / "_static").exists():
        shutil.copytree(root / BOOK_DIR / "_static", static)
    js = book_assets(static, src / "_extra")
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    cfg.setdefault("execute", {})["execute_notebooks"] = "off"
    sphinx = cfg.setdefault("sphinx", {})
    sphinx["extra_extensions"] = list(sphinx.get("extra_extensions") or []) + ["lvae.book.assets"]
    sphinx_cfg = sphinx.setdefault("config", {})
    sphinx_cfg["nb_ipywidgets_js"] = js
    sphinx_cfg["mathjax_path"] = "mathjax/tex-mml-chtml.js"  # relative to _static: no CDN
    sphinx_cfg["html_static_path"] = [STATIC_SRC]
    sphinx_cfg["html_extra_path"] = ["_extra"]
    if (static / "favicon.png").exists():
        cfg.setdefault("html", {})["favicon"] = f"{STATIC_SRC}/favicon.png"
    (src / "_config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def build_html(src: Path, html_out: Path, strict: bool = True, log=print) -> None:
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(src), "--builder", "html"]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise BookError(f"jupyter-book build failed (exit {proc.returncode}):\n{tail}")
    if html_out.exists():
        shutil.rmtree(html_out)
    shutil.copytree(src / "_build" / "html", html_out)
    log(f"  HTML built in {time.perf_counter() - t0:.0f} s -> {html_out}/index.html")


def build(profile: str = "cpu", chapters: Sequence[str] = (), params: dict[str, Any] | None = None,
          results: str | None = None, out: str | os.PathLike = "_build", html: bool = True, strict: bool = True,
          root: Path = ROOT, log=print) -> Path:
    """Execute the chapters with ``profile`` and build the HTML; returns the HTML folder.

    ``results`` is the run registry the chapters read and train into; by default each chapter's
    ``lvae.book.chapter.setup`` picks it (:func:`lvae.book.plan.plan_registry`): the committed ``results/`` when
    it holds every run, else a scratch registry under ``_build/``. Both the request and the
    JavaScript prerequisites (npm) are checked before any chapter runs.
    """
    params = dict(params or {})
    wanted = check_request(profile, chapters, params, root)
    if html:
        fetch_book_js()
    out = Path(out) if Path(out).is_absolute() else root / out
    executed = out / "executed" / "book"
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MPLBACKEND": os.environ.get("MPLBACKEND", "module://matplotlib_inline.backend_inline"),
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    if results is not None:
        env[RESULTS_ENV] = str(Path(results) if Path(results).is_absolute() else root / results)
    stamp = executed.parent / "profile.json"
    request = {"profile": profile, "params": params}
    if stamp.exists() and json.loads(stamp.read_text()) != request and executed.exists():
        shutil.rmtree(executed)  # never mix chapters executed with different profiles or parameters
    executed.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(request))
    with _environ(env):
        log(f"lvae book: profile {profile!r}, chapters {wanted}")
        log("  " + plan_registry(resolve_profile(profile, **params)).describe())
        t0 = time.perf_counter()
        for c in wanted:
            execute_chapter(root / BOOK_DIR / f"{c}.md", executed / f"{c}.ipynb", profile, params,
                            cwd=root / BOOK_DIR, log=log)
        log(f"  chapters executed in {time.perf_counter() - t0:.0f} s")
    html_out = out / "html"
    if html:
        stage_sources(executed, out / "book-src", toc_chapters(root), root)
        complete = all((executed / f"{c}.ipynb").exists() for c in toc_chapters(root))
        if strict and not complete:
            log("  not every chapter is executed: cross-references to the missing ones are not errors")
        build_html(out / "book-src", html_out, strict=strict and complete, log=log)
    return html_out


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables (inherited by the papermill kernels) for the duration of a build."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; VALUE is parsed as YAML (``depths=[1,2]``, ``epochs=3``, ``seed=null``)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise BookError(f"parameter {item!r} must be NAME=VALUE (e.g. epochs=3)")
        try:
            out[name.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            why = str(getattr(e, "problem", None) or e).strip()
            raise BookError(f"parameter {item!r}: {value!r} is not a YAML value ({why}); e.g. -p depths=[1,2] "
                            f"or -p epochs=3") from None
    return out
