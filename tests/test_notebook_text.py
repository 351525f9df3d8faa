"""A notebook whose kernel has no ``ipywidgets``: the README's notebook cell
still runs, with text progress and one line naming the extra to install,
in a real Jupyter kernel (ipykernel, driven by nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from daskrun.monitoring.notebook import NO_WIDGETS

from .helpers import cell_text, execute_notebook, readme_notebook_cell

# the kernel's first cell: ipywidgets cannot be imported, as where it was
# never installed
HIDE_IPYWIDGETS = """
import sys

class NoWidgets:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ipywidgets":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoWidgets())
for name in [m for m in sys.modules if m.split(".")[0] == "ipywidgets"]:
    del sys.modules[name]
"""


@pytest.mark.slow
def test_a_kernel_without_ipywidgets_shows_text_progress_and_the_extra(
    tmp_path: Path, kernel: str
) -> None:
    (tmp_path / "score.py").write_text(
        "import os\n\ndef init():\n    pass\n\n"
        "def run(mini_batch):\n    return [os.path.basename(p) for p in mini_batch]\n"
    )
    (tmp_path / "images").mkdir()
    for i in range(25):
        (tmp_path / "images" / f"img{i:02}.png").write_bytes(b"\x89PNG")
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(HIDE_IPYWIDGETS),
            nbformat.v4.new_code_cell(readme_notebook_cell()),
            nbformat.v4.new_code_cell(
                "try:\n    import ipywidgets\nexcept ImportError as e:\n"
                "    print(type(e).__name__)"
            ),
        ]
    )
    execute_notebook(nb, tmp_path, kernel)  # a cell that raises fails here
    hide, ran, check = nb.cells
    text = cell_text(ran)
    assert text.count(NO_WIDGETS) == 1, text  # said once, for the bar and the table
    assert NO_WIDGETS == (
        "daskrun: this kernel has no ipywidgets, so progress shows as text; for "
        'the live widget: pip install "daskrun[notebook]"'
    )
    # no widget at all: text progress, then RunDetails as a text table
    shown = [o for o in ran.outputs if o.output_type == "display_data"]
    assert shown == [], shown
    assert "daskrun: run score-images_" in text
    assert "Completed: 3 of 3 mini-batches done; 25 items ok, 0 failed" in text, text
    assert "\nscore-images  Completed  3/3" in text, text
    # the blocker held to the end: ipywidgets never loaded
    assert cell_text(check) == "ModuleNotFoundError\n"
