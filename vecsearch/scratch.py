"""Scratch schemas for `vecsearch eval`: empty copies of the vecsearch tables and functions.

An experiment embeds its images into `vecsearch_eval_<host>_<pid>_<random>`, never into the
user's `images`, and drops the schema at the end; schemas left by killed runs on this machine are
dropped by the next one. The neighbour functions are created there from the very SQL of the
migrations (`db.similarity_functions`), so an experiment queries exactly as `vecsearch similar`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from . import db, server
from .errors import VecsearchError

SCRATCH_PREFIX = "vecsearch_eval_"


@contextmanager
def scratch_schema(conn: psycopg.Connection) -> Iterator[str]:
    """A new schema holding empty copies of the public vecsearch tables, dropped on exit.

    Every table, index (under the same names: a load that drops and rebuilds
    `images_embedding_hnsw` with `search_path = scratch, public` must find the scratch one)
    and storage option is copied. Schemas left by killed runs on this machine are dropped first.
    """
    drop_stale_scratch_schemas(conn)
    name = f"{SCRATCH_PREFIX}{_host_tag()}_{os.getpid()}_{secrets.token_hex(4)}"
    schema = sql.Identifier(name)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            tables = conn.execute(
                "SELECT c.relname, c.reloptions FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> 'alembic_version'"
            ).fetchall()
            for table, options in tables:
                conn.execute(sql.SQL("CREATE TABLE {}.{} (LIKE public.{} INCLUDING ALL)").format(
                    schema, sql.Identifier(table), sql.Identifier(table)))
                if options:
                    conn.execute(sql.SQL("ALTER TABLE {}.{} SET ({})").format(
                        schema, sql.Identifier(table), sql.SQL(", ").join(sql.SQL(o) for o in options)))
                _copy_index_names(conn, name, table)
            # The compact index's projection in use, so the copy's graph and queries are the same.
            if any(table == "vecsearch_projection" for table, _ in tables):
                conn.execute(sql.SQL("INSERT INTO {}.vecsearch_projection SELECT * FROM "
                                     "public.vecsearch_projection WHERE in_use").format(schema))
            # The neighbour functions, created in the scratch schema with it first on their path.
            conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(schema))
            for statement in db.similarity_functions():
                conn.execute(statement)
        yield name
    finally:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))


def _copy_index_names(conn: psycopg.Connection, schema: str, table: str) -> None:
    def indexes(nspname: str) -> dict[str, str]:
        rows = conn.execute(
            "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s AND t.relname = %s",
            [nspname, table]).fetchall()
        # The definition without its own name and table, as a key.
        return {(d.startswith("CREATE UNIQUE"), d.split(" USING ", 1)[1]): n for n, d in rows}

    public, scratch = indexes("public"), indexes(schema)
    for definition, wanted in public.items():
        have = scratch.get(definition)
        if have is None:
            raise VecsearchError(f"the scratch copy of {table} lacks the index {wanted}")
        if have != wanted:
            conn.execute(sql.SQL("ALTER INDEX {}.{} RENAME TO {}").format(
                sql.Identifier(schema), sql.Identifier(have), sql.Identifier(wanted)))


def _host_tag() -> str:
    """Six hex digits of this machine's name: a pid only says something about its own host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def drop_stale_scratch_schemas(conn: psycopg.Connection) -> list[str]:
    """Drop the scratch schemas of evals on this machine that were killed (their process gone)."""
    mine = f"{SCRATCH_PREFIX}{_host_tag()}_"
    stale = []
    for (name,) in conn.execute("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)",
                                [mine]).fetchall():
        pid = name.removeprefix(mine).split("_", 1)[0]
        if pid.isdigit() and not server.pid_alive(int(pid)):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
            stale.append(name)
    return stale
