"""Recall@10, latency, build time and size of neighbour search, side by side in one run.

    .venv/bin/python bench/ann.py [--sizes 20000,100000] [--data easy,hard,real]
        [--configs 16x64,32x128,32x200] [--ef-search 40,100,200,400] [--queries 200]

Three distributions (bench/datasets.py: today's easy generator, a hard one, test-model
embeddings of real photos), each with two kinds of query: by id (a row: its 10 nearest other
rows) and held out (vectors that are not rows, as `vecsearch search FILE` sends: fresh draws
and near-copies). Ground truth: exact cosine in numpy, float64.

Rows of each table, all on the same vectors and queries:
  - vecsearch ANN (`query.similar` / `query.similar_to`: vecsearch_similar*(), HNSW candidates
    then the exact re-rank) for each index config (m x ef_construction) at several ef_search;
  - the exact scan in PostgreSQL (`exact=True`), on --exact-queries queries (it is slow);
  - numpy brute force on the matrix in memory;
  - FAISS IndexHNSWFlat with the same m / ef_construction / ef_search (in RAM, float32);
  - Annoy (angular), 100 trees, default search_k and 10 x that.
Latency is per query, one at a time from Python (no process start-up). Build times use every
core (pgvector's parallel build; FAISS's OpenMP; Annoy's n_jobs); for the first distribution the
first config is also built with no parallel workers, the "before" of the build-speed figure.
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
import datasets  # noqa: E402
from common import DIM  # noqa: E402

from vecsearch import db, hnsw, query  # noqa: E402
from vecsearch.config import Settings  # noqa: E402

K = 10


def truth_of(rows: np.ndarray, queries: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """Row indexes of the K nearest rows to each query (its own row excluded for id queries)."""
    out = np.empty((len(queries), K), dtype=np.int64)
    block = 65536  # rows at a time in float64: a 1M-row table would need 16 GB at once
    for start in range(0, len(queries), 256):
        q = queries[start:start + 256].astype(np.float64)
        best_d = np.full((len(q), K), np.inf)
        best_i = np.zeros((len(q), K), dtype=np.int64)
        for first in range(0, len(rows), block):
            d = -(q @ rows[first:first + block].T.astype(np.float64))
            if exclude is not None:
                mine = exclude[start:start + 256] - first
                inside = (mine >= 0) & (mine < d.shape[1])
                d[np.flatnonzero(inside), mine[inside]] = np.inf
            all_d = np.hstack([best_d, d])
            all_i = np.hstack([best_i, np.broadcast_to(np.arange(first, first + d.shape[1]), d.shape)])
            top = np.argsort(all_d, axis=1, kind="stable")[:, :K]
            best_d, best_i = np.take_along_axis(all_d, top, 1), np.take_along_axis(all_i, top, 1)
        out[start:start + len(q)] = best_i
    return out


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return statistics.fmean(len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True))


class Run:
    """One distribution at one size: its queries, ground truth and result rows."""

    def __init__(self, data: datasets.Dataset, queries: int, exact_queries: int) -> None:
        self.data, self.n = data, len(data.rows)
        rng = np.random.default_rng(datasets.SEED + 7)
        self.by_id = rng.choice(self.n, size=queries, replace=False)
        self.held = data.held_out[:queries]
        self.exact_queries = exact_queries
        t = time.perf_counter()
        self.truth_id = truth_of(data.rows, data.rows[self.by_id], self.by_id)
        self.truth_held = truth_of(data.rows, self.held, None)
        print(f"  ground truth in {time.perf_counter() - t:.0f} s", flush=True)
        self.results: list[dict] = []

    def measure(self, method: str, params: str, by_id, held, few: int | None = None,
                build: float | None = None, size_mb: float | None = None,
                per_row: float | None = None) -> dict:
        """by_id(row index) / held(vector) -> row indexes; timed one query at a time."""
        count = few or len(self.by_id)
        found_id, found_held, times = [], [], []
        for q in self.by_id[:count]:
            t = time.perf_counter()
            found_id.append(by_id(int(q)))
            times.append(time.perf_counter() - t)
        for v in self.held[:count]:
            t = time.perf_counter()
            found_held.append(held(v))
            times.append(time.perf_counter() - t)
        ms = sorted(1000 * t for t in times)
        result = {"method": method, "params": params,
                  "recall id": recall(found_id, self.truth_id[:count]),
                  "recall held": recall(found_held, self.truth_held[:count]),
                  "p50": statistics.median(ms), "p95": ms[min(len(ms) - 1, int(0.95 * len(ms)))],
                  "queries": len(times), "build": build, "size": size_mb, "per_row": per_row}
        self.results.append(result)
        print(f"  {method} {params}: recall id {result['recall id']:.3f} held {result['recall held']:.3f}"
              f" p50 {result['p50']:.1f} ms", flush=True)
        return result


def bench_postgres(run: Run, settings: Settings, configs: list[tuple[int, int]],
                   ef_searches: list[int], serial: bool, compact_dims: list[str] = (),
                   compact_config: tuple[int, int] = (32, 128)) -> None:
    rows = run.data.rows
    with db.connect(settings) as conn:
        conn.execute("TRUNCATE images")
        definition = hnsw.drop(conn) or hnsw.dropped_definition(conn)[0]
        head = definition.partition(" WITH (")[0]
        print(f"  COPY {len(rows) / common.copy_vectors(conn, rows):,.0f} rows/s", flush=True)
        conn.execute("VACUUM ANALYZE images")
        ids = np.array([r[0] for r in conn.execute("SELECT id FROM images ORDER BY path")])
        index_of = {int(image_id): i for i, image_id in enumerate(ids)}

        def by_id(**options):
            return lambda q: [index_of[x.id] for x in query.similar(conn, int(ids[q]), K, **options)]

        def held(**options):
            return lambda v: [index_of[x.id] for x in query.similar_to(conn, v, K, **options)]

        for number, (m, efc) in enumerate(configs):
            hnsw.drop(conn)
            new = f"{head} WITH (m = {m}, ef_construction = {efc})"
            if number == 0 and serial:
                seconds = hnsw.rebuild_index(conn, new, workers=0)
                run.results.append({"method": "pgvector HNSW build, no parallel workers",
                                    "params": f"m {m}, ef_c {efc}", "build": seconds})
                print(f"  build m {m} ef_c {efc} without workers: {seconds:.0f} s", flush=True)
                hnsw.drop(conn)
            build = hnsw.rebuild_index(conn, new)
            size = conn.execute("SELECT pg_relation_size('images_embedding_hnsw')").fetchone()[0]
            for image_id in ids[:20]:  # caches warm, as on a running server
                query.similar(conn, int(image_id), K)
            for ef in ef_searches:
                run.measure("vecsearch ANN + re-rank", f"m {m}, ef_c {efc}, ef_search {ef}",
                            by_id(ef_search=ef), held(ef_search=ef), build=build, size_mb=size / 2**20,
                            per_row=size / len(rows))
        m, efc = compact_config
        for dims in compact_dims:  # the compact index: fitted on these rows by `db reindex --dims`
            done = hnsw.reindex(conn, m, efc, dims=dims)
            if dims == "auto":
                print(f"  auto: {done.reason}", flush=True)
            name = "images_reduced_hnsw" if done.dims else "images_embedding_hnsw"
            size = conn.execute("SELECT pg_relation_size(%s)", [name]).fetchone()[0]
            conn.execute("VACUUM ANALYZE images")
            for image_id in ids[:20]:
                query.similar(conn, int(image_id), K)
            label = f"{dims} -> {done.dims or 'full'} dims" if dims == "auto" else f"{dims} dims"
            efs = [done.ef_search] if done.ef_search else ef_searches
            for ef in efs:
                run.measure("vecsearch compact + re-rank", f"{label}, m {m}, ef_c {efc}, ef_search {ef}",
                            by_id(ef_search=ef), held(ef_search=ef), build=done.seconds,
                            size_mb=size / 2**20, per_row=size / len(rows))
        run.measure("exact scan in PostgreSQL", "", by_id(exact=True), held(exact=True),
                    few=run.exact_queries)
        conn.execute("TRUNCATE images")
        hnsw.reindex(conn, dims="full")


def bench_numpy(run: Run) -> None:
    rows = run.data.rows

    def by_id(q: int) -> list[int]:
        d = rows @ rows[q]
        d[q] = -np.inf
        top = np.argpartition(-d, K)[:K]
        return top[np.argsort(-d[top])].tolist()

    def held(v: np.ndarray) -> list[int]:
        d = rows @ v
        top = np.argpartition(-d, K)[:K]
        return top[np.argsort(-d[top])].tolist()

    run.measure("numpy brute force (in memory)", "", by_id, held)


def bench_faiss(run: Run, configs: list[tuple[int, int]], ef_searches: list[int]) -> None:
    import faiss

    rows = run.data.rows
    for m, efc in configs:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        idx = faiss.IndexHNSWFlat(DIM, m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = efc
        t = time.perf_counter()
        idx.add(rows)
        build = time.perf_counter() - t
        faiss.omp_set_num_threads(1)  # one query at a time, as the other rows
        for ef in ef_searches:
            idx.hnsw.efSearch = ef

            def by_id(q: int, idx=idx) -> list[int]:
                _, found = idx.search(rows[q:q + 1], K + 1)
                return [int(i) for i in found[0] if i != q][:K]

            def held(v: np.ndarray, idx=idx) -> list[int]:
                return idx.search(v[None, :], K)[1][0].tolist()

            run.measure("FAISS IndexHNSWFlat", f"m {m}, ef_c {efc}, ef_search {ef}", by_id, held,
                        build=build, size_mb=rows.nbytes / 2**20 + len(rows) * m * 2 * 4 / 2**20)


def bench_faiss_pca(run: Run, dims: list[int], m: int, efc: int, ef_searches: list[int]) -> None:
    """FAISS with the same reduction: PCA to d dims, HNSW over it, the exact re-rank of its
    ef_search candidates, as vecsearch's compact index does (in numpy, on the rows already in
    memory: IndexRefineFlat would hold a second copy of them, 8 GB at a million rows)."""
    import faiss

    rows = run.data.rows
    for d in dims:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        idx = faiss.index_factory(DIM, f"PCA{d},HNSW{m}")
        faiss.downcast_index(idx.index).hnsw.efConstruction = efc
        t = time.perf_counter()
        idx.train(rows[np.random.default_rng(0).choice(len(rows), min(20000, len(rows)), replace=False)])
        idx.add(rows)
        build = time.perf_counter() - t
        faiss.omp_set_num_threads(1)  # one query at a time, as the other rows
        for ef in ef_searches:
            faiss.downcast_index(idx.index).hnsw.efSearch = ef

            def nearest(v: np.ndarray, skip: int = -1, idx=idx, ef=ef) -> list[int]:
                found = idx.search(v[None, :], ef)[1][0]
                found = found[(found >= 0) & (found != skip)]
                return found[np.argsort(-(rows[found] @ v))][:K].tolist()

            run.measure("FAISS PCA + HNSW + re-rank", f"PCA{d},HNSW{m} ef_c {efc}, ef_search {ef}",
                        lambda q, f=nearest: f(rows[q], q), nearest, build=build)
        del idx


def bench_annoy(run: Run, trees: int = 100) -> None:
    from annoy import AnnoyIndex

    rows = run.data.rows
    idx = AnnoyIndex(DIM, "angular")
    for i, v in enumerate(rows):
        idx.add_item(i, v)
    t = time.perf_counter()
    idx.build(trees, n_jobs=os.cpu_count() or 1)
    build = time.perf_counter() - t
    for search_k in (trees * K, 10 * trees * K):
        run.measure("Annoy", f"{trees} trees, search_k {search_k}",
                    lambda q, s=search_k: [i for i in idx.get_nns_by_item(q, K + 1, search_k=s)
                                           if i != q][:K],
                    lambda v, s=search_k: idx.get_nns_by_vector(v, K, search_k=s), build=build)
    idx.unload()


def print_table(name: str, n: int, run: Run) -> None:
    exact = next(r for r in run.results if r["method"].startswith("exact"))
    queries = run.results[-1]["queries"]
    print(f"\n### {name}, {n:,} rows: {queries // 2} queries by id + {queries // 2} held out, "
          f"k = {K} (exact scan: {exact['queries']} queries)\n")
    numpy_p50 = next((r["p50"] for r in run.results if r["method"].startswith("numpy")), None)
    print("| method | params | recall@10 by id | recall@10 held out | p50 ms | p95 ms "
          "| p50 / exact | p50 / numpy | build s | size MB | index bytes/row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in run.results:
        if "recall id" not in r:
            print(f"| {r['method']} | {r['params']} | | | | | | {r['build']:.0f} | |")
            continue
        build = f"{r['build']:.0f}" if r["build"] is not None else ""
        size = f"{r['size']:.0f}" if r["size"] is not None else ""
        per_row = f"{r['per_row']:,.0f}" if r.get("per_row") is not None else ""
        vs_numpy = f"{r['p50'] / numpy_p50:.2f}" if numpy_p50 else ""
        print(f"| {r['method']} | {r['params']} | {r['recall id']:.3f} | {r['recall held']:.3f} "
              f"| {r['p50']:.2f} | {r['p95']:.2f} | {r['p50'] / exact['p50']:.1%} | {vs_numpy} | {build} "
              f"| {size} | {per_row} |")


def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in c.split("x")) for c in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,100000", help="comma-separated row counts")
    parser.add_argument("--data", default=",".join(datasets.NAMES), help="distributions")
    parser.add_argument("--configs", default="16x64,32x128,32x200", help="HNSW m x ef_construction")
    parser.add_argument("--faiss-configs", default="16x64,32x200", help="FAISS HNSW m x ef_construction")
    parser.add_argument("--ef-search", default="40,100,200,400", help="ef_search values")
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument("--exact-queries", type=int, default=20, help="of each kind, for the exact scan")
    parser.add_argument("--no-peers", action="store_true", help="skip FAISS and Annoy")
    parser.add_argument("--compact", default="auto,128,256,512",
                        help="compact index dims to build (`db reindex --dims`: N or auto); '' for none")
    parser.add_argument("--compact-config", default="32x128", help="compact index m x ef_construction")
    parser.add_argument("--faiss-pca", default=None,
                        help="FAISS PCA+HNSW dims [default: the numbers among --compact]")
    parser.add_argument("--no-annoy", action="store_true", help="skip Annoy")
    args = parser.parse_args()
    ef_searches = [int(e) for e in args.ef_search.split(",")]
    started = time.perf_counter()
    tables = []
    with common.bench_database("ann") as settings:
        print(common.load_average(), flush=True)
        for n in (int(s) for s in args.sizes.split(",")):
            for name in args.data.split(","):
                print(f"\n== {name}, {n:,} rows ==", flush=True)
                run = Run(datasets.make(name, n, args.queries), args.queries, args.exact_queries)
                compact_dims = [d for d in args.compact.split(",") if d]
                compact_config = pairs(args.compact_config)[0]
                bench_postgres(run, settings, pairs(args.configs) if args.configs else [], ef_searches,
                               serial=name == args.data.split(",")[0], compact_dims=compact_dims,
                               compact_config=compact_config)
                bench_numpy(run)
                if not args.no_peers:
                    bench_faiss(run, pairs(args.faiss_configs) if args.faiss_configs else [], ef_searches)
                    pca = args.faiss_pca.split(",") if args.faiss_pca is not None else compact_dims
                    bench_faiss_pca(run, [int(d) for d in pca if d and d != "auto"], *compact_config,
                                    ef_searches)
                    if not args.no_annoy:
                        bench_annoy(run)
                tables.append((name, n, run))
                print_table(name, n, run)
    print("\n## All tables")
    for name, n, run in tables:
        print_table(name, n, run)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; {common.load_average()}")


if __name__ == "__main__":
    main()
