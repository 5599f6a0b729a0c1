"""Author-year labels for the book's bibliography ("Sønderby et al., 2016", not "SonderbyRMaaloe+16").

sphinxcontrib-bibtex labels the entries of a ``{bibliography}`` with its pybtex style's label
style; pybtex ships only ``alpha`` and ``number``. This module adds an author-year label style and
a formatting style ``lvae_author_year`` (pybtex's ``unsrt`` with these labels, sorted by author and
year) and registers both when Sphinx loads it (``sphinx: extra_extensions: [lvae.book.bibstyle]`` and
``bibtex_default_style: lvae_author_year`` in ``_config.yml``).
"""
from __future__ import annotations

from collections import Counter
from string import ascii_lowercase

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle

NAME = "lvae_author_year"


def _last_names(person) -> str:
    """A person's last name(s) as plain Unicode text (LaTeX accents resolved: S{\\o}nderby -> Sønderby)."""
    return Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as("text")


def author_year(entry) -> str:
    """``Last, year`` / ``Last and Other, year`` / ``Last et al., year`` for one pybtex entry."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    if not persons:
        names = Text.from_latex(entry.fields.get("title", entry.key)).render_as("text")
    elif len(persons) == 1:
        names = _last_names(persons[0])
    elif len(persons) == 2:
        names = f"{_last_names(persons[0])} and {_last_names(persons[1])}"
    else:
        names = f"{_last_names(persons[0])} et al."
    year = entry.fields.get("year", "n.d.")
    return f"{names}, {year}"


class AuthorYearLabelStyle(BaseLabelStyle):
    """Author-year labels; equal labels get a, b, ... after the year, in bibliography order."""

    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        labels = [author_year(e) for e in entries]
        counts, seen = Counter(labels), Counter()
        for label in labels:
            if counts[label] > 1:
                seen[label] += 1
                yield label + ascii_lowercase[(seen[label] - 1) % 26]
            else:
                yield label


class AuthorYearStyle(UnsrtStyle):
    """pybtex's ``unsrt`` entries with author-year labels, sorted by author, year and title."""

    default_label_style = NAME
    default_sorting_style = "author_year_title"


def register() -> None:
    """Make ``lvae_author_year`` known to pybtex (idempotent)."""
    register_plugin("pybtex.style.labels", NAME, AuthorYearLabelStyle, force=True)
    register_plugin("pybtex.style.formatting", NAME, AuthorYearStyle, force=True)


def setup(app):
    """Sphinx extension hook."""
    register()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
