"""The compact index's query cost against the server's shared_buffers, side by side in one run.

    .venv/bin/python bench/buffers.py [--rows 1000000] [--data easy] [--dims 256|auto]
        [--shared-buffers 256MB,2GB|auto] [--ef-search 100,200] [--rerank all,40]
        [--queries 50] [--faiss-pca 256]

A graph search touches a few thousand index pages. Once the graph outgrows shared_buffers (a
compact graph of a million rows is about 1 GB at 256 dims) most of those touches are a read from
the kernel's page cache and an eviction, not a memory access. This script builds one compact
index (`db reindex --dims N`, m 32, ef_construction 128) on the embedded server, then for each
shared_buffers restarts the server and measures the same queries twice: straight after the
restart (as the first queries after a reboot see it) and again (a running server: each
ef_search's candidates are read once before its depths are timed), next to numpy brute force
and FAISS with the same reduction (PCA, HNSW32, the same exact re-rank) in the same run.
With `--dims auto` the index is
what `db reindex --dims auto` chooses, measured first at the ef_search and re-rank depth it set.
Queries: by id and held out (bench/datasets.py). `auto` is the embedded server's own sizing
(vecsearch/buffers.py); `--rerank` re-ranks only the nearest N of each ef_search's candidates
(vecsearch_projection.rerank, as `db recall --tune` sets it), each a TOASTed 8 KB read from a
table that at a million rows outgrows the cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ann  # noqa: E402
import common  # noqa: E402
import datasets  # noqa: E402

from vecsearch import compact, db, hnsw, query, server  # noqa: E402
from vecsearch.config import Settings  # noqa: E402

K = 10


def row_ids(conn) -> tuple[np.ndarray, dict[int, int]]:
    """The images' ids in the order of the dataset's rows, and each id's row (read once: a
    million of them)."""
    ids = np.array([r[0] for r in conn.execute("SELECT id FROM images ORDER BY path")])
    return ids, {int(image_id): i for i, image_id in enumerate(ids)}


def searches(conn, rows: tuple[np.ndarray, dict[int, int]], **options):
    """by_id(row index) / held(vector) -> row indexes, through vecsearch's neighbour query."""
    ids, index_of = rows
    return (lambda q: [index_of[x.id] for x in query.similar(conn, int(ids[q]), K, **options)],
            lambda v: [index_of[x.id] for x in query.similar_to(conn, v, K, **options)])


def measure_postgres(run: ann.Run, settings, label: str, ef_searches: list[int], depths: list[int | None],
                     build: float, size: int) -> None:
    with db.connect(settings) as conn:
        buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
        rows = row_ids(conn)
        passes = [(ef_searches[0], depths[0], "first pass after restart")] + [
            (ef, depth, "second pass") for ef in ef_searches for depth in depths]
        warmed = set()
        for ef, depth, what in passes:
            if what == "second pass" and ef not in warmed:
                # Every candidate of this ef_search read once, unmeasured: each depth is then
                # timed on warm pages (else the first depth measured pays the others' reads).
                compact.set_rerank(conn, None)
                by_id, held = searches(conn, rows, ef_search=ef)
                for q in run.by_id:
                    by_id(q)
                for v in run.held:
                    held(v)
                warmed.add(ef)
            compact.set_rerank(conn, depth)
            rerank = "" if depth is None else f", re-rank {depth}"
            run.measure(f"vecsearch compact + re-rank, {what}",
                        f"{label}, ef_search {ef}{rerank}, shared_buffers {buffers}",
                        *searches(conn, rows, ef_search=ef), build=build, size_mb=size / 2**20,
                        per_row=size / run.n)
        compact.set_rerank(conn, None)


def restart_with(settings, buffers: str) -> None:
    with db.connect(settings) as conn:
        conn.execute("ALTER SYSTEM RESET shared_buffers" if buffers == "auto" else
                     f"ALTER SYSTEM SET shared_buffers = '{buffers}'")
    server.stop(settings.home)
    server.ensure_running(settings.home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--data", default="easy", choices=datasets.NAMES)
    parser.add_argument("--dims", default="256", help="the compact index's dims, or auto")
    parser.add_argument("--shared-buffers", default="256MB,2GB", help="values, each after a restart")
    parser.add_argument("--ef-search", default="100,200")
    parser.add_argument("--rerank", default="all", help="re-rank depths: all, or N")
    parser.add_argument("--queries", type=int, default=50, help="queries of each kind")
    parser.add_argument("--exact-queries", type=int, default=2, help="of each kind, for the exact scan")
    parser.add_argument("--faiss-pca", default=None, help="FAISS PCA dims [default: --dims]; '' for none")
    args = parser.parse_args()
    ef_searches = [int(e) for e in args.ef_search.split(",")]
    depths = [None if d == "all" else int(d) for d in args.rerank.split(",")]
    dims = args.dims if args.dims == "auto" else int(args.dims)
    started = time.perf_counter()
    with common.throwaway_home("buffers") as home:
        settings = Settings(database_url=None, home=home)
        print(f"throwaway embedded server in {home}; {common.load_average()}", flush=True)
        print(f"\n== {args.data}, {args.rows:,} rows ==", flush=True)
        run = ann.Run(datasets.make(args.data, args.rows, args.queries), args.queries, args.exact_queries)
        with db.connect(settings) as conn:
            hnsw.drop(conn)
            print(f"  COPY {args.rows / common.copy_vectors(conn, run.data.rows):,.0f} rows/s", flush=True)
            conn.execute("VACUUM ANALYZE images")
            started_build = time.perf_counter()
            done = hnsw.reindex(conn, 32, 128, dims=dims)
            build = time.perf_counter() - started_build  # auto: with its screen and tune
            (schema, name), _ = hnsw.hnsw_index(conn)
            size = conn.execute("SELECT pg_relation_size(%s::regclass)", [f"{schema}.{name}"]).fetchone()[0]
            label = f"{done.dims or 'full'} dims, m 32, ef_c 128"
            if dims == "auto":
                print(f"  {done.reason}", flush=True)
                label = f"auto -> {label}"
                tuned = compact.rerank(conn)
                ef_searches = [done.ef_search] + [e for e in ef_searches if e != done.ef_search]
                depths = [tuned] + [d for d in depths if d != tuned]
            conn.execute("VACUUM ANALYZE images")
            print(f"  reindex --dims {args.dims}: {build:.0f} s, {size / 2**20:.0f} MB", flush=True)
        for buffers in args.shared_buffers.split(","):
            restart_with(settings, buffers)
            measure_postgres(run, settings, label, ef_searches, depths, build, size)
        with db.connect(settings) as conn:
            run.measure("exact scan in PostgreSQL", "", *searches(conn, row_ids(conn), exact=True),
                        few=args.exact_queries)
        ann.bench_numpy(run)
        pca = args.faiss_pca if args.faiss_pca is not None else str(done.dims or "")
        ann.bench_faiss_pca(run, [int(d) for d in pca.split(",") if d], 32, 128, ef_searches)
        ann.print_table(args.data, args.rows, run)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; {common.load_average()}")


if __name__ == "__main__":
    main()
