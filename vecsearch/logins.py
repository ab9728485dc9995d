"""Read-only logins for analytics tools (Metabase, Grafana, Superset, notebooks).

Each login is a member of `vecsearch_reader` (migration 0002): SELECT on vecsearch's tables,
EXECUTE on its functions, nothing else. Roles are cluster-wide; the password is generated, sent
to the server already SCRAM-hashed (never in clear text, so never in a server log), and shown
once in the URL.
"""

from __future__ import annotations

import re
import secrets
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from . import server
from .config import Settings
from .errors import InvalidInput, NotFound

GROUP = "vecsearch_reader"
# Session defaults of every reader login: a runaway query or a transaction left open in a
# notebook cannot hold the tables (and so `vecsearch db restore`) for long. They are defaults:
# PostgreSQL lets any session change them with SET.
LOGIN_SETTINGS = {"statement_timeout": "60s", "idle_in_transaction_session_timeout": "60s"}
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def create(conn: psycopg.Connection, name: str) -> str:
    """Create login `name` in the reader group (or give an existing reader a new password).

    Returns the new password.
    """
    _check_name(name)
    if not _exists(conn, GROUP):
        raise NotFound(f"role {GROUP} does not exist: the migration could not create it (it needs "
                       "the CREATEROLE privilege); create it as a superuser and run `vecsearch db migrate`")
    password = secrets.token_urlsafe(24)
    hashed = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
    with conn.transaction():
        if _exists(conn, name):
            _check_is_reader(conn, name)
            conn.execute(sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(hashed)))
        else:
            conn.execute(sql.SQL("CREATE ROLE {} WITH LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(name), sql.Literal(hashed), sql.Identifier(GROUP)))
        for setting, value in LOGIN_SETTINGS.items():
            conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(
                sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)))
    return password


def drop(conn: psycopg.Connection, name: str) -> None:
    """Drop login `name`, which must be a reader login."""
    _check_name(name)
    if not _exists(conn, name):
        raise NotFound(f"no role named {name}")
    _check_is_reader(conn, name)
    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def url(settings: Settings, conn: psycopg.Connection, name: str, password: str) -> str:
    """A libpq URL for login `name`: over TCP when the embedded server listens on TCP.

    The embedded server trusts its unix socket (it is private to its owner, 0700) and asks
    for the password over TCP; a tool in a container or on another account needs TCP
    (`vecsearch db start --tcp`).
    """
    params = conninfo_to_dict(conn.info.dsn)
    host, port, dbname = conn.info.host, conn.info.port, conn.info.dbname
    if settings.embedded:
        running = server.ensure_running(settings.home)
        if running.listen:
            host, port = running.listen, running.port
    auth = f"{quote(name, safe='')}:{quote(password, safe='')}"
    extra = {k: v for k, v in params.items()
             if k in ("sslmode", "sslrootcert", "target_session_attrs", "options")}
    if host.startswith("/"):  # a unix socket directory
        query = urlencode({"host": host, "port": port, **extra}, safe="/", quote_via=quote)
        return f"postgresql://{auth}@/{quote(dbname, safe='')}?{query}"
    query = urlencode(extra, quote_via=quote)
    netloc = f"[{host}]" if ":" in host else host
    return f"postgresql://{auth}@{netloc}:{port}/{quote(dbname, safe='')}" + (f"?{query}" if query else "")


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name.startswith("pg_") or name == GROUP:
        raise InvalidInput(f"invalid login name {name!r}: use lower-case letters, digits and _, "
                           "at most 63, not starting with a digit or pg_")


def _exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = %s)", [role]).fetchone()[0]


def _check_is_reader(conn: psycopg.Connection, name: str) -> None:
    """Refuse to touch a role that is not a vecsearch reader login (e.g. `postgres`)."""
    is_reader = conn.execute(
        "SELECT r.rolcanlogin AND NOT r.rolsuper AND EXISTS ("
        "  SELECT FROM pg_auth_members m WHERE m.member = r.oid AND m.roleid = %s::regrole)"
        " FROM pg_roles r WHERE r.rolname = %s", [GROUP, name]).fetchone()[0]
    if not is_reader:
        raise InvalidInput(f"role {name} exists and is not a vecsearch reader login: choose another name")
