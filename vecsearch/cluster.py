"""A local Citus cluster of embedded servers: one coordinator and N workers on this machine.

For development, the `citus` tests and bench/citus.py; production clusters are set up as
docs/scaling.md describes. Each node is an embedded server (vecsearch/server.py) in its own home
under `root`; the nodes talk over their unix sockets (private 0700 directories, trust auth as
for every embedded server), so nothing listens on the network. Needs Citus built into the
embedded PostgreSQL: `./dev citus SOURCE`.

    python -m vecsearch.cluster start ROOT [--workers 2]   # prints VECSEARCH_DATABASE_URL
    python -m vecsearch.cluster stop ROOT
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from . import server
from .errors import DatabaseUnavailable

_CONF = {"shared_preload_libraries": "citus", "max_prepared_transactions": "100",
         "max_connections": "200"}


@dataclass(frozen=True)
class Cluster:
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


def homes(root: Path, workers: int) -> list[Path]:
    return [root / "coordinator", *(root / f"worker{i}" for i in range(1, workers + 1))]


def start(root: Path, workers: int = 2) -> Cluster:
    """Start (creating on first use) the coordinator and `workers` workers under `root`."""
    missing = citus_built()
    if missing:
        raise DatabaseUnavailable(missing)
    nodes = [_start_node(home) for home in homes(root, workers)]
    coordinator, rest = nodes[0], nodes[1:]
    with server.psql_connection(coordinator, server.DBNAME) as conn:
        known = {(r[0], r[1]) for r in conn.execute("SELECT nodename, nodeport FROM pg_dist_node")}
        if (str(coordinator.socket_dir), coordinator.port) not in known:
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)",
                         [str(coordinator.socket_dir), coordinator.port])
        for worker in rest:
            if (str(worker.socket_dir), worker.port) not in known:
                conn.execute("SELECT citus_add_node(%s, %s)", [str(worker.socket_dir), worker.port])
    return Cluster(coordinator, rest)


def stop(root: Path) -> None:
    for home in sorted(p for p in root.iterdir() if (p / "pg").is_dir()) if root.is_dir() else []:
        server.stop(home)


def _start_node(home: Path) -> server.Running:
    node = server.ensure_running(home)
    with server.psql_connection(node) as conn:
        current = {name: conn.execute("SELECT current_setting(%s)", [name]).fetchone()[0] for name in _CONF}
        for name, value in _CONF.items():
            if current[name] != value:
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
    if current != _CONF:  # preloaded libraries and these limits take a restart
        server.stop(home)
        node = server.ensure_running(home)
    with server.psql_connection(node, server.DBNAME) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description="A local Citus cluster of embedded servers.")
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("root", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.action == "start":
        print(start(args.root, args.workers).url)
    else:
        stop(args.root)


if __name__ == "__main__":
    main()
