"""Connections and schema: every command gets a psycopg connection to a migrated database.

psycopg only, no SQLAlchemy: this is the query path, and alembic is imported only when the
schema actually needs upgrading.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
from psycopg import sql

from . import server
from .config import Settings
from .errors import DatabaseUnavailable, InvalidInput, PgvectorMissing, SchemaMismatch, first_line
from .limits import DEFAULT_EF_SEARCH, DIM

# The alembic head this code expects; tests/test_foundation.py keeps it equal to migrations/.
SCHEMA_REVISION = "0009"
# The full index's expression (pgvector indexes at most 2000 dimensions of `vector`, so the graph is
# on a halfvec cast): a query must order by exactly this to use it. The SQL functions carry their
# own copy; tests that plan queries against the index use this one.
ANN_EXPR = f"embedding::halfvec({DIM})"
# The repository's migrations/ in a checkout; the copy shipped as vecsearch/migrations in a wheel.
MIGRATIONS_DIR = next((d for d in (Path(__file__).resolve().parent.parent / "migrations",
                                   Path(__file__).resolve().parent / "migrations") if d.is_dir()),
                      Path(__file__).resolve().parent / "migrations")


def database_url(settings: Settings) -> str:
    """The URL to connect to, starting the embedded server if that is the one in use."""
    if settings.database_url:
        return settings.database_url
    return server.ensure_running(settings.home).url()


def redact(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def connect(settings: Settings, *, migrate: bool = True, autocommit: bool = True,
            session: str | None = None, **kwargs) -> psycopg.Connection:
    """A connection to the vecsearch database, schema at head (upgraded if `migrate`).

    `session`: the command, for a connection that holds locks or builds (sessions.watch).
    """
    url = database_url(settings)
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10, **kwargs)
    except psycopg.ProgrammingError as e:  # not a libpq URL at all
        raise DatabaseUnavailable(
            f"{redact(url)} is not a PostgreSQL URL ({str(e).strip()}): give "
            "postgresql://USER:PASSWORD@HOST:PORT/DBNAME"
        ) from e
    except psycopg.OperationalError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__  # libpq's last line
        where = "VECSEARCH_DATABASE_URL" if settings.database_url else "the embedded server"
        raise DatabaseUnavailable(
            f"cannot connect to {redact(url)} ({reason}): check {where}, or run "
            "`vecsearch db status`"
        ) from e
    try:
        revision = schema_revision(conn)
        if revision != SCHEMA_REVISION:
            _check_foreign(conn, revision)
            if revision is not None and revision > SCHEMA_REVISION:
                raise SchemaMismatch(
                    f"the database schema is at revision {revision}, newer than this vecsearch "
                    f"({SCHEMA_REVISION}): upgrade vecsearch"
                )
            if not migrate:
                raise SchemaMismatch(
                    f"the database schema is at revision {revision or 'none'}, this vecsearch "
                    f"needs {SCHEMA_REVISION}: run `vecsearch db migrate`"
                )
            upgrade(url)
        register_vector(conn)
        if session is not None:
            from . import sessions

            sessions.watch(conn, session)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_foreign(conn: psycopg.Connection, revision: str | None) -> None:
    """Refuse a database whose schema another application made (migrating it would fail midway)."""
    if revision is not None and not re.fullmatch(r"\d{4}", revision):
        raise SchemaMismatch(
            f"the database's alembic_version is {revision!r}, not a vecsearch revision: it belongs to "
            "another application; point vecsearch at its own database")
    if revision is None:
        clash = conn.execute("SELECT to_regclass('images') IS NOT NULL OR to_regclass('embedding_model') "
                             "IS NOT NULL").fetchone()[0]
        if clash:
            raise SchemaMismatch(
                "the database has an `images` or `embedding_model` table that vecsearch did not make "
                "(no alembic_version): point vecsearch at its own database")


def register_vector(conn: psycopg.Connection) -> None:
    from pgvector.psycopg import register_vector as register

    register(conn)


def schema_revision(conn: psycopg.Connection) -> str | None:
    try:
        with conn.transaction():
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return row[0] if row else None


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations; concurrent callers wait on an advisory lock inside env.py."""
    from alembic import command

    check_pgvector(url)
    command.upgrade(alembic_config(url), revision)


def migrate_to(url: str, revision: str = "head") -> str:
    """`vecsearch db migrate`: upgrade to `revision`; the revision the schema is at afterwards.

    InvalidInput for an unknown revision, or one older than the schema (this never downgrades).
    """
    from alembic.script import ScriptDirectory
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(alembic_config(url))
    try:
        target = script.get_revision(revision)
    except (CommandError, RevisionError) as e:
        target = None
        reason = first_line(e)
    else:
        reason = f"no revision {revision!r}"
    if target is None:
        known = ", ".join(r.revision for r in reversed(list(script.walk_revisions())))
        raise InvalidInput(f"--revision {revision}: {reason}; vecsearch's revisions are {known} "
                           "(or head)")
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        current = schema_revision(conn)
    if current is not None and re.fullmatch(r"\d{4}", current) and current > target.revision:
        raise InvalidInput(f"the schema is at {current}, newer than {target.revision}: `vecsearch db "
                           "migrate` only upgrades (restore a backup made at that revision instead)")
    upgrade(url, target.revision)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return schema_revision(conn) or "none"


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


# Migration constants, in creation order.
_FUNCTIONS = ("SEARCH_SETTINGS", "REDUCE", "NEAREST", "SIMILAR_TO", "SIMILAR")


def similarity_functions() -> list[str]:
    """The CREATE statements of the neighbour functions (`vecsearch_search_settings`,
    `vecsearch_reduce`, `vecsearch_nearest` where the schema has them, `vecsearch_similar_to`,
    `vecsearch_similar`), each as the newest migration that
    defines it wrote it: for a copy of them in another schema (`vecsearch eval`)."""
    from alembic.script import ScriptDirectory

    found: dict[str, str] = {}
    for revision in ScriptDirectory.from_config(alembic_config("")).walk_revisions():  # newest first
        for name in _FUNCTIONS:
            if name not in found and getattr(revision.module, name, None):
                found[name] = getattr(revision.module, name)
    return [found[name].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
            for name in _FUNCTIONS if name in found]



def check_pgvector(url: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        available = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
    if available is None:
        raise PgvectorMissing(
            f"the server at {redact(url)} has no pgvector extension: install pgvector 0.8+ "
            "there, or unset VECSEARCH_DATABASE_URL to use the embedded server"
        )


def sqlalchemy_url(url: str) -> str:
    """The same database for SQLAlchemy's psycopg 3 dialect."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", url)


# The HNSW index of `images`, compact or full (migration 0006's names), as a regclass expression.
HNSW_INDEX = "coalesce(to_regclass('images_reduced_hnsw'), to_regclass('images_embedding_hnsw'))"


def status(conn: psycopg.Connection, *, rows: bool = True) -> list[tuple[str, str]]:
    """What `vecsearch db status` shows about a connected database; `rows` False leaves the
    images, table and hnsw lines to the caller (on Citus the rows are on the workers, and
    counting them here would fail at the first one that is down)."""
    measured = """(SELECT count(*) FROM images),
               pg_size_pretty(pg_total_relation_size('images')),
               -- NULL ("none") while a bulk load has the index dropped
               (SELECT format('%s, %s bytes per row', pg_size_pretty(pg_relation_size(x)),
                              pg_relation_size(x) / greatest(1, (SELECT count(*) FROM images)))
                FROM (SELECT {HNSW} AS x) h WHERE x IS NOT NULL),""".replace("{HNSW}", HNSW_INDEX) \
        if rows else "NULL, NULL, NULL,"
    row = conn.execute(f"""
        SELECT current_setting('server_version'),
               (SELECT extversion FROM pg_extension WHERE extname = 'vector'),
               (SELECT version_num FROM alembic_version),
               {measured}
               (SELECT array_to_string(reloptions, ', ') FROM pg_class
                WHERE oid = {HNSW_INDEX}),
               (SELECT format('%s, weights %s', name, weights) FROM embedding_model)
    """).fetchone()
    labels = ["postgres", "pgvector", "schema", "images", "table", "hnsw", "hnsw opts", "model"]
    tuned = database_ef_search(conn)
    from .compact import describe

    return [(label, "none" if value is None else str(value))
            for label, value in zip(labels, row, strict=True)] + [
        ("ef_search", f"{DEFAULT_EF_SEARCH} (the default; `vecsearch db recall` measures recall here)"
         if tuned is None else f"{tuned} (this database's: `vecsearch db recall --tune`)"),
        ("index", describe(conn))] + ([("cache", cache(conn))] if rows else [])


def cache(conn: psycopg.Connection) -> str:
    """Whether this server's shared_buffers holds the HNSW graph, which every query walks."""
    buffers, graph, holds = conn.execute(f"""
        SELECT pg_size_pretty(pg_size_bytes(current_setting('shared_buffers'))), pg_size_pretty(g),
               g <= pg_size_bytes(current_setting('shared_buffers'))
        FROM (SELECT (SELECT pg_relation_size(x) FROM (SELECT {HNSW_INDEX} AS x) h
                      WHERE x IS NOT NULL) AS g) i
    """).fetchone()
    have = f"shared_buffers {buffers}"
    if graph is None or holds:
        return have if graph is None else f"{have}, holds the {graph} index"
    return (f"{have}, less than the {graph} index: queries read it through the OS cache, "
            "slower; embedded: `vecsearch db stop` resizes it at the next start, else raise "
            "shared_buffers (docs/scaling.md#memory)")


def set_database_default(conn: psycopg.Connection, setting: str, value: str) -> None:
    """`ALTER DATABASE <this one> SET setting = value` (every later session gets it), and for this
    session too. Raises psycopg.errors.InsufficientPrivilege for a login that does not own it."""
    database = conn.execute("SELECT current_database()").fetchone()[0]
    conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
        sql.Identifier(database), sql.SQL(setting), sql.Literal(value)))
    conn.execute(sql.SQL("SET {} = {}").format(sql.SQL(setting), sql.Literal(value)))


def database_ef_search(conn: psycopg.Connection) -> int | None:
    """The database's own default ef_search, which the SQL functions use when a caller gives none
    (`vecsearch db recall --tune` sets it); None: limits.DEFAULT_EF_SEARCH."""
    value = conn.execute("SELECT nullif(current_setting('vecsearch.ef_search', true), '')").fetchone()[0]
    return None if value is None else int(value)
