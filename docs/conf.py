"""Sphinx configuration of daskrun's documentation.

Built with warnings as errors by ``scripts/test``:

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

# this checkout's package, not whichever one the environment installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import daskrun  # noqa: E402

project = "daskrun"
author = "daskrun's authors"
copyright = "daskrun's authors"
release = version = daskrun.__version__

extensions = [
    "myst_parser",  # the pages are Markdown, as the README was
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
    "sphinx.ext.napoleon",  # numpy- and Google-style docstring sections
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# "[text](page.md#a-heading)" links: anchors for headings down to ###
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_numpy_docstring = True
napoleon_google_docstring = True

html_theme = "furo"
html_title = f"daskrun {release}"


def _one_entry_per_name(app, what, name, obj, options, lines):
    """A numpy-style entry may name several parameters (``arguments,
    source_directory, ...``, even wrapped over two lines), as numpydoc reads
    it; napoleon and Sphinx's fields take one name an entry, so each name
    gets the entry's description. The docstrings stay as written."""

    def names(line):
        parts = [part.strip() for part in line.split(",")]
        return parts if all(part.isidentifier() for part in parts if part) else None

    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        listed = names(line) if line.strip() and ":" not in line else None
        if not listed or len(listed) < 2:
            i += 1
            continue
        end = i + 1
        while line.rstrip().endswith(",") and end < len(lines):  # wrapped
            more = names(lines[end]) if ":" not in lines[end] else None
            if not more or len(lines[end]) - len(lines[end].lstrip()) != indent:
                break
            listed += more
            line = lines[end]
            end += 1
        listed = [part for part in listed if part]
        body = []
        while end < len(lines) and (
            not lines[end].strip()
            or len(lines[end]) - len(lines[end].lstrip()) > indent
        ):
            body.append(lines[end])
            end += 1
        while body and not body[-1].strip():  # the blank lines after stay
            body.pop()
            end -= 1
        entries = []
        for each in listed:
            entries += [" " * indent + each, *body]
        lines[i:end] = entries
        i += len(entries)


def setup(app):
    # before napoleon's own handler (priority 500) reads the sections
    app.connect("autodoc-process-docstring", _one_entry_per_name, priority=400)
