"""Jupyter: whether daskrun runs in a kernel, and what it can show there.

In a kernel with ``ipywidgets`` (``pip install "daskrun[notebook]"``),
progress bars are live widgets (``tqdm.auto``) and ``RunDetails`` a live
table; without it, they are text, and one line says once how to get the
widgets. Outside a kernel, nothing here imports IPython.
"""

from __future__ import annotations

import sys
from typing import Any

NO_WIDGETS = (
    "daskrun: this kernel has no ipywidgets, so progress shows as text; for "
    'the live widget: pip install "daskrun[notebook]"'
)
_hinted = False


def in_notebook() -> bool:
    """Whether this is a Jupyter kernel (whose output is a notebook cell).

    >>> in_notebook()
    False
    """
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def notebook_widgets() -> bool:
    """Whether this kernel can show ipywidgets (progress bars, ``RunDetails``);
    if not, one line says once how to get them, and daskrun shows text."""
    global _hinted
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        if not _hinted:
            _hinted = True
            print(NO_WIDGETS, file=sys.stderr)
        return False
    return True


def progress_bar() -> Any:
    """The tqdm class for a progress bar here: a widget in a kernel with
    ipywidgets, else text."""
    if in_notebook() and notebook_widgets():
        from tqdm.auto import tqdm as auto

        return auto
    from tqdm import tqdm as text

    return text
