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
copyright = "daskrun's authors"  # noqa: A001 - Sphinx's name
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


def _join_wrapped_names(app, what, name, obj, options, lines):  # noqa: ANN001
    """One numpy-style entry may name several parameters, wrapped over two
    lines (``arguments, source_directory, ...,`` then ``run_max_try, ...``),
    as numpydoc reads it; napoleon takes only one line, so the wrapped names
    are joined before it reads them. The docstrings stay as written."""
    i = 0
    while i < len(lines) - 1:
        line, nxt = lines[i], lines[i + 1]
        indent = len(line) - len(line.lstrip())
        if (
            line.rstrip().endswith(",")
            and line.strip()
            and not line.lstrip().startswith(("-", "*"))
            and len(nxt) - len(nxt.lstrip()) == indent
            and nxt.strip()
            and all(part.strip().isidentifier() for part in line.split(",")[:-1])
            and all(part.strip().isidentifier() for part in nxt.split(","))
        ):
            lines[i : i + 2] = [line.rstrip() + " " + nxt.strip()]
        else:
            i += 1


def setup(app):  # noqa: ANN001, ANN201
    # before napoleon's own handler (priority 500) reads the sections
    app.connect("autodoc-process-docstring", _join_wrapped_names, priority=400)
