"""What a chapter calls: its set-up (profile, parameters, run registry), ``glue`` and tables.

Every chapter opens with the same three cells, hidden in the HTML (``remove-cell``):

1. the install cell. Where ``lvae`` is not importable (Colab, a fresh Python) it clones the
   repository (``repository.url`` of ``_config.yml``, with its committed runs) and installs it with
   the ``book`` extra; everywhere it then runs :func:`install_extra`, which installs what is
   missing of the ``book`` extra (e.g. ipywidgets where lvae was installed without it);
2. the papermill ``parameters`` cell: ``profile`` and the overrides of
   :data:`lvae.book.plan.PARAMETERS`, where
   papermill injects the values it is given;
3. the set-up cell: the chapter's imports, each name it uses from lvae imported by name (e.g.
   ``from lvae.book.chapter import glue, setup, table``), then
   ``P = setup(profile, dataset=dataset, depths=depths, ...)`` (:func:`setup`), every parameter of
   the parameters cell passed by name. ``P`` is the profile with the parameters applied and the run
   registry it reads (:class:`lvae.book.plan.ChapterProfile`). Nothing else is defined in the
   chapter's namespace: a name a chapter uses is one it imports or assigns.

The run registry comes from one rule, :func:`lvae.book.plan.plan_registry`, which :func:`setup`
evaluates in every kernel: it survives a kernel restart and does not depend on the folder or on an
environment variable surviving. The committed runs are found in the lvae repository
(:func:`lvae.registry.runs.repository`: the source checkout lvae is imported from, else the folder
pip installed it from). A chapter reads them there when they hold every run it needs; otherwise it
works in a scratch registry under the repository's ``_build/`` and says first what it will train.
The build itself (``lvae book``) is :mod:`lvae.book.build`.
"""
from __future__ import annotations

import ast
import contextlib
import html
import importlib
import importlib.metadata
import inspect
import re
import subprocess
import sys
import textwrap
from typing import Any, Sequence

from lvae.book.plan import BookError, ChapterProfile, chapter_profile


def setup(profile: str, **parameters: Any) -> ChapterProfile:
    """The chapter's set-up: ``P = setup(profile, dataset=dataset, depths=depths, ...)``.

    ``profile`` and ``parameters`` (the overrides of :data:`lvae.book.plan.PARAMETERS`; None keeps
    the profile's value) are the values of the chapter's papermill ``parameters`` cell, passed by
    name. Checks them (a bad value is one line naming the parameter, with an example); picks the run
    registry (:func:`lvae.book.plan.plan_registry`), applies it and prints it, with what will be
    trained and roughly how long, before anything is; selects inline figures and glues ``budget``
    and ``profile`` for the prose. Returns the profile with the parameters applied and its run
    registry ``P.plan`` (:class:`lvae.book.plan.ChapterProfile`). It defines no name in the chapter.
    """
    P = chapter_profile(profile, **parameters)
    P.plan.apply()
    print(P.plan.describe())
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None:
        with contextlib.suppress(NotImplementedError):  # a bare InteractiveShell (no kernel) has no GUI hook
            shell.run_line_magic("matplotlib", "inline")
    glue("budget", P.budget())
    glue("profile", P.name)
    return P


def _requirement_installed(requirement: str) -> bool:
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if name is None:
        return True
    try:
        version = importlib.metadata.version(name.group(1))
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return True  # installed; its version is not checked without `packaging`
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def extra_requirements(extra: str = "book") -> list[str]:
    """The requirements of lvae's optional ``extra`` (pyproject.toml), without their markers."""
    out = []
    for req in importlib.metadata.requires("lvae") or []:
        spec, _, marker = req.partition(";")
        if re.search(r"""extra\s*==\s*["']""" + re.escape(extra) + """["']""", marker):
            out.append(spec.strip())
    return out


def install_extra(extra: str = "book") -> None:
    """Install (pip) the requirements of lvae's ``extra`` that are missing or too old.

    For the install cell: lvae installed without the ``book`` extra lacks e.g. ipywidgets, which
    the latent chapter needs. Nothing is installed when everything is there.
    """
    missing = [r for r in extra_requirements(extra) if not _requirement_installed(r)]
    if missing:
        print(f"Installing what the chapters need from lvae's {extra!r} extra: {' '.join(missing)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
        importlib.invalidate_caches()


# -- helpers for chapters ------------------------------------------------------------------------
class _Text(str):
    """A string whose repr is itself, so ``{glue:text}`` prints it without quotes."""

    def __repr__(self) -> str:
        return str(self)


def glue(name: str, value: Any, display: bool = False) -> None:
    """myst-nb's ``glue`` (numbers in prose); a no-op where myst-nb is not installed (Colab).

    Floats are glued as Python floats (format them in the prose: ``{glue:text}`name:.2f```),
    strings without quotes. myst-nb reads a glued text as a Python literal where it can, so a string
    such as ``"10,000"`` would print as ``(10, 0)``: such strings are refused (glue the number and
    format it in the prose, ``{glue:text}`name:,```).
    """
    if isinstance(value, str):
        try:
            literal = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            literal = value
        if isinstance(literal, (tuple, list, dict, set)):
            raise BookError(f"glue({name!r}, {value!r}): the book would print this as {literal!r}; glue the "
                            f"number itself and format it in the prose, e.g. {{glue:text}}`{name}:,`")
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    if isinstance(value, str):
        value = _Text(value)
    elif hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    _glue(name, value, display=display)


class Table:
    """A small HTML table (``_repr_html_``) with a caption; ``None`` cells print as an em dash, a
    tuple cell as one line per item."""

    def __init__(self, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, caption: str = "",
                 fmt: str = "{:.2f}"):
        self.rows = list(rows)
        self.columns = list(columns or (self.rows[0].keys() if self.rows else []))
        self.caption, self.fmt = caption, fmt

    def _cell(self, v: Any, line_break: str = "<br>") -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return self.fmt.format(v)
        if isinstance(v, tuple):
            return line_break.join(self._cell(x, line_break) for x in v)
        return html.escape(str(v))

    def _td(self, v: Any) -> str:
        """One cell. lvae.css keeps a short value on one line (``-85.23``, ``not run``,
        ``64-32-16-8``, ``cpu, 2 threads``); a cell with a line longer than 14 characters is a
        phrase, which may wrap where the table is too wide for the page."""
        lines = v if isinstance(v, tuple) else (v,)
        phrase = any(len(self._cell(x, " ")) > 14 for x in lines)
        return f'<td class="lvae-phrase">{self._cell(v)}</td>' if phrase else f"<td>{self._cell(v)}</td>"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(self._td(r.get(c)) for c in self.columns) + "</tr>" for r in self.rows)
        cap = f'<p class="lvae-caption">{html.escape(self.caption)}</p>' if self.caption else ""
        return (f'<div class="lvae-table-wrap"><table class="lvae-table"><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>{cap}</div>")

    def __repr__(self) -> str:
        lines = [" | ".join(self.columns)] + [" | ".join(self._cell(r.get(c), " ") for c in self.columns)
                                              for r in self.rows]
        return (self.caption + "\n" if self.caption else "") + "\n".join(lines)


def show_source(obj: Any):
    """The source of a library function without its docstring, as highlighted code (for chapters
    that show "the few lines that implement it")."""
    from IPython.display import Code

    src = textwrap.dedent(inspect.getsource(obj))
    node = ast.parse(src).body[0]
    lines = src.splitlines()
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = body[0]
        lines = lines[:doc.lineno - 1] + lines[doc.end_lineno:]
    return Code("\n".join(lines), language="python")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, caption: str = "",
          fmt: str = "{:.2f}") -> Table:
    return Table(rows, columns, caption, fmt)

