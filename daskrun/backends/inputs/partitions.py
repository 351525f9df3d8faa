"""Partitioned data sets: keys read from file paths, one mini-batch per key.

A ``partition_format`` such as ``"/{user}/{genre}/{fname}.wav"`` or
``"/{Department}/{PartitionDate:yyyy/MM/dd}/data.jsonl"`` names parts of each
file's path (:class:`PartitionFormat`). It is matched against the end of the
path, ``/``-separated: ``{name}`` is one path segment or part of one, and
``{name:yyyy/MM/dd}`` a date (``yyyy``, ``MM``, ``dd``, ``HH``, ``mm``,
``ss``, as Azure ML's .NET-style formats write them) that becomes a
``datetime``.

``ParallelRunConfig(partition_keys=[...])`` makes one
:class:`PartitionBatch` per distinct combination of those keys
(:func:`plan_partitions`), ordered by the key values, whatever its size.
Everything here is pure: the data set classes list the files, the workers
read them (:func:`daskrun.backends.inputs.datasets.read_partition`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from daskrun.exceptions import ConfigError, InputError

_FIELD = re.compile(r"\{([^{}:]*)(?::([^{}]*))?\}")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_ -]*$")
# .NET-style date parts Azure ML reads in a partition format
_DATE_PARTS = {
    "yyyy": ("year", r"\d{4}"),
    "MM": ("month", r"\d{2}"),
    "dd": ("day", r"\d{2}"),
    "HH": ("hour", r"\d{2}"),
    "mm": ("minute", r"\d{2}"),
    "ss": ("second", r"\d{2}"),
}
_DATE_TOKEN = re.compile("|".join(_DATE_PARTS))


class PartitionFormat:
    """A parsed ``partition_format``: its keys, and their values in a path.

    >>> fmt = PartitionFormat("/{user}/{day:yyyy/MM/dd}/{fname}.wav")
    >>> fmt.keys
    ('user', 'day', 'fname')
    >>> fmt.match("/data/alice/2024/03/01/take1.wav")
    {'user': 'alice', 'day': datetime.datetime(2024, 3, 1, 0, 0), 'fname': 'take1'}
    >>> fmt.match("/data/alice/take1.wav")
    Traceback (most recent call last):
    ...
    daskrun.exceptions.InputError: input file '/data/alice/take1.wav' does not match partition_format='/{user}/{day:yyyy/MM/dd}/{fname}.wav' (its path must end with that pattern); fix the pattern, or leave the file out of the data set
    """  # noqa: E501

    def __init__(self, text: str):
        if not isinstance(text, str) or not text:
            raise ConfigError(
                f"partition_format={text!r} is not a pattern; use e.g. "
                "'/{user}/{genre}/{fname}.wav'"
            )
        self.text = text
        keys: list[str] = []
        self._dates: dict[str, list[tuple[str, str]]] = {}
        regex, end = "", 0
        stray = re.search(r"[{}]", _FIELD.sub("", text))
        if stray is not None:
            raise ConfigError(
                f"partition_format={text!r} has an unbalanced {stray.group()!r}; "
                "write each key as {name} (or {name:yyyy/MM/dd}), e.g. "
                "'/{user}/{genre}/{fname}.wav'"
            )
        for n, m in enumerate(_FIELD.finditer(text)):
            key, date = m.group(1), m.group(2)
            if not key:
                raise ConfigError(
                    f"partition_format={text!r}: {m.group()} names no key; put a "
                    "key's name in the braces, e.g. '/{user}/{fname}.wav'"
                )
            if not _KEY.match(key) or key in keys:
                why = "is named twice" if key in keys else "is not a key name"
                raise ConfigError(
                    f"partition_format={text!r}: {{{key}}} {why}; name each key "
                    "once, with letters, digits and '_', e.g. '/{user}/{fname}.wav'"
                )
            keys.append(key)
            regex += re.escape(text[end : m.start()])
            end = m.end()
            regex += self._date(key, date, n) if date else f"(?P<k{n}>[^/]+?)"
        if not keys:
            raise ConfigError(
                f"partition_format={text!r} names no key; put keys in braces, "
                "e.g. '/{user}/{genre}/{fname}.wav'"
            )
        regex += re.escape(text[end:])
        # matched from a segment boundary to the end of the path
        start = "" if text.startswith("/") else "(?:^|/)"
        self._regex = re.compile(f"{start}{regex}$")
        self._names = {f"k{n}": key for n, key in enumerate(keys)}
        self.keys = tuple(keys)
        # a pattern that starts with a folder's name (Azure ML's, written
        # from the datastore path: "dataset_partition_test/{user}/...")
        self._anchored = bool(text[: text.index("{")].strip("/"))

    def _date(self, key: str, date: str, n: int) -> str:
        parts: list[tuple[str, str]] = []
        regex, end = "", 0
        for m in _DATE_TOKEN.finditer(date):
            field, pattern = _DATE_PARTS[m.group()]
            if field in {f for f, _ in parts}:
                break  # named twice: refused below
            regex += re.escape(date[end : m.start()])
            end = m.end()
            group = f"k{n}_{field}"
            parts.append((field, group))
            regex += f"(?P<{group}>{pattern})"
        if not parts or end < len(date) and _DATE_TOKEN.search(date, end):
            raise ConfigError(
                f"partition_format={self.text!r}: {{{key}:{date}}} is not a date "
                "format; use yyyy, MM, dd, HH, mm and ss once each, e.g. "
                f"'{{{key}:yyyy/MM/dd}}'"
            )
        self._dates[key] = parts
        return regex + re.escape(date[end:])

    def values(self, path: str, root: str | None = None) -> dict[str, Any] | None:
        """The keys' values in ``path`` (its part below ``root``, if given),
        or ``None`` where it does not match.

        A pattern that starts with a folder's name may name folders above
        ``root``, as Azure ML's are written from the datastore path
        (``"data/{user}/{fname}.wav"`` for the files of ``"data/*/*.wav"``):
        it is matched against the whole path where the part below ``root``
        does not match. One that starts with a key never is, so a stray file
        beside the partition folders is refused, not keyed by the folders
        above it.

        >>> PartitionFormat("data/{user}/{f}.wav").values("/s/data/al/1.wav", "/s/data")
        {'user': 'al', 'f': '1'}
        """
        below = path[len(root) :] if root and path.startswith(root) else path
        m = self._regex.search(below.replace(os.sep, "/"))
        if m is None and self._anchored and below != path:
            m = self._regex.search(path.replace(os.sep, "/"))
        if m is None:
            return None
        found: dict[str, Any] = {}
        for n, key in enumerate(self.keys):
            parts = self._dates.get(key)
            if parts is None:
                found[key] = m.group(f"k{n}")
                continue
            got = {field: int(m.group(group)) for field, group in parts}
            try:
                found[key] = datetime(
                    got.get("year", 1),
                    got.get("month", 1),
                    got.get("day", 1),
                    got.get("hour", 0),
                    got.get("minute", 0),
                    got.get("second", 0),
                )
            except ValueError as e:
                raise InputError(
                    f"input file {path!r}: {key} is not a date ({e}) in "
                    f"partition_format={self.text!r}; fix the path or the pattern"
                ) from None
        return found

    def match(self, path: str, root: str | None = None) -> dict[str, Any]:
        """:meth:`values`, or an :class:`InputError` naming the file and the
        pattern."""
        found = self.values(path, root)
        if found is None:
            below = f" below {root!r}" if root else ""
            raise InputError(
                f"input file {path!r} does not match partition_format="
                f"{self.text!r} (its path{below} must end with that pattern); "
                "fix the pattern, or leave the file out of the data set"
            )
        return found

    def __repr__(self) -> str:
        return f"PartitionFormat({self.text!r})"


def hive_format(keys: Sequence[str], file_name: str = "data.parquet") -> str:
    """The ``partition_format`` of Hive-style folders, as ``partition_by``
    writes them.

    >>> hive_format(["user", "genre"])
    '/user={user}/genre={genre}/data.parquet'
    """
    return "".join(f"/{k}={{{k}}}" for k in keys) + f"/{file_name}"


def parse_partition_keys(value: object) -> tuple[str, ...] | None:
    """``partition_keys`` as a tuple: a list of names, a JSON list (how
    Azure ML's PipelineParameters carry it) or ``"a,b"``.

    >>> parse_partition_keys('["user", "genre"]'), parse_partition_keys("user")
    (('user', 'genre'), ('user',))
    >>> parse_partition_keys([])
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: partition_keys=[] names no key; pass the keys to group by, e.g. partition_keys=['user']
    """  # noqa: E501
    if value is None:
        return None
    keys: Any = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                keys = json.loads(text)
            except ValueError:
                keys = None
        else:
            keys = [k.strip() for k in text.split(",") if k.strip()]
    if not isinstance(keys, (list, tuple)) or not all(
        isinstance(k, str) and k for k in keys
    ):
        raise ConfigError(
            f"partition_keys={value!r} is not a list of key names; use e.g. "
            "partition_keys=['user', 'genre']"
        )
    if not keys:
        raise ConfigError(
            f"partition_keys={value!r} names no key; pass the keys to group by, "
            "e.g. partition_keys=['user']"
        )
    if len(set(keys)) < len(keys):
        raise ConfigError(f"partition_keys={value!r} names a key twice; name each once")
    return tuple(keys)


def check_partition_keys(keys: Sequence[str], dataset: Any) -> None:
    """Refuse keys that ``dataset`` (anything with ``partition_keys``) lacks,
    naming those it has."""
    has = list(getattr(dataset, "partition_keys", None) or [])
    missing = [k for k in keys if k not in has]
    if not missing:
        return
    if not has:
        raise ConfigError(
            f"partition_keys={list(keys)!r}: input {dataset!r} is not partitioned; "
            "make it with partition_format, e.g. Dataset.File.from_files(path, "
            "partition_format='/{user}/{fname}.wav'), or use mini_batch_size"
        )
    raise ConfigError(
        f"partition_keys={list(keys)!r}: input {dataset!r} has no key "
        f"{', '.join(map(repr, missing))}; its keys are {', '.join(has)}"
    )


@dataclass(frozen=True)
class MiniBatchContext:
    """What a two-parameter ``run(mini_batch, mini_batch_context)`` gets
    beside each mini-batch, as in Azure ML.

    Attributes
    ----------
    partition_key_value : dict
        The partition's key values (``{}`` unless ``partition_keys`` is set).
    minibatch_index : int
        The mini-batch's number in the plan.
    dataset : FileDataset or TabularDataset or None
        The input filtered to this partition (its files, or its rows):
        ``to_path()`` and ``download()``, or ``to_pandas_dataframe()``;
        ``None`` unless ``partition_keys`` is set.
    """

    partition_key_value: dict[str, Any]
    minibatch_index: int
    dataset: Any = None


def with_partition_columns(frame: Any, path: str, partition_format: str | None) -> Any:
    """``frame`` (read from ``path``) with a column per partition key, as
    Azure ML adds them to a partitioned tabular data set's rows; a key
    named like one of the file's columns is refused, never overwritten."""
    if partition_format is not None:
        pattern = PartitionFormat(partition_format)
        check_key_columns(pattern, frame.columns, path)
        for key, value in pattern.match(path).items():
            frame[key] = value
    return frame


def check_key_columns(pattern: PartitionFormat, columns: Any, path: str) -> None:
    """Refuse a partition key named like a column of the file at ``path``:
    its values from the path would replace the column's.

    >>> check_key_columns(PartitionFormat("/{m}/x.csv"), ["m", "v"], "a/x.csv")
    Traceback (most recent call last):
    ...
    daskrun.exceptions.InputError: partition_format='/{m}/x.csv': key 'm' is also a column of 'a/x.csv', whose values it would replace; rename the key in the pattern, e.g. {m_key}
    """  # noqa: E501
    same = [k for k in pattern.keys if k in set(map(str, columns))]
    if same:
        raise InputError(
            f"partition_format={pattern.text!r}: key {same[0]!r} is also a column "
            f"of {path!r}, whose values it would replace; rename the key in the "
            f"pattern, e.g. {{{same[0]}_key}}"
        )
