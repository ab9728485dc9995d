"""Text for people and pipes: result rows as table, json, csv or paths; paths and messages made
printable (control characters escaped) and storable (valid UTF-8)."""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from .errors import InvalidInput


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    paths = "paths"
    paths0 = "paths0"  # NUL after each path, as `find -print0` (paths may hold newlines)


# C0/C1 controls (escape sequences that clear the screen or set the window title), and the
# invisible and bidirectional formatting characters that make a name display as another.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def printable(text: str, *, lines: bool = False) -> str:
    """`text` safe for a terminal: control and formatting characters shown as escapes
    (`lines`: newlines kept, for a message laid out on several lines on purpose)."""
    if lines:
        return "\n".join(printable(line) for line in text.split("\n"))
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1] if ord(m.group()) < 0x100
                            else f"\\u{ord(m.group()):04x}", text)


def display_path(path: str) -> str:
    """`path` printable and storable as UTF-8 (undecodable bytes shown as \\x escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_utf8(path: str) -> str:
    """`path` itself, or InvalidInput if its bytes are not valid UTF-8 (vecsearch stores text)."""
    if display_path(path) != path:
        raise InvalidInput(f"{display_path(path)}: the path is not valid UTF-8: rename it (or the "
                           "folder it is in) to use it with vecsearch")
    return path


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: Format | str,
           title: str | None = None, file=None) -> None:
    """Print `rows` (dicts with at least `columns`) in `fmt`; `paths` prints the `path` column.

    A table is for a terminal: every cell is made `printable`. `paths` is for pipes, raw, unless
    it goes to a terminal; `paths0` ends each path with NUL, so any path survives (xargs -0).
    """
    file = file or sys.stdout
    fmt = Format(fmt)
    if fmt is Format.paths0:
        for row in rows:
            file.write(row["path"] + "\0")
        file.flush()
    elif fmt is Format.paths:
        tty = file.isatty()
        for row in rows:
            print(printable(row["path"]) if tty else row["path"], file=file)
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

        table = Table(title=None if title is None else printable(title), box=None, header_style="bold")
        for c in columns:
            table.add_column(c, justify="right" if c in ("rank", "id", "similarity", "distance")
                             else "left", overflow="fold")
        for row in rows:
            table.add_row(*(_cell(row[c]) for c in columns))
        Console(file=file, highlight=False, soft_wrap=False).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return printable(str(value))
