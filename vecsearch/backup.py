"""`vecsearch db backup/restore`: pg_dump custom format, with the embedded installation's own binaries.

The bundled pg_dump/pg_restore are version 18, so they also dump an older external server.

A restore executes nothing from the file: the target's schema comes from vecsearch's own
migrations (so privileges, functions and the reader role are those of this vecsearch), and only
the rows of `images` and `embedding_model` are read from the dump. Logins made by
`vecsearch db reader` are cluster roles, not in a dump: make them again there.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from . import db, server
from .config import Settings
from .errors import DatabaseBusy, InvalidInput, NotFound, SchemaMismatch, VecsearchError, first_line
from .limits import RESTORE_WAIT_S


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


def restore(settings: Settings, file: Path, *, wait: float = RESTORE_WAIT_S,
            notify: Callable[[str], None] = lambda line: None) -> int:
    """Replace the rows of vecsearch's tables with those in `file` (made by `backup`); their count.

    Nothing the file says is executed: the schema is this vecsearch's own (its migrations), and
    only the COPY data of `images` and `embedding_model` is read from the file, parsed here and fed
    to COPY statements written here, with columns checked against the live tables. So a crafted
    dump can carry no DDL, function or constraint into the database. One transaction: on any
    error the database is left as it was. Sessions holding the tables (a reader's open
    transaction) are waited for at most `wait` seconds, each wait announced through `notify`.
    """
    revision = backup_revision(file)
    if revision > db.SCHEMA_REVISION:
        raise SchemaMismatch(f"{file} was made by a newer vecsearch (schema {revision}, this one has "
                             f"{db.SCHEMA_REVISION}): upgrade vecsearch")
    from .hnsw import hnsw_index, rebuild_index
    from .progress import as_progress

    # Reachable, has pgvector, is vecsearch's (another application's tables are never touched),
    # migrated: the schema comes from the migrations, whatever the backup's revision.
    with db.connect(settings, autocommit=False, session="restore") as conn:
        _refuse_during_a_load(conn)
        _lock_tables(conn, wait, notify)
        index = hnsw_index(conn)
        if index is not None:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(*index[0])))
        conn.execute("TRUNCATE images, embedding_model")
        try:
            rows = _copy_data(conn, file)
            conn.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), "
                         "coalesce(max(id), 0) + 1, false) FROM images")
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as e:
            # The schema's own rules (types, keys, CHECKs of 0005): the loader never writes such rows.
            raise InvalidInput(f"{file} holds rows this vecsearch's schema refuses ({first_line(e)}): "
                               "nothing was restored; restore a backup made by `vecsearch db backup`") from e
        if index is not None:
            rebuild_index(conn, index[1], as_progress(None))
        conn.commit()
    return rows


def _refuse_during_a_load(conn: psycopg.Connection) -> None:
    """Hold the load lock exclusively until commit: a restore truncates what a running load wrote
    (and that load's summary would count rows that are gone), and a load would write into a table
    being replaced."""
    from . import sessions

    if not sessions.try_lock(conn, sessions.LOAD_LOCK, xact=True):
        holders = sessions.describe_holders(conn, sessions.LOAD_LOCK)
        raise DatabaseBusy(f"a `vecsearch load` is running ({holders}): run `vecsearch db restore` "
                           "when it has finished")


TABLES = ("images", "embedding_model")
_COPY_LINE = re.compile(r"COPY public\.(\w+) \(([\w, ]+)\) FROM stdin;")


def _copy_data(conn: psycopg.Connection, file: Path) -> int:
    """Stream the backup's COPY data of TABLES into them; rows of images copied."""
    listing = ["--data-only", "--file=-", *(f"--table={t}" for t in TABLES), str(file)]
    proc = subprocess.Popen([str(server.bin_path("pg_restore")), *listing], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="strict")
    seen: dict[str, int] = {}
    try:
        for line in proc.stdout:
            found = _COPY_LINE.fullmatch(line.rstrip("\n"))
            if found is None or found.group(1) not in TABLES:
                continue  # comments and SET lines of pg_restore's script: never executed
            table, columns = found.group(1), [c.strip() for c in found.group(2).split(",")]
            _check_columns(conn, file, table, columns)
            statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)))
            count = 0
            with conn.cursor().copy(statement) as copy:
                for row in proc.stdout:
                    if row == "\\.\n":
                        break
                    copy.write(row)
                    count += 1
            seen[table] = seen.get(table, 0) + count
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{file} is not a `vecsearch db backup` file (its data is not UTF-8)") from e
    finally:
        proc.stdout.close()
        error = proc.stderr.read()
        proc.wait()
    if proc.returncode != 0:
        lines = [x for x in error.strip().splitlines() if x.strip()] or [f"exit {proc.returncode}"]
        raise VecsearchError(f"pg_restore failed: {lines[-1].removeprefix('pg_restore: ')}")
    if "images" not in seen:
        raise InvalidInput(f"{file} holds no COPY data of the images table: not a `vecsearch db backup` file")
    return seen["images"]


def _check_columns(conn: psycopg.Connection, file: Path, table: str, columns: list[str]) -> None:
    live = {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped", [table])}
    unknown = [c for c in columns if c not in live]
    if unknown or len(set(columns)) != len(columns):
        raise InvalidInput(f"{file}: the {table} data has columns {', '.join(unknown) or 'repeated'} that "
                           "this vecsearch's schema does not have: not a `vecsearch db backup` file")


def _lock_tables(conn: psycopg.Connection, wait: float, notify: Callable[[str], None]) -> None:
    """ACCESS EXCLUSIVE on the tables, waiting for other sessions in steps, each one announced."""
    deadline = time.monotonic() + wait
    step = max(0.05, min(0.5, wait))  # a short first try, so that a wait is announced as it starts
    while True:
        conn.execute("SAVEPOINT lock_attempt")
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(step * 1000)}ms")))
        try:
            conn.execute("LOCK TABLE images, embedding_model IN ACCESS EXCLUSIVE MODE")
            conn.execute("RELEASE SAVEPOINT lock_attempt")
            conn.execute("SET LOCAL lock_timeout = 0")
            return
        except psycopg.errors.LockNotAvailable:
            conn.execute("ROLLBACK TO SAVEPOINT lock_attempt")
        step = max(0.1, min(5.0, deadline - time.monotonic()))
        holders = ", ".join(f"pid {pid} ({user}, {state}{f' for {age:.0f} s' if age else ''})"
                            for pid, user, state, age in conn.execute("""
            SELECT DISTINCT a.pid, a.usename, a.state,
                   extract(epoch FROM clock_timestamp() - a.xact_start)::float8
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.relation IN ('images'::regclass, 'embedding_model'::regclass)
              AND a.pid <> pg_backend_pid() ORDER BY 1""")) or "another session"
        if time.monotonic() >= deadline - 0.05:
            raise DatabaseBusy(f"restore gave up after waiting {wait:g} s for sessions using the "
                               f"tables: {holders}; end them (SELECT pg_terminate_backend(PID)) or "
                               "retry with a longer --wait")
        notify(f"waiting for sessions using the tables to finish: {holders}")


def _run(binary: str, args: list[str]) -> str:
    result = server.run_binary(binary, args, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line] or lines  # not "Command was: ..."
        raise VecsearchError(f"{binary} failed: {errors[-1] if errors else 'exit ' + str(result.returncode)}")
    return result.stdout
