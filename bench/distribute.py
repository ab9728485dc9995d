"""`vecsearch db distribute` of a populated table against distributing first and loading after,
on a local Citus cluster (1 coordinator + 2 workers) on this machine.

    .venv/bin/python bench/distribute.py [--rows 20000] [--shards 4] [--live-index-rows 0]

Both orders end with the same rows and one HNSW index per shard. "distribute populated": the rows
COPYed into a single-node table with its index, then `citus.distribute` (the index dropped, the
rows moved, the index built on every shard at once). "distribute, then load": `citus.distribute`
of the empty table, then a bulk load's COPY (index dropped) and the build. --live-index-rows N
also times Citus moving N rows into shards that keep their HNSW index (what distribute did
before, graph built insert by insert). Needs Citus built into the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import datasets  # noqa: E402

from vecsearch import citus, cluster, db, hnsw  # noqa: E402
from vecsearch.progress import Progress  # noqa: E402


class Said(Progress):
    """Prints what distribute and the builds say (each worker's build settings and why)."""

    def message(self, text: str) -> None:
        print(f"  {text}", flush=True)


SAID = Said()

# Every table and vecsearch function of the public schema (each migration may add its own).
DROP = """
DO $$
DECLARE t text;
BEGIN
    FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
        EXECUTE format('DROP TABLE IF EXISTS public.%I CASCADE', t);
    END LOOP;
END $$;
DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT oid FROM pg_proc WHERE pronamespace = 'public'::regnamespace
             AND proname LIKE 'vecsearch\\_%' LOOP
        EXECUTE format('DROP FUNCTION %s CASCADE', f);
    END LOOP;
END $$;
"""


def fresh(url: str) -> psycopg.Connection:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(DROP)
    db.upgrade(url)
    conn = psycopg.connect(url, autocommit=True)
    db.register_vector(conn)
    return conn


def populated(url: str, rows, shards: int) -> dict:
    with fresh(url) as conn:
        definition = hnsw.drop(conn)
        common.copy_vectors(conn, rows)
        hnsw.rebuild_index(conn, definition)  # a single-node database as a bulk load leaves it
        started = time.perf_counter()
        citus.distribute(conn, shards, SAID)
        return {"total s": time.perf_counter() - started}


def then_load(url: str, rows, shards: int) -> dict:
    with fresh(url) as conn:
        started = time.perf_counter()
        citus.distribute(conn, shards, SAID)
        definition = hnsw.drop(conn)
        copy_s = common.copy_vectors(conn, rows)
        build_s = hnsw.rebuild_index(conn, definition, SAID)
        return {"total s": time.perf_counter() - started, "copy s": copy_s, "build s": build_s}


def live_index(url: str, rows, shards: int) -> dict:
    with fresh(url) as conn:
        definition = hnsw.drop(conn)
        common.copy_vectors(conn, rows)
        hnsw.rebuild_index(conn, definition)
        started = time.perf_counter()
        with conn.transaction():
            conn.execute("SET LOCAL citus.enable_unsafe_triggers = on")
            conn.execute("SELECT create_distributed_table('images', 'path', shard_count := %s)", [shards])
        return {"total s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--live-index-rows", type=int, default=0)
    args = parser.parse_args()
    missing = cluster.citus_built()
    if missing:
        raise SystemExit(missing)
    print(common.load_average(), flush=True)
    rows = datasets.make("hard", args.rows, 1).rows
    with tempfile.TemporaryDirectory(prefix="vecsearch-bench-distribute-") as tmp:
        root = Path(tmp) / "cluster"
        try:
            url = cluster.start(root, workers=2).url
            results = {}
            runs = [("distribute populated", lambda: populated(url, rows, args.shards)),
                    ("distribute, then load", lambda: then_load(url, rows, args.shards))]
            if args.live_index_rows:
                runs.append((f"old: {args.live_index_rows} rows moved into shards with live indexes",
                             lambda: live_index(url, rows[:args.live_index_rows], args.shards)))
            for name, run in runs:
                results[name] = run()
                print(name, results[name], flush=True)
        finally:
            cluster.stop(root)
    print(f"\n{args.rows:,} rows (hard distribution), {args.shards} shards on 2 workers\n")
    for name, r in results.items():
        print(f"| {name} | " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()) + " |")
    ratio = results["distribute populated"]["total s"] / results["distribute, then load"]["total s"]
    print(f"\ndistribute populated / distribute-then-load: {ratio:.2f}x")
    print(common.load_average())


if __name__ == "__main__":
    main()
