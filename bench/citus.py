"""The same workload on one PostgreSQL and on a Citus cluster (1 coordinator + 2 workers) on this
machine, side by side in one run.

    .venv/bin/python bench/citus.py [--rows 100000] [--queries 200] [--shards 4] [--clients 4]

Workload: bench/datasets.py's `hard` distribution (Zipf clusters, noise larger than the signal),
held-out queries (vectors that are not rows). For each deployment: binary COPY (index dropped,
as a bulk `vecsearch load` does), the HNSW build (per shard on Citus, in parallel on the
workers), recall@10 of `vecsearch_similar_to` against exact numpy, p50/p95 of one client, QPS
with --clients concurrent clients, and the bytes per row of table and index (the sizing model
of docs/scaling.md). Needs Citus built into the embedded PostgreSQL (`./dev citus SOURCE`).
On a 2-core machine the cluster cannot be faster: the figures show its overhead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import datasets  # noqa: E402

from vecsearch import citus, cluster, db, hnsw, query, server  # noqa: E402

K = 10


def load(url: str, rows: np.ndarray) -> dict:
    with psycopg.connect(url, autocommit=True) as conn:
        db.register_vector(conn)
        definition = hnsw.drop(conn)
        copy_s = common.copy_vectors(conn, rows)
        build_s = hnsw.rebuild_index(conn, definition)
        conn.execute("ANALYZE images")
        distributed = citus.is_distributed(conn)
        size = "citus_total_relation_size" if distributed else "pg_total_relation_size"
        table = conn.execute(f"SELECT {size}('images')").fetchone()[0]
        if distributed:
            graph = citus.hnsw_bytes(conn)
        else:
            graph = conn.execute("SELECT pg_relation_size('images_embedding_hnsw')").fetchone()[0]
        ids = [r[0] for r in conn.execute("SELECT id FROM images ORDER BY path")]
    n = len(rows)
    return {"copy rows/s": n / copy_s, "build s": build_s, "table B/row": (table - graph) / n,
            "hnsw B/row": graph / n, "ids": ids}


def latency(url: str, queries: np.ndarray, ids: list[int], truth: np.ndarray, ef: int) -> dict:
    index_of = {image_id: i for i, image_id in enumerate(ids)}
    found, times = [], []
    with psycopg.connect(url, autocommit=True) as conn:
        db.register_vector(conn)
        for q in queries[:10]:
            query.similar_to(conn, q, K, ef_search=ef)  # warm
        for q in queries:
            t = time.perf_counter()
            found.append([index_of[x.id] for x in query.similar_to(conn, q, K, ef_search=ef)])
            times.append(time.perf_counter() - t)
    ms = sorted(1000 * t for t in times)
    recall = statistics.fmean(len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True))
    return {"recall@10": recall, "p50 ms": statistics.median(ms), "p95 ms": ms[int(0.95 * len(ms))]}


def qps(url: str, queries: np.ndarray, clients: int, ef: int, seconds: float = 15) -> float:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def client(c: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            db.register_vector(conn)
            i = c
            while time.monotonic() < stop:
                query.similar_to(conn, queries[i % len(queries)], K, ef_search=ef)
                done[c] += 1
                i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


def run(name: str, url: str, data: datasets.Dataset, truth: np.ndarray, args) -> dict:
    print(f"\n== {name} ==", flush=True)
    result = load(url, data.rows)
    print(f"  COPY {result['copy rows/s']:,.0f} rows/s, HNSW build {result['build s']:.0f} s", flush=True)
    for ef in args.ef_search:
        result[ef] = latency(url, data.held_out, result["ids"], truth, ef)
        print(f"  ef_search {ef}: {result[ef]}", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        db.register_vector(conn)
        exact = []
        for q in data.held_out[:20]:
            t = time.perf_counter()
            query.similar_to(conn, q, K, exact=True)
            exact.append(time.perf_counter() - t)
        result["exact p50 ms"] = 1000 * statistics.median(exact)
    result["qps"] = qps(url, data.held_out, args.clients, args.ef_search[-1])
    print(f"  exact p50 {result['exact p50 ms']:.0f} ms; QPS with {args.clients} clients {result['qps']:.1f}",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--ef-search", default="40,200", help="comma-separated")
    args = parser.parse_args()
    args.ef_search = [int(e) for e in args.ef_search.split(",")]
    missing = cluster.citus_built()
    if missing:
        raise SystemExit(missing)
    print(common.load_average(), flush=True)
    data = datasets.make("hard", args.rows, args.queries)
    truth = np.argsort(-(data.held_out.astype(np.float64) @ data.rows.T.astype(np.float64)), axis=1)[:, :K]
    results = {}
    with tempfile.TemporaryDirectory(prefix="vecsearch-bench-citus-") as tmp:
        root = Path(tmp)
        try:
            single = server.ensure_running(root / "single")
            db.upgrade(single.url())
            results["single node"] = run("single node", single.url(), data, truth, args)
            server.stop(root / "single")
            nodes = cluster.start(root / "cluster", workers=2)
            db.upgrade(nodes.url)
            with psycopg.connect(nodes.url, autocommit=True) as conn:
                print(citus.distribute(conn, args.shards), flush=True)
            results[f"Citus, 2 workers, {args.shards} shards"] = run("citus", nodes.url, data, truth, args)
        finally:
            server.stop(root / "single")
            cluster.stop(root / "cluster")
    print(f"\n{args.rows:,} rows (hard distribution), {args.queries} held-out queries, k = {K}\n")
    names = list(results)
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    rows = [("COPY rows/s", lambda r: f"{r['copy rows/s']:,.0f}"),
            ("HNSW build s", lambda r: f"{r['build s']:.0f}"),
            ("table bytes/row", lambda r: f"{r['table B/row']:,.0f}"),
            ("HNSW bytes/row", lambda r: f"{r['hnsw B/row']:,.0f}")]
    for ef in args.ef_search:
        rows += [(f"recall@10, ef_search {ef}", lambda r, ef=ef: f"{r[ef]['recall@10']:.3f}"),
                 (f"p50 / p95 ms, ef_search {ef}",
                  lambda r, ef=ef: f"{r[ef]['p50 ms']:.1f} / {r[ef]['p95 ms']:.1f}")]
    rows += [("exact scan p50 ms", lambda r: f"{r['exact p50 ms']:.0f}"),
             (f"QPS, {args.clients} clients, ef_search {args.ef_search[-1]}", lambda r: f"{r['qps']:.1f}")]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(results[n]) for n in names) + " |")
    print(f"\n{common.load_average()}")


if __name__ == "__main__":
    main()
