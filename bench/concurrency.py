"""N parallel clients of `vecsearch_similar()` for a fixed time: throughput, latency, errors.

    .venv/bin/python bench/concurrency.py [--rows 100000] [--clients 1,2,4,8] [--seconds 20]
                                          [--k 10] [--ef-search N] [--no-writer]

A table of synthetic CNN-like vectors (bench/common.py: 2048-d, non-negative, clustered,
L2-normalised, fixed seed) is bulk-loaded (binary COPY, HNSW built after) into a throwaway
embedded server (or VECSEARCH_DATABASE_URL, whose images table must be empty). Then, for each
client count N, N client processes (each its own connection, as N analysts or N web workers)
call `SELECT id, path, distance FROM vecsearch_similar(ID, k, ef_search)` on random ids in a
loop for --seconds, side by side: queries/s, p50/p99 latency and errors per N. The same runs are
then repeated while one more process keeps loading: inserts of 16 new rows per transaction
into the indexed table (as `vecsearch load` does outside a bulk first load), its rows/s shown too.

Latency is measured by the client around the whole round trip over the unix socket. The
machine's other work competes for the same cores: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MTIME,
    bench_database,
    build_index,
    cnn_like,
    copy_images,
    copy_vectors,
    drop_index,
    load_average,
)

from vecsearch import db, limits  # noqa: E402

SEED = 20260612
WRITE_BATCH = 16


def populate(url: str, n: int) -> tuple[int, int, float, float]:
    """n rows by binary COPY, then the HNSW build; (first id, last id, copy s, build s)."""
    import psycopg

    vectors = cnn_like(n, SEED)
    with psycopg.connect(url, autocommit=True) as conn:
        db.register_vector(conn)
        definition = drop_index(conn)
        copy_s = copy_vectors(conn, vectors)
        build_s = build_index(conn, definition)
        first, last = conn.execute("SELECT min(id), max(id) FROM images").fetchone()
    return first, last, copy_s, build_s


def client(url: str, ids: tuple[int, int], k: int, ef_search: int, start: float, stop: float,
           seed: int, out: mp.Queue) -> None:
    """Query random ids from `start` to `stop` (time.time()); put (latencies, errors) on `out`."""
    import psycopg

    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    errors: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        time.sleep(max(0.0, start - time.time()))
        while time.time() < stop:
            image_id = int(rng.integers(ids[0], ids[1] + 1))
            t = time.perf_counter()
            try:
                rows = conn.execute("SELECT id, path, distance FROM vecsearch_similar(%s, %s, %s)",
                                    [image_id, k, ef_search]).fetchall()
                if len(rows) != k:
                    errors.append(f"{len(rows)} rows for id {image_id}")
            except psycopg.Error as e:
                errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
                if conn.closed:
                    break
            latencies.append(time.perf_counter() - t)
    out.put((latencies, errors))


def writer(url: str, start: float, stop: float, out: mp.Queue) -> None:
    """Insert WRITE_BATCH new rows per transaction into the indexed table until `stop`."""
    import psycopg

    space_rows = cnn_like(4096, SEED + 7)
    written, errors = 0, []
    with psycopg.connect(url, autocommit=True) as conn:
        db.register_vector(conn)
        time.sleep(max(0.0, start - time.time()))
        while time.time() < stop:
            batch = space_rows[(written % 4096):(written % 4096) + WRITE_BATCH]
            try:
                with conn.transaction(), copy_images(conn) as copy:
                    for v in batch:
                        copy.write_row([f"/bench/new/{time.time_ns()}-{written}.jpg", "0" * 64, 1, 1, 1,
                                        "JPEG", MTIME, v])
                        written += 1
            except psycopg.Error as e:
                errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
    out.put((written, errors))


def run(url: str, ids: tuple[int, int], n_clients: int, args: argparse.Namespace, with_writer: bool) -> dict:
    out: mp.Queue = mp.Queue()
    start = time.time() + 2.0  # every process connected before the clock starts
    stop = start + args.seconds
    procs = [mp.Process(target=client, args=(url, ids, args.k, args.ef_search, start, stop, 1000 + i, out))
             for i in range(n_clients)]
    if with_writer:
        procs.append(mp.Process(target=writer, args=(url, start, stop, out)))
    for p in procs:
        p.start()
    results = [out.get(timeout=args.seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    latencies = [x for r in results if isinstance(r[0], list) for x in r[0]]
    errors = [e for r in results for e in r[1]]
    written = sum(r[0] for r in results if isinstance(r[0], int))
    ms = sorted(1000 * x for x in latencies)
    return {"clients": n_clients, "writer": with_writer, "queries": len(ms),
            "qps": len(ms) / args.seconds,
            "p50": statistics.median(ms) if ms else float("nan"),
            "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan"),
            "errors": errors, "rows_per_s": written / args.seconds if with_writer else None,
            "load": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each run")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ef-search", type=int, default=limits.DEFAULT_EF_SEARCH,
                        help="hnsw.ef_search (default: vecsearch's own)")
    parser.add_argument("--no-writer", action="store_true", help="skip the runs with a concurrent writer")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    started = time.perf_counter()
    results = []
    with bench_database("concurrency") as settings:
        url = db.database_url(settings)
        print(load_average(), flush=True)
        first, last, copy_s, build_s = populate(url, args.rows)
        print(f"{args.rows:,} rows: COPY {copy_s:.1f} s, HNSW build {build_s:.1f} s", flush=True)
        for with_writer in (False, True)[: 1 if args.no_writer else 2]:
            for n in counts:
                result = run(url, (first, last), n, args, with_writer)
                results.append(result)
                label = f"{n} client{'s' if n > 1 else ''}{' + writer' if with_writer else ''}"
                print(f"{label}: {result['qps']:.0f} q/s, "
                      f"p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms, "
                      f"{len(result['errors'])} errors; {result['load']}", flush=True)
    print(f"\n{args.rows:,} rows, k {args.k}, ef_search {args.ef_search}, {args.seconds:.0f} s per run; "
          f"total {time.perf_counter() - started:.0f} s")
    print("| clients | concurrent writer | queries/s | p50 ms | p99 ms | errors | writer rows/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        writer_rate = f"{r['rows_per_s']:.0f}" if r["writer"] else "-"
        print(f"| {r['clients']} | {'yes' if r['writer'] else 'no'} | {r['qps']:.0f} | {r['p50']:.1f} "
              f"| {r['p99']:.1f} | {len(r['errors'])} | {writer_rate} |")
    for r in results:
        for error in sorted(set(r["errors"]))[:5]:
            print(f"error ({r['clients']} clients): {error}")


if __name__ == "__main__":
    main()
