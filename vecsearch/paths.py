"""Paths as the images table stores them, and the prefix rule of `under`: one definition for the
neighbour query, `load` and `dupes`."""

from __future__ import annotations

import os
from pathlib import Path

from .output import check_utf8


def absolute(path: str | Path) -> Path:
    """Absolute and normalised, symlinks kept: the form in which paths are stored.

    InvalidInput for a path that is not valid UTF-8: no stored path can be such a one.
    """
    return Path(os.path.abspath(os.path.expanduser(check_utf8(str(path)))))


def under_prefix(directory: str | Path) -> str:
    """The path prefix of the files under `directory` (absolute, with a trailing separator), as
    the neighbour functions' `under` and a load's scope compare it with `starts_with`."""
    return directory_prefix(str(absolute(directory)))


def directory_prefix(directory: str) -> str:
    """An absolute, stored-form directory with the trailing separator that makes `starts_with`
    match only the files under it (`/a/b/` does not match `/a/bc`)."""
    return directory if directory.endswith(os.sep) else directory + os.sep
