"""`vecsearch db backup/restore`: pg_dump custom format, with the embedded installation's own binaries.

The bundled pg_dump/pg_restore are version 18, so they also dump an older external server.

A restore skips the dump's privileges (GRANTs name roles, which are per cluster and not in a
dump: restoring into a new VECSEARCH_HOME or another server would fail on them) and then
re-applies the privileges vecsearch's own migrations give, creating role vecsearch_reader if
missing. Logins made by `vecsearch db reader` are cluster roles too: make them again there.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import psycopg

from . import db, server
from .config import Settings
from .errors import InvalidInput, NotFound, SchemaMismatch, VecsearchError


def backup(settings: Settings, file: Path) -> None:
    """Write the whole vecsearch database (schema, images, vectors, index definitions) to `file`."""
    db.connect(settings).close()  # started and migrated: a dump always has the current schema
    # Private like the database it copies (every path of the library is in it): created 0600, and
    # pg_dump's own open (mode 0666 minus umask) then only truncates it.
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise InvalidInput(f"cannot write the backup to {file}: {e.strerror}") from e
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # not a pipe or device given as FILE
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    _run("pg_dump", ["--format=custom", "--no-owner", f"--file={file}", db.database_url(settings)])


def backup_revision(file: Path) -> str:
    """The vecsearch schema revision a backup file holds; InvalidInput if it is not a vecsearch backup."""
    if not file.is_file():
        raise NotFound(f"backup file {file} does not exist: give the path of a `vecsearch db backup` file")
    listing = server.run_binary("pg_restore", ["--list", str(file)], capture_output=True, text=True)
    if listing.returncode != 0 or not re.search(r"TABLE DATA public alembic_version ", listing.stdout) \
            or not re.search(r"TABLE public images ", listing.stdout):
        reason = (listing.stderr.strip().splitlines() or ["no vecsearch tables in it"])[-1]
        reason = reason.removeprefix("pg_restore: ")
        raise InvalidInput(f"{file} is not a `vecsearch db backup` file ({reason})")
    data = _run("pg_restore", ["--data-only", "--table=alembic_version", "--file=-", str(file)])
    found = re.search(r"^COPY public\.alembic_version .*\n(\S+)\n\\\.$", data, re.MULTILINE)
    if not found:
        raise InvalidInput(f"{file} holds no vecsearch schema revision: not a `vecsearch db backup` file")
    return found.group(1)


def restore(settings: Settings, file: Path) -> None:
    """Replace the database's vecsearch objects with those in `file` (made by `backup`).

    One transaction: on any error the database is left as it was.
    """
    revision = backup_revision(file)
    if revision > db.SCHEMA_REVISION:
        raise SchemaMismatch(f"{file} was made by a newer vecsearch (schema {revision}, this one has "
                             f"{db.SCHEMA_REVISION}): upgrade vecsearch")
    if revision == db.SCHEMA_REVISION:
        # Reachable, has pgvector, is vecsearch's (another application's tables are never
        # dropped), and migrated: an empty database gets the tables and role vecsearch_reader.
        db.connect(settings).close()
    url = db.database_url(settings)
    db.check_pgvector(url)
    try:
        _run("pg_restore", ["--clean", "--if-exists", "--no-owner", "--no-privileges",
                            "--single-transaction", "--exit-on-error", f"--dbname={url}", str(file)])
    except VecsearchError as e:
        if revision == db.SCHEMA_REVISION:
            raise
        raise VecsearchError(f"{e}; this backup has schema {revision}, older than this vecsearch's "
                             f"{db.SCHEMA_REVISION}: restore it into an empty database (e.g. a new "
                             "VECSEARCH_HOME), where it is migrated after the restore") from e
    db.upgrade(url)  # a backup from an older vecsearch
    grant(url)


def grant(url: str) -> None:
    """Apply the privileges vecsearch's migrations give: each migration that grants any keeps its
    idempotent SQL in a module-level `GRANTS`."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db.alembic_config(url))
    with psycopg.connect(url, autocommit=True) as conn:
        for revision in reversed(list(script.walk_revisions())):
            statement = getattr(revision.module, "GRANTS", None)
            if statement:
                conn.execute(statement)


def _run(binary: str, args: list[str]) -> str:
    result = server.run_binary(binary, args, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line] or lines  # not "Command was: ..."
        raise VecsearchError(f"{binary} failed: {errors[-1] if errors else 'exit ' + str(result.returncode)}")
    return result.stdout
