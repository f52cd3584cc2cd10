"""CSV files of the reports: rows of named columns, numbers written exactly."""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def write_dict_rows(path: pathlib.Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes rows (dicts with the same keys) under a header of the first row's keys.

    No rows leave an empty file.
    """
    with path.open("w", newline="") as handle:
        if not rows:
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_value(value: Any) -> str:
    """CSV text of one number: ints exactly, floats by shortest round trip."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def write_rows(path: pathlib.Path, header: Sequence[str], rows: Sequence[Sequence[str]], *,
               append: bool = False) -> None:
    """Writes (or appends) rows of text cells, lines ended by "\\n"; the header only to a new file."""
    exists = append and path.exists()
    with path.open("a" if append else "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        if not exists:
            writer.writerow(header)
        writer.writerows(rows)
