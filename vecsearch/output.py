"""Result rendering shared by every command that prints rows: table, json, csv or paths."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import Any


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    paths = "paths"


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: Format | str,
           title: str | None = None, file=None) -> None:
    """Print `rows` (dicts with at least `columns`) in `fmt`; `paths` prints the `path` column."""
    file = file or sys.stdout
    fmt = Format(fmt)
    if fmt is Format.paths:
        for row in rows:
            print(row["path"], file=file)
    elif fmt is Format.json:
        json.dump([{c: row[c] for c in columns} for row in rows], file, indent=2, default=str)
        print(file=file)
    elif fmt is Format.csv:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, box=None, header_style="bold")
        for c in columns:
            table.add_column(c, justify="right" if c in ("rank", "id", "similarity", "distance")
                             else "left", overflow="fold")
        for row in rows:
            table.add_row(*(_cell(row[c]) for c in columns))
        Console(file=file, highlight=False, soft_wrap=False).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
