"""vecsearch's own server sessions that hold locks or build: named, watched, and told apart.

A session that holds a lock or builds (a load, `db reindex`, `db restore`, `db distribute`,
`db migrate`) names itself `vecsearch COMMAND HOST:PID` and has the server check every 2 s that
its client is still there: if the process dies (SIGKILL, OOM), the server rolls its work back
within seconds, even inside a long CREATE INDEX or a lock wait, instead of finishing it for nobody
while holding the tables. The name lets a later command end such a session when something else
keeps its socket open (a leftover child process) after the process that owned it is gone.

Two advisory locks, one per images table (per schema), hold the work apart: the index lock
(whoever drops, rebuilds or swaps the HNSW index) and the load lock (every load holds it shared;
a restore takes it exclusively, so a restore and a load never run at once). Migration 0005
revokes the advisory lock functions from PUBLIC, so a reader login cannot take either.
"""

from __future__ import annotations

import os
import re
import socket

import psycopg
from psycopg import sql

INDEX_LOCK = "hashtextextended('vecsearch.hnsw.' || 'images'::regclass::oid, 0)"
LOAD_LOCK = "hashtextextended('vecsearch.load.' || 'images'::regclass::oid, 0)"
CHECK_INTERVAL = "2s"


def _host() -> str:
    return socket.gethostname()[:30]


def application_name(command: str) -> str:
    return f"vecsearch {command} {_host()}:{os.getpid()}"


def watch(conn: psycopg.Connection, command: str) -> None:
    """Name `conn`'s session for `command` and have the server end it soon after this process dies."""
    conn.execute(sql.SQL("SET application_name = {}").format(sql.Literal(application_name(command))))
    if conn.info.server_version >= 140000:  # client_connection_check_interval is PostgreSQL 14+
        conn.execute(sql.SQL("SET client_connection_check_interval = {}").format(
            sql.Literal(CHECK_INTERVAL)))


def holders(conn: psycopg.Connection, key: str) -> list[tuple[int, str, str]]:
    """(backend pid, role, application_name) of the other sessions holding advisory lock `key`."""
    return conn.execute(f"""
        SELECT DISTINCT a.pid, a.usename, a.application_name
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid() AND l.database = (
              SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.objsubid = 1 AND (l.classid::bigint << 32) | l.objid::bigint = {key}
        ORDER BY 1
    """).fetchall()


def end_orphaned_holders(conn: psycopg.Connection, key: str) -> bool:
    """End the sessions holding lock `key` for a vecsearch command of this machine whose process is
    gone. True if any ended."""
    from .server import pid_alive

    own = re.compile(rf"vecsearch [a-z]+ {re.escape(_host())}:(\d+)")
    ended = False
    for backend, _, name in holders(conn, key):
        found = own.fullmatch(name or "")
        if found and not pid_alive(int(found.group(1))):
            ended |= conn.execute("SELECT pg_terminate_backend(%s, 10000)", [backend]).fetchone()[0]
    return ended


def try_lock(conn: psycopg.Connection, key: str, *, shared: bool = False, xact: bool = False) -> bool:
    """Take advisory lock `key` without waiting, ending a dead vecsearch command's session first
    if that is what holds it. True if taken."""
    function = f"pg_try_advisory{'_xact' if xact else ''}_lock{'_shared' if shared else ''}"
    take = f"SELECT {function}({key})"
    if conn.execute(take).fetchone()[0]:
        return True
    return end_orphaned_holders(conn, key) and conn.execute(take).fetchone()[0]


def describe_holders(conn: psycopg.Connection, key: str) -> str:
    """The sessions holding lock `key`, for a message: pid, role and name of each."""
    return "; ".join(f"session pid {pid}, role {role}" + (f", {name!r}" if name else "")
                     for pid, role, name in holders(conn, key)) or "another session"
