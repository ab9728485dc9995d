"""`vecsearch db backup/restore`: pg_dump custom format, with the embedded installation's own binaries.

The bundled pg_dump/pg_restore are version 18, so they also dump an older external server.
"""

from __future__ import annotations

from pathlib import Path

from . import db, server
from .config import Settings
from .errors import NotFound, VecsearchError


def backup(settings: Settings, file: Path) -> None:
    """Write the whole vecsearch database (schema, images, vectors, index definitions) to `file`."""
    db.connect(settings).close()  # started and migrated: a dump always has the current schema
    _run("pg_dump", ["--format=custom", "--no-owner", f"--file={file}", db.database_url(settings)])


def restore(settings: Settings, file: Path) -> None:
    """Replace the database's vecsearch objects with those in `file` (made by `backup`)."""
    if not file.is_file():
        raise NotFound(f"backup file {file} does not exist: give the path of a `vecsearch db backup` file")
    url = db.database_url(settings)
    db.check_pgvector(url)
    _run("pg_restore", ["--clean", "--if-exists", "--no-owner", "--single-transaction",
                        "--exit-on-error", f"--dbname={url}", str(file)])


def _run(binary: str, args: list[str]) -> None:
    result = server.run_binary(binary, args, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise VecsearchError(f"{binary} failed: {lines[-1] if lines else 'exit ' + str(result.returncode)}")
