"""vecsearch on a Citus cluster: distributing its tables and describing the cluster.

`images` is hash-distributed by `path` (its primary key since migration 0004): each shard has
its own HNSW graph, a neighbour query runs on every shard and the coordinator merges the top k.
`embedding_model` (one row) is a reference table, copied to every node. `alembic_version` stays
on the coordinator, where the migrations run.
"""

from __future__ import annotations

import time

import psycopg

from . import hnsw, sessions

# Defined with the build sizing (which hnsw needs them for), used here as Citus facts.
from .buildsize import has_citus, is_distributed, shard_count  # noqa: F401
from .errors import DatabaseBusy, InvalidInput, first_line
from .progress import Progress

# Small tables every node reads (the model record, the compact index's projection, duplicate
# decisions), where they exist.
REFERENCE_TABLES = ("embedding_model", "vecsearch_projection", "vecsearch_dupe_decisions")
SHARDS_PER_WORKER = 2  # the default: parallel across workers, and room to rebalance onto new ones


def distribute(conn: psycopg.Connection, shards: int | None = None, report: Progress | None = None) -> str:
    """Make `images` distributed (by path, `shards` shards) and REFERENCE_TABLES reference
    tables; idempotent (a different `shards` on a distributed table is refused). What was done.

    Rows already there move without their HNSW index (Citus would otherwise build each shard's
    graph insert by insert, ~5x slower), which is then built on every shard at once, as a bulk
    load does: dropped with its definition left in the table's comment (hnsw.drop_marked), so a
    killed distribute is finished by the next one, or by the next load."""
    report = report or Progress()
    if not has_citus(conn):
        raise InvalidInput("this database has no Citus extension: `vecsearch db distribute` needs a Citus "
                           "coordinator (CREATE EXTENSION citus; see docs/scaling.md)")
    if shards is not None and not 1 <= shards <= 64000:
        raise InvalidInput(f"--shards must be from 1 to 64000, not {shards}")
    workers = conn.execute("SELECT count(*) FROM citus_get_active_worker_nodes()").fetchone()[0]
    if workers == 0:
        raise InvalidInput("the Citus coordinator has no active workers: add them first "
                           "(SELECT citus_add_node('HOST', PORT); see docs/scaling.md)")
    done = []
    for table in REFERENCE_TABLES:
        if conn.execute("SELECT to_regclass(%s) IS NOT NULL AND NOT EXISTS (SELECT FROM pg_dist_partition "
                        "WHERE logicalrelid = to_regclass(%s))", [table, table]).fetchone()[0]:
            conn.execute("SELECT create_reference_table(%s)", [table])
            done.append(f"{table} is a reference table")
    if is_distributed(conn):
        current = shard_count(conn)
        if shards is not None and shards != current:
            # alter_distributed_table refuses a table with an identity column (images.id).
            raise InvalidInput(f"images already has {current} shards; Citus cannot re-shard a table with an "
                               f"identity column: `vecsearch db backup F`, drop the tables, `vecsearch db "
                               f"distribute --shards {shards}`, `vecsearch db restore F`")
    owed = _index_owed(conn, report)
    try:
        if not is_distributed(conn):
            count = shards or SHARDS_PER_WORKER * workers
            rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
            present = hnsw.hnsw_index(conn) if rows else None
            if present is not None:
                if not sessions.try_lock(conn, hnsw.LOCK_KEY):
                    raise DatabaseBusy(f"the HNSW index is being rebuilt or loaded into by "
                                       f"{sessions.describe_holders(conn, hnsw.LOCK_KEY)}: distribute "
                                       "when that has finished")
                owed = hnsw.drop_marked(conn, *present)
                report.message(f"{rows} rows: HNSW index dropped, rows moved without it, then built on "
                               "every shard at once")
            started = time.monotonic()
            with conn.transaction():
                # Citus copies a table's triggers to its shards only when told to; images' own
                # (migration 0006) reads no other table, so it is safe on a shard.
                conn.execute("SET LOCAL citus.enable_unsafe_triggers = on")
                conn.execute("SELECT create_distributed_table('images', 'path', shard_count := %s)", [count])
            if rows:
                conn.execute("SELECT truncate_local_data_after_distributing_table('images')")
                report.message(f"{rows} rows moved into {count} shards in {time.monotonic() - started:.1f} s")
            done.append(f"images distributed by path over {count} shards on {workers} workers "
                        f"({rows} rows moved)")
        if owed is not None:
            hnsw.rebuild_index(conn, owed, report)
            done.append("HNSW index built on every shard")
    finally:
        if owed is not None:
            conn.execute(f"SELECT pg_advisory_unlock({hnsw.LOCK_KEY})")
    return "; ".join(done) or (f"already distributed: images has {shard_count(conn)} shards on "
                               f"{workers} workers")


def _index_owed(conn: psycopg.Connection, report: Progress) -> str | None:
    """The definition of an HNSW index that a killed distribute (or load) dropped and left in the
    table's comment, with its lock now held by this session to rebuild it; else None."""
    if hnsw.hnsw_index(conn) is not None:
        return None
    stored = hnsw.dropped_definition(conn)
    if stored is None or not sessions.try_lock(conn, hnsw.LOCK_KEY):
        return None
    report.message("the HNSW index is missing (an earlier distribute or load was interrupted): "
                   "it is built at the end")
    return stored[0]


# Bytes of each shard's HNSW index: (shardid, result) rows, measured on the workers.
_SHARD_HNSW_BYTES = f"""
    SELECT shardid, result::bigint AS b FROM run_command_on_shards('images', $$
        {hnsw.bytes_sql("ARRAY['%s'::regclass]")}$$)"""


def hnsw_bytes(conn: psycopg.Connection) -> int:
    """Bytes of the HNSW indexes of all shards of `images`."""
    return conn.execute(f"SELECT coalesce(sum(b), 0) FROM ({_SHARD_HNSW_BYTES}) s").fetchone()[0]


def status(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """The cluster lines of `vecsearch db status` (none on a plain PostgreSQL); a label that
    db.status also has replaces its line. Every node gets a line, up or down: the counts come
    from the nodes that answer, and say so when some did not."""
    if not has_citus(conn):
        return []
    version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'").fetchone()[0]
    if not is_distributed(conn):
        return [("citus", f"{version}, images not distributed (run `vecsearch db distribute`)")]
    nodes = conn.execute("""
        SELECT nodename, nodeport, groupid = 0, citus_check_connection_to_node(nodename, nodeport)
        FROM pg_dist_node WHERE noderole = 'primary' ORDER BY groupid, nodename, nodeport""").fetchall()
    placements: dict[tuple[str, int], list[str]] = {}
    for name, port, shard in conn.execute("""
            SELECT p.nodename, p.nodeport, shard_name('images'::regclass, s.shardid)
            FROM pg_dist_shard s JOIN pg_dist_shard_placement p USING (shardid)
            WHERE s.logicalrelid = 'images'::regclass ORDER BY s.shardid"""):
        placements.setdefault((name, port), []).append(shard)
    measured = _measure_nodes(conn, [(n, p, placements.get((n, p), [])) for n, p, _, up in nodes if up])
    down = sum(len(placements.get((n, p), [])) for n, p, _, up in nodes
               if not up or isinstance(measured[(n, p)], str))
    missing = f" (not counting {down} shards on nodes that did not answer)" if down else ""
    counted = [m for m in measured.values() if not isinstance(m, str)]
    rows, table, hnsw = (sum(column) for column in zip((0, 0, 0), *counted, strict=True))
    lines = [("images", f"{rows}{missing}"),
             ("table", f"{_pretty(table)} on the workers{missing}"),
             ("hnsw", f"{_pretty(hnsw) + ' on the workers' if hnsw else 'none'}{missing}"),
             ("citus", f"{version}, images distributed by path over {shard_count(conn)} shards")]
    for name, port, is_coordinator, up in nodes:
        shards = len(placements.get((name, port), []))
        if not up:
            state = f"DOWN (cannot connect), {shards} shards unavailable"
        elif not shards:
            state = "up, no shards"
        elif isinstance(measured[(name, port)], str):
            state = f"up, {shards} shards, not counted ({measured[(name, port)]})"
        else:
            rows, table, hnsw = measured[(name, port)]
            state = f"up, {shards} shards, {rows} images, table {_pretty(table)}, hnsw {_pretty(hnsw)}"
        lines.append(("coordinator" if is_coordinator else "worker", f"{name}:{port}: {state}"))
    return lines


def _measure_nodes(conn: psycopg.Connection, nodes: list[tuple[str, int, list[str]]]
                   ) -> dict[tuple[str, int], tuple[int, int, int] | str]:
    """(rows, table bytes, HNSW bytes) of the `images` shards on each node, or the error that
    node gave; one command per node, all at once (master_run_on_worker reports a failed node as
    a row rather than an error)."""
    commands = []
    for _, _, shards in nodes:
        names = ", ".join(_literal(s) for s in shards) or "NULL"
        rows = " + ".join(f"(SELECT count(*) FROM {s})" for s in shards) or "0"
        commands.append(f"""SELECT concat_ws(' ', {rows},
            (SELECT coalesce(sum(pg_total_relation_size(r)), 0) FROM unnest(ARRAY[{names}]::regclass[]) r),
            ({hnsw.bytes_sql(f"ARRAY[{names}]::regclass[]")}))""")
    if not nodes:
        return {}
    result = {}
    for name, port, ok, text in conn.execute(
            "SELECT node_name, node_port, success, result FROM master_run_on_worker(%s, %s, %s, true)",
            [[n for n, _, _ in nodes], [p for _, p, _ in nodes], commands]):
        result[(name, port)] = tuple(int(x) for x in text.split()) if ok else first_line(Exception(text))
    return result


def _literal(name: str) -> str:
    return "'" + name.replace("'", "''") + "'"


def _pretty(size: int) -> str:
    """pg_size_pretty's units (kB, MB, GB: powers of 1024), without a round trip."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 10 * 1024:
            return f"{size} {unit}"
        size = round(size / 1024)
    return f"{size} TB"
