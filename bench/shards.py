"""The per-query cost of many shards: the same rows on 2, 4, 8, 16 shards of a local Citus cluster
(1 coordinator + 2 workers on this machine), for the cost model of docs/scaling.md.

    .venv/bin/python bench/shards.py [--rows 20000] [--queries 100] [--shards 2,4,8,16] [--ef-search 200]

For each shard count, on a fresh database: distribute, binary COPY, the per-shard build (each
worker's settings printed), then over the same held-out queries (bench/datasets.py `hard`):

- end to end: p50/p95 of `vecsearch_similar_to` (k 10) through the coordinator, recall@10
  against exact numpy;
- on one shard, through a direct connection to its worker, the server-side time of EXPLAIN
  ANALYZE of the query each shard runs: the graph search alone (`SELECT id ... ORDER BY
  embedding::halfvec(2048) <=> q LIMIT n`), the whole shard query (with each candidate's exact
  distance: the re-rank read of its 8 KB vector), and the re-rank reads alone (the n candidates
  fetched by id and their exact distances computed), n = max(k + 10, 2k) = 20, ef_search as given.

The model fitted (least squares) is p50(S) = a + b S; the per-shard figures say what b is made of.
Needs Citus built into the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import datasets  # noqa: E402
from distribute import SAID, fresh  # noqa: E402

from vecsearch import citus, cluster, db, hnsw, query  # noqa: E402

K = 10
CANDIDATES = max(K + 10, 2 * K)


def server_ms(conn: psycopg.Connection, sql: str, params) -> float:
    plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()[0]
    return (plan[0] if isinstance(plan, list) else json.loads(plan)[0])["Execution Time"]


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def one(url: str, data: datasets.Dataset, shards: int, ef: int, truth: np.ndarray) -> dict:
    with fresh(url) as conn:
        citus.distribute(conn, shards, SAID)
        definition = hnsw.drop(conn)
        copy_s = common.copy_vectors(conn, data.rows)
        build_s = hnsw.rebuild_index(conn, definition, SAID)
        conn.execute("VACUUM ANALYZE images")
        index_of = {image_id: i for i, image_id in
                    enumerate(r[0] for r in conn.execute("SELECT id FROM images ORDER BY path"))}
        for q in data.held_out[:5]:  # warm the caches and connections
            query.similar_to(conn, q, K, ef_search=ef)
        times, found = [], []
        for q in data.held_out:
            started = time.perf_counter()
            got = query.similar_to(conn, q, K, ef_search=ef)
            times.append((time.perf_counter() - started) * 1000)
            found.append([index_of[x.id] for x in got])
        recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))
        shard, host, port = conn.execute("""
            SELECT shard_name('images'::regclass, s.shardid), p.nodename, p.nodeport
            FROM pg_dist_shard s JOIN pg_dist_shard_placement p USING (shardid)
            WHERE s.logicalrelid = 'images'::regclass ORDER BY s.shardid LIMIT 1""").fetchone()
        shard_rows = conn.execute("SELECT result::bigint FROM run_command_on_shards('images', "
                                  "'SELECT count(*) FROM %s') ORDER BY shardid LIMIT 1").fetchone()[0]
    graph, whole, reads = [], [], []
    with psycopg.connect(f"host={host} port={port} dbname=vecsearch user=postgres", autocommit=True) as w:
        db.register_vector(w)
        w.execute(f"SET hnsw.ef_search = {max(ef, CANDIDATES)}")
        # As the neighbour function does: on a few thousand rows the planner would pick an exact
        # scan over the HNSW index.
        w.execute("SET enable_seqscan = off")
        for q in data.held_out:
            search = (f"SELECT i.id FROM {shard} i ORDER BY i.embedding::halfvec(2048) <=> %s::halfvec(2048) "
                      f"LIMIT {CANDIDATES}")
            graph.append(server_ms(w, search, [q]))
            whole.append(server_ms(w, f"SELECT i.id, i.path, i.embedding <=> %s::vector AS distance "
                                      f"FROM {shard} i ORDER BY i.embedding::halfvec(2048) <=> "
                                      f"%s::halfvec(2048) LIMIT {CANDIDATES}", [q, q]))
            ids = [r[0] for r in w.execute(search, [q])]
            reads.append(server_ms(w, f"SELECT i.embedding <=> %s::vector FROM {shard} i "
                                      "WHERE i.id = ANY(%s)", [q, ids]))
    return {"shards": shards, "shard rows": shard_rows, "copy s": copy_s, "build s": build_s,
            "recall@10": recall, "p50 ms": p(times, 50), "p95 ms": p(times, 95),
            "shard graph ms": statistics.median(graph), "shard query ms": statistics.median(whole),
            "shard re-rank reads ms": statistics.median(reads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--shards", default="2,4,8,16")
    parser.add_argument("--ef-search", type=int, default=200)
    args = parser.parse_args()
    missing = cluster.citus_built()
    if missing:
        raise SystemExit(missing)
    counts = [int(s) for s in args.shards.split(",")]
    print(common.load_average(), flush=True)
    data = datasets.make("hard", args.rows, args.queries)
    sims = data.held_out @ data.rows.T
    truth = np.argsort(-sims, axis=1)[:, :K]
    results = []
    with tempfile.TemporaryDirectory(prefix="vecsearch-bench-shards-") as tmp:
        root = Path(tmp) / "cluster"
        try:
            url = cluster.start(root, workers=2).url
            for shards in counts:
                r = one(url, data, shards, args.ef_search, truth)
                results.append(r)
                print(r, common.load_average(), flush=True)
        finally:
            cluster.stop(root)
    print(f"\n{args.rows:,} rows (hard), {args.queries} held-out queries, k {K}, ef_search {args.ef_search}, "
          "2 workers\n")
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) and v < 10 else
                                f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    s = np.array([r["shards"] for r in results], dtype=float)
    for key in ("p50 ms", "shard graph ms", "shard query ms", "shard re-rank reads ms"):
        b, a = np.polyfit(s, [r[key] for r in results], 1)
        print(f"{key} = {a:.2f} + {b:.2f} x shards")
    print(common.load_average())


if __name__ == "__main__":
    main()
