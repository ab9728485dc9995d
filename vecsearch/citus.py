"""vecsearch on a Citus cluster: distributing its tables and describing the cluster.

`images` is hash-distributed by `path` (its primary key since migration 0004): each shard has
its own HNSW graph, a neighbour query runs on every shard and the coordinator merges the top k.
`embedding_model` (one row) is a reference table, copied to every node. `alembic_version` stays
on the coordinator, where the migrations run.
"""

from __future__ import annotations

import psycopg

from .errors import InvalidInput

SHARDS_PER_WORKER = 2  # the default: parallel across workers, and room to rebalance onto new ones


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


def distribute(conn: psycopg.Connection, shards: int | None = None) -> str:
    """Make `images` distributed (by path, `shards` shards) and `embedding_model` a reference
    table; idempotent (a different `shards` on a distributed table is refused). What was done."""
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
    if not conn.execute("SELECT EXISTS (SELECT FROM pg_dist_partition "
                        "WHERE logicalrelid = 'embedding_model'::regclass)").fetchone()[0]:
        conn.execute("SELECT create_reference_table('embedding_model')")
        done.append("embedding_model is a reference table")
    if is_distributed(conn):
        current = shard_count(conn)
        if shards is not None and shards != current:
            # alter_distributed_table refuses a table with an identity column (images.id).
            raise InvalidInput(f"images already has {current} shards; Citus cannot re-shard a table with an "
                               f"identity column: `vecsearch db backup F`, drop the tables, `vecsearch db "
                               f"distribute --shards {shards}`, `vecsearch db restore F`")
    else:
        count = shards or SHARDS_PER_WORKER * workers
        rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
        # Existing rows are copied into the shards and each shard's HNSW index is built there.
        conn.execute("SELECT create_distributed_table('images', 'path', shard_count := %s)", [count])
        if rows:
            conn.execute("SELECT truncate_local_data_after_distributing_table('images')")
        done.append(f"images distributed by path over {count} shards on {workers} workers "
                    f"({rows} rows moved)")
    return "; ".join(done) or (f"already distributed: images has {shard_count(conn)} shards on "
                               f"{workers} workers")


# Bytes of each shard's HNSW index: (shardid, result) rows, measured on the workers.
_SHARD_HNSW_BYTES = """
    SELECT shardid, result::bigint AS b FROM run_command_on_shards('images', $$
        SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0) FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
        WHERE i.indrelid = '%s'::regclass AND a.amname = 'hnsw'$$)"""


def hnsw_bytes(conn: psycopg.Connection) -> int:
    """Bytes of the HNSW indexes of all shards of `images`."""
    return conn.execute(f"SELECT coalesce(sum(b), 0) FROM ({_SHARD_HNSW_BYTES}) s").fetchone()[0]


def status(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """The cluster lines of `vecsearch db status` (none on a plain PostgreSQL); a label that
    db.status also has replaces its line."""
    if not has_citus(conn):
        return []
    version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'").fetchone()[0]
    if not is_distributed(conn):
        return [("citus", f"{version}, images not distributed (run `vecsearch db distribute`)")]
    total, hnsw = conn.execute("""
        SELECT pg_size_pretty(citus_total_relation_size('images')),
               pg_size_pretty(sum(citus_relation_size(c.oid))) FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
        WHERE i.indrelid = 'images'::regclass AND a.amname = 'hnsw'""").fetchone()
    lines = [("table", f"{total} on the workers"),
             ("hnsw", "none" if hnsw is None else f"{hnsw} on the workers"),
             ("citus", f"{version}, images distributed by path over {shard_count(conn)} shards")]
    per_node = conn.execute(f"""
        WITH shards AS (
            SELECT s.shardid, p.nodename, p.nodeport
            FROM pg_dist_shard s JOIN pg_dist_shard_placement p USING (shardid)
            WHERE s.logicalrelid = 'images'::regclass),
        counts AS (
            SELECT shardid, result::bigint AS n
            FROM run_command_on_shards('images', 'SELECT count(*) FROM %s')),
        sizes AS ({_SHARD_HNSW_BYTES})
        SELECT format('%s:%s', nodename, nodeport), count(*), sum(n), pg_size_pretty(sum(b))
        FROM shards JOIN counts USING (shardid) JOIN sizes USING (shardid)
        GROUP BY nodename, nodeport ORDER BY 1
    """).fetchall()
    for node, shards, rows, size in per_node:
        lines.append(("worker", f"{node}: {shards} shards, {rows} images, hnsw {size}"))
    return lines
