"""The source bundle: an entry script, or its source directory, as zip bytes.

:func:`build_bundle` zips the files of a source directory that Azure ML's
snapshot would take (``.amlignore`` or ``.gitignore``, and
``.daskrunignore``), within its limits, into a cache keyed by their names,
sizes and times; :class:`~daskrun.engine.plugin.EntryScriptPlugin` carries the
bytes to every worker. Runs on the client only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from daskrun.backends.storage import private_folder
from daskrun.exceptions import ConfigError

if TYPE_CHECKING:
    import pathspec

logger = logging.getLogger("daskrun")

_ESC = "surrogateescape"
_SKIP_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints", ".daskrun", ".venv"}
# AML's snapshot limits: a source directory beyond them is refused
BUNDLE_MAX_BYTES = 300 * 1024**2
BUNDLE_MAX_FILES = 2000
# AML reads .amlignore if present, else .gitignore; .daskrunignore always adds
_IGNORE_FILES = (".amlignore", ".gitignore")
DASKRUN_IGNORE = ".daskrunignore"
_BUNDLES_KEPT = 32
_BUNDLE_FORMAT = "1"  # part of the cache key: bump when the zip layout changes


def bundle_cache_dir() -> Path:
    """Where built bundles are kept: ``$XDG_CACHE_HOME/daskrun/bundles``
    (``~/.cache/daskrun/bundles``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base, "daskrun", "bundles")


def _ignore_spec(folder: Path) -> pathspec.GitIgnoreSpec | None:
    import pathspec  # the client's, not the workers'

    lines: list[str] = []
    for name in _IGNORE_FILES:
        if (folder / name).is_file():
            lines += (folder / name).read_text(errors="replace").splitlines()
            break
    if (folder / DASKRUN_IGNORE).is_file():
        lines += (folder / DASKRUN_IGNORE).read_text(errors="replace").splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None


def source_files(
    root: Path, exclude: Sequence[str] = ()
) -> list[tuple[str, Path, int, int]]:
    """The files of a source directory that are shipped, as ``(path inside
    the bundle, path, size, mtime in ns)``, sorted.

    An ``.amlignore`` (else ``.gitignore``) and a ``.daskrunignore`` in any
    folder leave out what their gitignore patterns match below it; an
    ignored folder is not walked. Caches, ``.git``, ``.venv`` and workspace
    or runs folders, and the folders and files in ``exclude`` (the step's
    inputs and output), are never shipped.
    """
    left_out = {os.path.realpath(p) for p in exclude}
    root_real = os.path.realpath(root)
    specs: dict[str, pathspec.GitIgnoreSpec] = {}

    def ignored(rel: str, is_dir: bool) -> bool:
        parts = rel.split("/")
        for i in range(len(parts)):
            spec = specs.get("/".join(parts[:i]))
            tail = "/".join(parts[i:]) + ("/" if is_dir else "")
            if spec is not None and spec.match_file(tail):
                return True
        return False

    found = []
    unnamed: list[str] = []  # not UTF-8: a zip cannot name them
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        base = here.relative_to(root).as_posix()
        base = "" if base == "." else base
        spec = _ignore_spec(here)
        if spec is not None:
            specs[base] = spec
        prefix = f"{base}/" if base else ""
        # a workspace or runs folder inside the source directory is data,
        # not source (and it changes with every run)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_DIRS
            and not os.path.exists(os.path.join(dirpath, d, "workspace.db"))
            and not os.path.exists(os.path.join(dirpath, d, "runs.db"))
            and os.path.join(root_real, prefix, d) not in left_out
            and not ignored(prefix + d, True)
        )
        unnamed += [prefix + d + "/" for d in dirnames if not _utf8(d)]
        dirnames[:] = [d for d in dirnames if _utf8(d)]
        for filename in filenames:
            rel = prefix + filename
            if ignored(rel, False) or os.path.join(root_real, rel) in left_out:
                continue
            if not _utf8(filename):
                unnamed.append(rel)
                continue
            full = here / filename
            try:
                st = full.stat()
            except OSError:  # a dangling link
                continue
            found.append((rel, full, st.st_size, st.st_mtime_ns))
    if unnamed:
        logger.warning(
            "left out of the bundle of %s: %d names that are not UTF-8, e.g. %s "
            "(no module can have such a name; list them in %s to silence this)",
            root,
            len(unnamed),
            ascii(unnamed[0]),
            DASKRUN_IGNORE,
        )
    return sorted(found)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _check_limits(root: Path, files: Sequence[tuple[str, Path, int, int]]) -> None:
    total = sum(f[2] for f in files)
    if total <= BUNDLE_MAX_BYTES and len(files) <= BUNDLE_MAX_FILES:
        return
    entries: dict[str, list[int]] = {}
    for rel, _, size, _ in files:
        top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
        entry = entries.setdefault(top, [0, 0])
        entry[0] += size
        entry[1] += 1
    largest = sorted(entries.items(), key=lambda e: (-e[1][0], -e[1][1]))[:3]
    named = ", ".join(
        f"{name} ({_size(size)}{f', {n} files' if name.endswith('/') else ''})"
        for name, (size, n) in largest
    )
    ignore = next(
        (n for n in (*_IGNORE_FILES, DASKRUN_IGNORE) if (root / n).is_file()),
        DASKRUN_IGNORE,
    )
    raise ConfigError(
        f"source_directory={str(root)!r} holds {len(files)} files, "
        f"{_size(total)}, over the {BUNDLE_MAX_FILES} files or "
        f"{_size(BUNDLE_MAX_BYTES)} shipped to workers; largest: {named}; "
        f"list what is not code in {root / ignore} (gitignore patterns, "
        f"e.g. '{largest[0][0]}'), or keep the script in a folder of its own"
    )


def build_bundle(
    entry_script: str,
    source_directory: str | None,
    cache_dir: str | os.PathLike[str] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[Path, str]:
    """Zip the entry script, or what :func:`source_files` ships of its
    ``source_directory``, into a file of ``cache_dir`` (default
    :func:`bundle_cache_dir`); the folders and files in ``exclude`` (the
    step's local inputs and output: data, not code) are left out.

    Files are streamed from disk into the zip, never held in memory. A
    bundle is built again only when a shipped file's path, size or mtime
    changed. Beyond AML's snapshot limits (300 MB or 2,000 files) the
    source directory is refused with :class:`~daskrun.ConfigError`.

    Returns the zip's path and the script's path inside the zip.
    """
    script = Path(entry_script).resolve()
    if source_directory is None:
        st = script.stat()
        rel = script.name
        files = [(rel, script, st.st_size, st.st_mtime_ns)]
    else:
        root = Path(source_directory).resolve()
        rel = script.relative_to(root).as_posix()
        files = source_files(root, exclude)
        if rel not in {f[0] for f in files}:  # ignored, yet it must travel
            st = script.stat()
            files = sorted([*files, (rel, script, st.st_size, st.st_mtime_ns)])
        _check_limits(root, files)
    digest = hashlib.sha256(f"{_BUNDLE_FORMAT}\0{rel}\n".encode())
    for name, full, size, mtime in files:
        digest.update(f"{name}\0{full}\0{size}\0{mtime}\n".encode("utf-8", _ESC))
    cache = Path(cache_dir) if cache_dir is not None else bundle_cache_dir()
    path = cache / f"{digest.hexdigest()[:40]}.zip"
    if path.is_file():
        os.utime(path)  # kept by the pruning below, which drops the oldest
        return path, rel
    private_folder(cache)  # the user's code: theirs alone, as its zip (0600)
    tmp = tempfile.NamedTemporaryFile(dir=cache, suffix=".partial", delete=False)
    try:
        with tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, full, _, _ in files:
                zf.write(full, name)
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    _prune(cache)
    return path, rel


def _prune(cache: Path) -> None:
    bundles = []
    for p in cache.glob("*.zip"):
        with contextlib.suppress(OSError):
            bundles.append((p.stat().st_mtime, p))
    for _, old in sorted(bundles, reverse=True)[_BUNDLES_KEPT:]:
        with contextlib.suppress(OSError):
            old.unlink()


def bundle_source(entry_script: str, source_directory: str | None) -> tuple[bytes, str]:
    """The bytes of :func:`build_bundle`'s zip, and the script's path in it."""
    path, rel = build_bundle(entry_script, source_directory)
    return path.read_bytes(), rel
