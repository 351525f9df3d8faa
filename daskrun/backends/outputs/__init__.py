"""Output formats: one class per format of the published file, behind one
small contract (as :mod:`daskrun.registry.datastores`' storage back ends).

A run's ``output_format`` names a ``kind``; :data:`FORMATS` maps that name
to the class that answers for it::

    OutputFormat        the contract: encode rows, count a part's rows,
    │                   concatenate parts, read the published file back
    ├── TextLines       "text": ParallelRunStep's append_row lines
    ├── CsvRows         "csv": CSV with one header line
    └── ParquetTable    "parquet": one Parquet file

A new format is one new subclass with its own ``kind``, imported here.
"""

from __future__ import annotations

from daskrun.backends.outputs.base import (
    FORMATS,
    OutputFormat,
    check_returned,
    output_format_for,
)

# defined in the order they are listed (FORMATS): text first, as in
# ParallelRunStep
# isort: off
from daskrun.backends.outputs.text import TextLines
from daskrun.backends.outputs.csvrows import CsvRows
from daskrun.backends.outputs.parquet import ParquetTable

# isort: on

__all__ = [
    "FORMATS",
    "CsvRows",
    "OutputFormat",
    "ParquetTable",
    "TextLines",
    "check_returned",
    "output_format_for",
]
