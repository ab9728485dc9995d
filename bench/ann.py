"""Recall@10 and latency of neighbour queries, side by side in one run.

    .venv/bin/python bench/ann.py [--sizes 20000,100000] [--queries 200] [--exact-queries 30]

For each size: synthetic CNN-like vectors (2048-d, non-negative with about a third of zeros,
clustered, L2-normalised, fixed seed) go into a throwaway embedded PostgreSQL (its own home
under /tmp, removed at the end; or VECSEARCH_DATABASE_URL, whose images table must be empty)
with binary COPY; the HNSW index is then built in bulk (big
maintenance_work_mem, parallel workers). Query images are drawn from the table; each query asks
the 10 nearest other images. Ground truth: exact cosine distances in numpy (float64).

Measured per query, from Python over the unix socket (no process start-up; `vecsearch similar`
as a whole process adds ~0.3 s of Python imports):
  (a) vecsearch ANN: `query.similar()` = vecsearch_similar(): HNSW candidates, exact re-rank,
      at several ef_search values;
  (b) exact scan in PostgreSQL: `query.similar(..., exact=True)`;
  (c) numpy brute force on the vectors in memory (float32 matrix-vector product + argpartition);
  (d) Annoy (angular), n_trees 10 and 100, default search_k and a larger one.
p50/p95 are over the queries (the exact scan uses fewer, --exact-queries: it is slow).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import DIM, MTIME  # noqa: E402

from vecsearch import db, query  # noqa: E402
from vecsearch.config import Settings  # noqa: E402

SEED = 20260611
K = 10
NOISE = 1.0  # per-channel noise around the cluster centres, relative to the channel scale
EF_SEARCH = (20, 40, 100, 200)
ANNOY_TREES = (10, 100)


def cnn_like(n: int, seed: int = SEED, clusters: int | None = None, chunk: int = 8192) -> np.ndarray:
    """n x 2048 float32: ReLU(cluster centre + noise), per-channel scales, L2-normalised."""
    return common.cnn_like(n, seed, clusters, NOISE, chunk)


def load(conn, vectors: np.ndarray) -> tuple[list[int], float, float]:
    """Binary COPY into an index-less table, then the HNSW build; returns ids and both times."""
    definition = common.drop_index(conn)
    t = time.perf_counter()
    with common.copy_images(conn) as copy:
        for i, v in enumerate(vectors):
            copy.write_row([f"/bench/{i:07d}.jpg", f"{i:064x}", 100_000, 1024, 768, "JPEG", MTIME, v])
    copy_s = time.perf_counter() - t
    build_s = common.build_index(conn, definition)
    ids = [r[0] for r in conn.execute("SELECT id FROM images ORDER BY path")]
    return ids, copy_s, build_s


def ground_truth(vectors: np.ndarray, queries: np.ndarray) -> list[set[int]]:
    """Row indexes of the K nearest other rows of each query row (exact, float64)."""
    truth = []
    for q in queries:
        d = 1 - vectors @ vectors[q].astype(np.float64)
        d[q] = np.inf
        truth.append(set(np.argpartition(d, K)[:K].tolist()))
    return truth


def timed(fn, items) -> tuple[list, list[float]]:
    results, times = [], []
    for item in items:
        t = time.perf_counter()
        results.append(fn(item))
        times.append(time.perf_counter() - t)
    return results, times


def row(method: str, found: list[set[int]], truth: list[set[int]], times: list[float],
        build: str = "") -> dict:
    recall = statistics.fmean(len(f & t) / K for f, t in zip(found, truth, strict=True))
    ms = sorted(1000 * t for t in times)
    return {"method": method, "recall@10": recall, "p50 ms": statistics.median(ms),
            "p95 ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))], "queries": len(times), "build": build}


def bench_size(n: int, args: argparse.Namespace, settings: Settings) -> list[dict]:
    print(f"\n== {n} vectors ==", flush=True)
    t = time.perf_counter()
    vectors = cnn_like(n)
    print(f"generated in {time.perf_counter() - t:.1f} s; zeros {np.mean(vectors == 0):.0%}", flush=True)
    rng = np.random.default_rng(SEED + 1)
    queries = rng.choice(n, size=args.queries, replace=False)
    truth = ground_truth(vectors, queries)
    results = []
    with db.connect(settings) as conn:
        conn.execute("TRUNCATE images")
        ids, copy_s, build_s = load(conn, vectors)
        index_of = {image_id: i for i, image_id in enumerate(ids)}
        size = conn.execute("SELECT pg_size_pretty(pg_relation_size('images_embedding_hnsw'))").fetchone()[0]
        print(f"COPY {n / copy_s:,.0f} rows/s; HNSW build {build_s:.1f} s, index {size}", flush=True)
        warm = [int(ids[q]) for q in rng.choice(n, size=20, replace=False)]
        for image_id in warm:  # page cache and backend caches, as a running server has them
            query.similar(conn, image_id, K)

        def vecsearch(image_id: int, **options) -> set[int]:
            return {index_of[x.id] for x in query.similar(conn, image_id, K, **options)}

        for ef in EF_SEARCH:
            found, times = timed(lambda q, ef=ef: vecsearch(int(ids[q]), ef_search=ef), queries)
            results.append(row(f"vecsearch ANN + re-rank, ef_search {ef}", found, truth, times,
                               f"HNSW {build_s:.0f} s"))
        few = queries[:args.exact_queries]
        found, times = timed(lambda q: vecsearch(int(ids[q]), exact=True), few)
        results.append(row("exact scan in PostgreSQL", found, truth[:len(few)], times))
        conn.execute("TRUNCATE images")

    def brute(q: int) -> set[int]:
        d = vectors @ vectors[q]
        d[q] = -np.inf
        return set(np.argpartition(-d, K)[:K].tolist())

    found, times = timed(brute, queries)
    results.append(row("numpy brute force (in memory)", found, truth, times))
    results.extend(bench_annoy(vectors, queries, truth))
    return results


def bench_annoy(vectors: np.ndarray, queries: np.ndarray, truth: list[set[int]]) -> list[dict]:
    from annoy import AnnoyIndex

    results = []
    for trees in ANNOY_TREES:
        index = AnnoyIndex(DIM, "angular")
        for i, v in enumerate(vectors):
            index.add_item(i, v)
        t = time.perf_counter()
        index.build(trees, n_jobs=2)
        build_s = time.perf_counter() - t
        for search_k in (-1, 20 * trees * (K + 1)):
            def nns(q: int, search_k=search_k, index=index) -> set[int]:
                return {i for i in index.get_nns_by_item(int(q), K + 1, search_k=search_k) if i != q}

            found, times = timed(nns, queries)
            label = "default" if search_k < 0 else str(search_k)
            results.append(row(f"Annoy n_trees {trees}, search_k {label}", found, truth, times,
                               f"{build_s:.0f} s"))
        index.unload()
    return results


def print_table(n: int, results: list[dict]) -> None:
    exact = next(r for r in results if r["method"].startswith("exact"))
    print(f"\n{n} vectors, {results[0]['queries']} queries (exact scan: {exact['queries']}), k = {K}")
    print("| method | recall@10 | p50 ms | p95 ms | p50 / exact p50 | build |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['recall@10']:.3f} | {r['p50 ms']:.2f} | {r['p95 ms']:.2f} "
              f"| {r['p50 ms'] / exact['p50 ms']:.1%} | {r['build']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,100000", help="comma-separated row counts")
    parser.add_argument("--queries", type=int, default=200, help="queries per method")
    parser.add_argument("--exact-queries", type=int, default=30, help="queries for the slow exact scan")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.perf_counter()
    with common.bench_database("ann") as settings:
        print(common.load_average(), flush=True)
        tables = [(n, bench_size(n, args, settings)) for n in sizes]
    for n, results in tables:
        print_table(n, results)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
