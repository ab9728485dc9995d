"""Memory and parallel workers for an HNSW build, decided from the server that builds it.

pgvector builds a graph fast while it fits `maintenance_work_mem` and finishes one that outgrows
it on disk, insert by insert (many times slower). The machine running vecsearch is the wrong one
to size that from: on Citus each worker builds the graphs of its own shards. So every node that
builds is asked about itself (its RAM and CPUs where its role may read /proc and /sys, its
`shared_buffers`, `maintenance_work_mem`, `max_parallel_workers`, `max_parallel_maintenance_workers`,
and the operator's `vecsearch.build_memory` / `vecsearch.build_workers` if set on it) and about
the rows of its shards, and gets its own settings:

- memory: what its largest shard's graph needs (rows x bytes per element x 1.2 + 64 MB, the
  element of the representation in use: full or compact), at most its budget:
  `vecsearch.build_memory` if set, else half the memory it has available, else (RAM not
  readable) 2 x shared_buffers or its maintenance_work_mem if larger;
- parallel workers: `vecsearch.build_workers` if set, else its CPUs - 1 (at most its
  max_parallel_workers), else (CPUs not readable) its own max_parallel_maintenance_workers.

On Citus the shards of one worker are built one after another (`citus.multi_shard_modify_mode =
sequential`: one connection per worker, the workers in parallel), each with the whole budget and
all the CPUs, so a worker needs memory for its largest shard, not for all of them at once. The
settings reach each worker on that connection: a query routed to one of its shards runs
`set_config(..., true)` there, in the build's transaction (a Citus `SET LOCAL` would send every
worker the same value).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import psycopg

from .errors import InvalidInput, first_line

MEMORY_SETTING = "vecsearch.build_memory"
WORKERS_SETTING = "vecsearch.build_workers"
MB = 2**20
OVERHEAD = 64 * MB  # beyond the elements: pgvector's build state, the tuple sort
MARGIN = 1.2  # the elements' neighbour lists grow past the estimate on clustered data

# What a node says about itself, as one JSON text (run on it through the coordinator, or on a
# single server directly). Files are read only where the role may, so a restricted role still
# gets an answer (without RAM and CPUs).
FACTS = """
SELECT json_build_object(
    'readable', r.ok,
    'meminfo', CASE WHEN r.ok THEN pg_read_file('/proc/meminfo', 0, 4096, true) END,
    'cgroup_memory', CASE WHEN r.ok THEN pg_read_file('/sys/fs/cgroup/memory.max', 0, 64, true) END,
    'cpus_online', CASE WHEN r.ok THEN pg_read_file('/sys/devices/system/cpu/online', 0, 256, true) END,
    'cgroup_cpu', CASE WHEN r.ok THEN pg_read_file('/sys/fs/cgroup/cpu.max', 0, 64, true) END,
    'shared_buffers', pg_size_bytes(current_setting('shared_buffers')),
    'maintenance_work_mem', pg_size_bytes(current_setting('maintenance_work_mem')),
    'max_parallel_workers', current_setting('max_parallel_workers')::int,
    'max_parallel_maintenance_workers', current_setting('max_parallel_maintenance_workers')::int,
    'build_memory', nullif(current_setting('vecsearch.build_memory', true), ''),
    'build_workers', nullif(current_setting('vecsearch.build_workers', true), ''),
    'rows', ARRAY[{rows}]::bigint[])::text
FROM (SELECT has_function_privilege('pg_read_file(text, bigint, bigint, boolean)', 'EXECUTE')
             AND ((SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                  OR pg_has_role(current_user, 'pg_read_server_files', 'MEMBER')) AS ok) r"""


def has_citus(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')").fetchone()[0]


def is_distributed(conn: psycopg.Connection) -> bool:
    """Whether `images` is a Citus distributed table."""
    if not has_citus(conn):
        return False
    return conn.execute("SELECT EXISTS (SELECT FROM pg_dist_partition "
                        "WHERE logicalrelid = 'images'::regclass AND partmethod = 'h')").fetchone()[0]


def shard_count(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pg_dist_shard "
                        "WHERE logicalrelid = 'images'::regclass").fetchone()[0]


@dataclass
class Facts:
    """What a node reported about itself."""

    ram: int | None  # bytes: MemTotal, or a container's limit if lower
    available: int | None  # bytes: MemAvailable, at most ram
    cpus: int | None
    shared_buffers: int
    maintenance_work_mem: int
    max_parallel_workers: int
    max_parallel_maintenance_workers: int
    build_memory: str | None  # the operator's vecsearch.build_memory, as given
    build_workers: str | None
    rows: list[int]  # of each shard it builds (one: a single server's table)


@dataclass
class Plan:
    """One node's build settings and why."""

    node: str  # "host:port", or "the server" on a single PostgreSQL
    memory: int  # bytes of maintenance_work_mem for each of its builds
    workers: int  # max_parallel_maintenance_workers
    reason: str

    @property
    def memory_setting(self) -> str:
        return f"{max(1, self.memory // 1024)}kB"

    def with_workers(self, workers: int) -> Plan:
        return Plan(self.node, self.memory, workers, self.reason)


def parse_facts(text: str) -> Facts:
    f = json.loads(text)
    ram = available = None
    meminfo = dict(re.findall(r"^(\w+):\s+(\d+) kB", f.get("meminfo") or "", re.M))
    if "MemTotal" in meminfo:
        ram = int(meminfo["MemTotal"]) * 1024
        available = int(meminfo.get("MemAvailable", meminfo["MemTotal"])) * 1024
        limit = (f.get("cgroup_memory") or "").strip()
        if limit.isdigit():
            ram, available = min(ram, int(limit)), min(available, int(limit))
    return Facts(ram, available, _cpus(f.get("cpus_online"), f.get("cgroup_cpu")),
                 int(f["shared_buffers"]), int(f["maintenance_work_mem"]), int(f["max_parallel_workers"]),
                 int(f["max_parallel_maintenance_workers"]), f.get("build_memory"), f.get("build_workers"),
                 [int(r) for r in f["rows"]])


def _cpus(online: str | None, quota: str | None) -> int | None:
    """CPUs from /sys/devices/system/cpu/online ("0-3,6"), lowered by a cgroup quota ("200000 100000")."""
    if not online or not online.strip():
        return None
    count = 0
    for part in online.strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    fields = (quota or "").split()
    if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]):
        count = min(count, max(1, int(fields[0]) // int(fields[1])))
    return count


_UNITS = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}


def parse_size(text: str, node: str) -> int:
    """PostgreSQL's memory units (kB, MB, GB, TB: powers of 1024; a bare number is kB)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?[bB])?\s*", text)
    if not found:
        raise InvalidInput(f"{MEMORY_SETTING} on {node} is {text!r}: give a size such as 48GB or 512MB")
    unit = (found.group(2) or "kB").lower()
    return int(float(found.group(1)) * _UNITS[unit])


def graph_bytes(rows: int, element_bytes: int) -> int:
    """The memory a graph of `rows` elements needs to be built in memory (bench/buildcurve.py
    checks it against pgvector)."""
    return int(rows * element_bytes * MARGIN + OVERHEAD)


def plan(node: str, facts: Facts, element_bytes: int, workers: int | None = None) -> Plan:
    """The build settings of one node, from what it reported; `workers` overrides its own count."""
    largest = max(facts.rows, default=0)
    need = graph_bytes(largest, element_bytes)
    if facts.build_memory:
        budget = parse_size(facts.build_memory, node)
        whence = f"its {MEMORY_SETTING} {facts.build_memory}"
    elif facts.available is not None:
        budget = facts.available // 2
        whence = f"half the {_gb(facts.available)} available of its {_gb(facts.ram)} RAM"
    else:
        budget = max(2 * facts.shared_buffers, facts.maintenance_work_mem)
        whence = (f"RAM not readable by this role: the larger of 2 x its shared_buffers "
                  f"({_gb(facts.shared_buffers)}) and its maintenance_work_mem; set {MEMORY_SETTING} "
                  "on it to say")
    memory = min(need, budget)
    shards = len(facts.rows)
    what = (f"{shards} shard{'s' if shards != 1 else ''} built one after another, the largest "
            f"{largest:,} rows" if shards > 1 else f"{largest:,} rows")
    fits = (f"needs {_gb(need)} to build in memory" if need <= budget else
            f"needs {_gb(need)} to build in memory, more than its budget: the graph is finished on "
            f"disk (much slower); raise {MEMORY_SETTING} on it or spread the rows over more workers")
    if workers is not None:
        count, why = workers, "as asked"
    elif facts.build_workers:
        if not facts.build_workers.strip().isdigit():
            raise InvalidInput(f"{WORKERS_SETTING} on {node} is {facts.build_workers!r}: give a whole "
                               "number of parallel workers, such as 3")
        count, why = int(facts.build_workers), f"its {WORKERS_SETTING}"
    elif facts.cpus is not None:
        count = max(0, min(facts.cpus - 1, facts.max_parallel_workers))
        why = f"its {facts.cpus} CPUs - 1, at most its max_parallel_workers {facts.max_parallel_workers}"
    else:
        count = facts.max_parallel_maintenance_workers
        why = "CPUs not readable: its max_parallel_maintenance_workers"
    reason = (f"{node}: {what}, {fits}; maintenance_work_mem {_gb(memory)} (budget {_gb(budget)}: "
              f"{whence}), {count} parallel worker{'' if count == 1 else 's'} ({why})")
    return Plan(node, memory, count, reason)


def _gb(size: int | None) -> str:
    if size is None:
        return "?"
    return f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / MB:.0f} MB"


def local_plan(conn: psycopg.Connection, rows: int, element_bytes: int, workers: int | None) -> Plan:
    """The plan of a single PostgreSQL, from what it says about itself."""
    text = conn.execute(FACTS.format(rows=int(rows))).fetchone()[0]
    return plan("the server", parse_facts(text), element_bytes, workers)


# The shards of `images` on each node, each with a key that routes a query to that node (the
# first of a few generated paths that hashes into one of its shards).
_NODES = """
    SELECT p.nodename, p.nodeport, array_agg(s.shardid ORDER BY s.shardid),
           (array_agg(k.path ORDER BY s.shardid))[1]
    FROM pg_dist_shard s JOIN pg_dist_shard_placement p USING (shardid)
    LEFT JOIN LATERAL (SELECT 'vecsearch-build-' || g AS path FROM generate_series(0, 1000000) g
                       WHERE get_shard_id_for_distribution_column('images', 'vecsearch-build-' || g)
                             = s.shardid LIMIT 1) k ON true
    WHERE s.logicalrelid = 'images'::regclass
    GROUP BY p.nodename, p.nodeport ORDER BY p.nodename, p.nodeport"""

# The rows of each shard, counted in the caller's own transaction: a command run on a worker over
# another connection (master_run_on_worker) would wait for the locks that transaction may already
# hold on the shards (`db restore` truncates them before it rebuilds), and never get them.
_SHARD_ROWS = ("SELECT get_shard_id_for_distribution_column('images', path), count(*) "
               "FROM images GROUP BY 1")


@dataclass
class NodePlan:
    plan: Plan
    key: str  # a path routed to one of this node's shards


def cluster_plans(conn: psycopg.Connection, element_bytes: int, workers: int | None) -> list[NodePlan]:
    """Each node's plan, from what it reports about itself and the rows of its own shards."""
    nodes = conn.execute(_NODES).fetchall()
    rows = dict(conn.execute(_SHARD_ROWS).fetchall())
    # What a node says of itself reads no table, so it takes no lock the caller may hold.
    commands = [FACTS.format(rows=", ".join(str(int(rows.get(s, 0))) for s in shards) or "0")
                for _, _, shards, _ in nodes]
    answers = {(n, p): (ok, text) for n, p, ok, text in conn.execute(
        "SELECT node_name, node_port, success, result FROM master_run_on_worker(%s, %s, %s, true)",
        [[n for n, *_ in nodes], [p for _, p, *_ in nodes], commands])}
    result = []
    for name, port, _, key in nodes:
        ok, text = answers[(name, port)]
        node = f"{name}:{port}"
        if not ok:
            raise InvalidInput(f"the Citus node {node} did not say how it can build its shards' index "
                               f"({first_line(Exception(text))}): check it is up (`vecsearch db status`)")
        result.append(NodePlan(plan(node, parse_facts(text), element_bytes, workers), key))
    return result


def apply_on_shards(conn: psycopg.Connection, plans: list[NodePlan]) -> None:
    """Inside the build's transaction, before any other access to the shards: one connection per
    worker (its shards built one after another), with that worker's settings set on it."""
    conn.execute("SET LOCAL citus.multi_shard_modify_mode = 'sequential'")
    for p in plans:
        conn.execute("SELECT set_config('maintenance_work_mem', %s, true) || "
                     "set_config('max_parallel_maintenance_workers', %s, true) || count(*) "
                     "FROM images WHERE path = %s",
                     [p.plan.memory_setting, str(p.plan.workers), p.key])
