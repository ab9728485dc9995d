"""A local Citus cluster of embedded servers: one coordinator and N workers on this machine.

For development, the `citus` tests and bench/citus.py; production clusters are set up as
docs/scaling.md describes. Each node is an embedded server (vecsearch/server.py) in its own home
under `root`; the nodes talk over their unix sockets (private 0700 directories, trust auth as
for every embedded server), so nothing listens on the network. Needs Citus built into the
embedded PostgreSQL: `./dev citus SOURCE`.

    python -m vecsearch.cluster start ROOT [--workers 2]   # prints VECSEARCH_DATABASE_URL
    python -m vecsearch.cluster stop ROOT
    python -m vecsearch.cluster status ROOT                # exit 3 if a node is down

Each is safe to repeat, and `start` brings back a cluster after `stop` or after one node went
down: workers start before the coordinator (which reaches them as soon as it runs), and each
extension is created only where it is missing, on the node at hand (on a Citus coordinator
`CREATE EXTENSION IF NOT EXISTS` is sent to every worker even when it exists; on a worker in the
cluster it is refused).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from psycopg import sql

from . import server
from .errors import DatabaseUnavailable, VecsearchError

# Settings that take a server restart. wal_level logical: the rebalancer moves shards by logical
# replication (writes continue meanwhile); under `replica` its default transfer mode fails.
_RESTART_CONF = {"shared_preload_libraries": "citus", "max_prepared_transactions": "100",
                 "max_connections": "200", "wal_level": "logical"}
# How long a node waits for another to accept a connection (Citus's default is 30 s, which a
# frozen worker costs every command). Local sockets and a LAN connect in milliseconds.
NODE_CONNECTION_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class Cluster:
    root: Path
    coordinator: server.Running
    workers: list[server.Running]

    @property
    def url(self) -> str:
        """VECSEARCH_DATABASE_URL of the coordinator."""
        return self.coordinator.url()


def citus_built() -> str | None:
    """None if the embedded PostgreSQL has Citus, else why not (one line)."""
    lib = server.bin_path("pg_config").parent.parent / "lib" / "citus.so"
    if not lib.exists():
        return f"Citus is not built into the embedded PostgreSQL ({lib} is missing): run ./dev citus SOURCE"
    return None


def homes(root: Path, workers: int = 0) -> list[Path]:
    """The coordinator's home, then the workers' (at least `workers`, and every one created)."""
    existing = len(list(root.glob("worker*/pg"))) if root.is_dir() else 0
    return [root / "coordinator", *(root / f"worker{i}" for i in range(1, max(workers, existing) + 1))]


def start(root: Path, workers: int = 2) -> Cluster:
    """Start (creating on first use) the coordinator and its workers under `root`: at least
    `workers`, and every worker already there. A new worker is added to the cluster (without
    shards: `SELECT citus_rebalance_start()` moves some onto it)."""
    missing = citus_built()
    if missing:
        raise DatabaseUnavailable(missing)
    coordinator_home, *worker_homes = homes(root, workers)
    rest = [_start_node(home) for home in worker_homes]
    coordinator = _start_node(coordinator_home)
    with server.psql_connection(coordinator, server.DBNAME) as conn:
        known = {(r[0], r[1]) for r in conn.execute("SELECT nodename, nodeport FROM pg_dist_node")}
        if (str(coordinator.socket_dir), coordinator.port) not in known:
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)",
                         [str(coordinator.socket_dir), coordinator.port])
        for worker in rest:
            if (str(worker.socket_dir), worker.port) not in known:
                conn.execute("SELECT citus_add_node(%s, %s)", [str(worker.socket_dir), worker.port])
    return Cluster(root, coordinator, rest)


def stop(root: Path) -> list[str]:
    """Stop every node that runs, the coordinator first (no query sees half a cluster); the
    names of those stopped."""
    return [home.name for home in homes(root) if server.stop(home)]


def status(root: Path) -> list[tuple[str, server.Running | None]]:
    """Each node under `root` (coordinator first) and its running server, None where it is down."""
    return [(home.name, server.running(home)) for home in homes(root) if (home / "pg").is_dir()]


def _start_node(home: Path) -> server.Running:
    node = server.ensure_running(home)
    wanted = {**_RESTART_CONF, "citus.local_hostname": str(node.socket_dir),
              "citus.node_connection_timeout": str(NODE_CONNECTION_TIMEOUT_MS)}
    with server.psql_connection(node) as conn:
        current = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                                    [list(wanted)]).fetchall())
        changed = [name for name, value in wanted.items() if current.get(name) != value]
        for name in changed:
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name),
                                                                    sql.Literal(wanted[name])))
        if changed and not set(changed) & set(_RESTART_CONF):
            conn.execute("SELECT pg_reload_conf()")
    if set(changed) & set(_RESTART_CONF):
        server.stop(home)
        node = server.ensure_running(home)
    with server.psql_connection(node, server.DBNAME) as conn:
        present = {r[0] for r in conn.execute("SELECT extname FROM pg_extension")}
        for extension in ("citus", "vector"):
            if extension not in present:
                conn.execute(f"CREATE EXTENSION {extension}")
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description="A local Citus cluster of embedded servers.")
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("root", type=Path)
    parser.add_argument("--workers", type=int, default=2, help="start: at least this many workers")
    args = parser.parse_args()
    try:
        if args.action == "start":
            print(start(args.root, args.workers).url)
        elif args.action == "stop":
            stopped = stop(args.root)
            print(f"stopped {', '.join(stopped)}" if stopped else "not running")
        else:
            nodes = status(args.root)
            for name, node in nodes:
                print(f"{name}: " + (f"up (pid {node.pid}, socket {node.socket_dir}, port {node.port})"
                                     if node else "down"))
            if not nodes or not all(node for _, node in nodes):
                sys.exit(3)
    except VecsearchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
