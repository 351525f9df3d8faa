"""The package's shape (docs/architecture.md): daskrun's modules import one
another without cycles, the engine never imports the registry, and a worker
process imports only the engine."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import daskrun

PACKAGE = Path(daskrun.__file__).parent

# the layers are folders (docs/architecture.md): the registry is what a
# worker process must not load (what workers need of registered models is in
# aml/modelrefs.py, of registered data sets nothing)
_ALL = {
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__"
    )
    for p in PACKAGE.rglob("*.py")
}
REGISTRY = {m for m in _ALL if m.startswith("daskrun.registry")} | {
    "daskrun.cli",
    "daskrun.cliparser",
    "daskrun.widgets",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, modules: set[str]) -> set[str]:
    """daskrun's modules that ``path`` imports, at module level or inside
    functions: ``from .x import y``, ``from . import x``, ``import daskrun.x``
    and ``from daskrun.x import y``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # daskrun has no subpackages: relative is daskrun.*
                base = "daskrun" + (f".{node.module}" if node.module else "")
            # `from . import output` names a module; `from . import __version__`
            # the package itself
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            names = [n for n in submodules if n in modules] or [base]
        else:
            continue
        found.update(n for n in names if n in modules)
    found.discard(_module_name(path))
    return found


def _import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imported(p, modules) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_import_graph_is_read() -> None:
    # the walker itself: module-level, TYPE_CHECKING and package imports
    graph = _import_graph()
    assert "daskrun.backends.compute.cluster" in graph["daskrun.registry.compute"]
    assert "daskrun.registry.compute" in graph["daskrun.registry.workspace"]
    assert (
        "daskrun.engine.naming" in graph["daskrun.registry.pipeline"]
    )  # one name of several
    assert "daskrun.registry.step" in graph["daskrun"]  # under TYPE_CHECKING
    assert "daskrun" in graph["daskrun.cliparser"]  # from . import __version__
    assert (
        "daskrun.engine.output" in graph["daskrun.registry.step"]
    )  # from . import output


def test_no_import_cycle_between_daskrun_modules() -> None:
    assert _cycles(_import_graph()) == []


# the engine: plain values in, results out (docs/architecture.md)
ENGINE = {
    m
    for m in _ALL
    if m.split(".")[1:2] in (["engine"], ["backends"], ["monitoring"], ["aml"])
} | {"daskrun.exceptions"}


def test_every_module_is_engine_or_registry() -> None:
    # a new module must be placed on one side of the line
    graph = _import_graph()
    placed = ENGINE | REGISTRY | {"daskrun", "daskrun.__main__"}
    assert set(graph) - placed == set()
    assert ENGINE & REGISTRY == set()


@pytest.mark.parametrize("module", sorted(ENGINE))
def test_the_engine_imports_no_registry_module(module: str) -> None:
    # e.g. job.py gets model references and a run record from step.py;
    # registered compute targets resolve themselves on the registry's side
    reached = _reachable(_import_graph(), module)
    assert reached & (REGISTRY | {"daskrun"}) == set()


def test_a_worker_imports_only_the_engine() -> None:
    # what a worker unpickles: the plugin, the mini-batch task and the local
    # cluster's QuickExit plugin
    code = (
        "import json, sys\n"
        "import daskrun.engine.plugin\n"
        "from daskrun.engine.tasks import process_mini_batches\n"
        "from daskrun.backends.compute.cluster import QuickExit\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "daskrun.engine.plugin" in loaded
    assert loaded & (REGISTRY | {"sqlite3"}) == set()


def test_real_workers_load_no_registry(tmp_path: Path) -> None:
    """Through a whole step on daskrun's own local cluster: the worker
    processes never load SQLite or a registry module."""
    from daskrun import Dataset, ParallelRunConfig, ParallelRunStep

    from .helpers import make_files, write_script

    make_files(tmp_path / "in", 4)
    script = write_script(
        tmp_path,
        "import sys\ndef init(): pass\n"
        "def run(mb):\n"
        "    names = ['sqlite3', *(m for m in sys.modules if 'daskrun.' in m)]\n"
        "    return [' '.join(n for n in names if n in sys.modules)] * len(mb)\n",
    )
    config = ParallelRunConfig(str(script), mini_batch_size=2, process_count_per_node=1)
    step = ParallelRunStep(
        "imports",
        config,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    )
    run = step.run()
    assert run.status == "Completed", run.error
    loaded = set(Path(run.output_path or "").read_text().split())
    assert "daskrun.engine.plugin" in loaded
    assert loaded & (REGISTRY | {"sqlite3"}) == set(), loaded


def test_no_test_module_imports_another() -> None:
    # shared code lives in tests/helpers.py (importable by subprocess
    # scripts) and fixtures in conftest.py, which pytest loads itself
    tests = Path(__file__).parent
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            others = [
                n for n in names if n.split(".")[-1].startswith(("test_", "conftest"))
            ]
            assert others == [], f"{path.name} imports {others}"


# a capability is one class (issue 26): the job, the runner and the registry
# ask an input, output format or compute target, never compare its kind
KINDS = {
    *("file tabular collection dataframe bag array delimited partitioned").split(),
    *("text csv tsv json parquet").split(),
    *("local aml address scheduler remote shared warm slurm pbs sge").split(),
    *("gateway kubernetes mpi").split(),
}


def _kind_comparisons(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    backend_classes = path.is_relative_to(PACKAGE / "backends")
    found = []

    def strings(node: ast.expr) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in KINDS
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return bool(node.elts) and all(strings(e) for e in node.elts)
        return False

    def visit(node: ast.AST, in_class: bool) -> None:
        if isinstance(node, ast.ClassDef):
            in_class = in_class or backend_classes
        if isinstance(node, ast.Compare) and not in_class:
            sides = [node.left, *node.comparators]
            named = [s for s in sides if not strings(s)]
            if any(strings(s) for s in sides) and any(
                "kind" in ast.unparse(s).lower() or "format" in ast.unparse(s).lower()
                for s in named
            ):
                found.append(
                    f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}"
                )
        for child in ast.iter_child_nodes(node):
            visit(child, in_class)

    visit(tree, False)
    return found


def test_no_kind_is_compared_outside_its_back_end_class() -> None:
    found = [c for p in sorted(PACKAGE.rglob("*.py")) for c in _kind_comparisons(p)]
    assert found == [], "\n".join(found)


# sizes that keep a module readable at one sitting (issue 26); the one
# exception mirrors Azure ML's public signature, which entry scripts and
# notebooks call by keyword
LONGEST_FUNCTION, LONGEST_MODULE, MOST_PARAMETERS = 80, 700, 10
AZURE_ML_SIGNATURES = {"engine/config.py:ParallelRunConfig.__init__"}


def _sizes(path: Path) -> list[str]:
    text = path.read_text()
    where = path.relative_to(PACKAGE).as_posix()
    found = []
    if len(text.splitlines()) > LONGEST_MODULE:
        found.append(f"{where}: {len(text.splitlines())} lines")
    tree = ast.parse(text)
    for cls in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
        for fn in cls.body:
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            name = f"{where}:{getattr(cls, 'name', '')}.{fn.name}".replace(":.", ":")
            lines = fn.end_lineno - fn.lineno + 1  # type: ignore[operator]
            if lines > LONGEST_FUNCTION:
                found.append(f"{name}: {lines} lines")
            a = fn.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            count -= bool(a.args) and a.args[0].arg in ("self", "cls")
            if (
                fn.name == "__init__"
                and count > MOST_PARAMETERS
                and name not in AZURE_ML_SIGNATURES
            ):
                found.append(f"{name}: {count} parameters")
    return found


def test_no_long_function_module_or_constructor() -> None:
    found = [s for p in sorted(PACKAGE.rglob("*.py")) for s in _sizes(p)]
    assert found == [], "\n".join(found)
