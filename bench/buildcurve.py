"""Build curves of the HNSW index: rows vs build memory vs time, for docs/scaling.md's "what a
worker needs for a shard of N rows".

    .venv/bin/python bench/buildcurve.py [--rows 5000,10000,20000] [--dims full,256] [--workers 1]

For each size and representation (the full graph, or the compact one over a projection to N
dims fitted on the rows): the build with the memory vecsearch gives it (vecsearch/buildsize.py's
estimate for that many rows), then with a quarter of that (the graph outgrows it and pgvector
finishes it on disk). Each line says the memory, the seconds, the index bytes per row and whether
pgvector said the graph no longer fit (and after how many rows): the estimate is right when the
first build never spills. One embedded server, the `hard` distribution (bench/datasets.py).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import datasets  # noqa: E402

from vecsearch import buildsize, compact, db, hnsw  # noqa: E402
from vecsearch.progress import Progress  # noqa: E402

M, EF_CONSTRUCTION = 32, 128


def build(conn, definition: str, memory: int, workers: int) -> tuple[float, int | None]:
    """Seconds of a build with `memory` bytes; the row count at which the graph spilled, if it did."""
    said: list[str] = []

    def hear(d) -> None:
        said.append(d.message_primary or "")

    conn.add_notice_handler(hear)
    conn.execute(f"SET vecsearch.build_memory = '{max(1, memory // 1024)}kB'")
    conn.execute(f"SET vecsearch.build_workers = '{workers}'")
    try:
        seconds = hnsw.rebuild_index(conn, definition, Progress())
    finally:
        conn.execute("RESET vecsearch.build_memory")
        conn.execute("RESET vecsearch.build_workers")
        conn.remove_notice_handler(hear)
    spilled = next((int(found.group(1)) for line in said
                    if (found := re.search(r"after (\d+) tuples", line))), None)
    return seconds, spilled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="5000,10000,20000")
    parser.add_argument("--dims", default="full,256")
    parser.add_argument("--workers", type=int, default=1, help="parallel build workers")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    print(common.load_average(), flush=True)
    data = datasets.make("hard", max(sizes), 0)
    lines = []
    with common.bench_database("buildcurve") as settings, db.connect(settings) as conn:
        for n in sizes:
            conn.execute("TRUNCATE images")
            hnsw.drop(conn)
            common.copy_vectors(conn, data.rows[:n])
            conn.execute("VACUUM ANALYZE images")
            for spec in args.dims.split(","):
                hnsw.reindex(conn, M, EF_CONSTRUCTION, dims=spec)  # fits (and stores) the projection
                dims = None if spec == "full" else int(spec)
                name = compact.FULL_INDEX if dims is None else compact.COMPACT_INDEX
                definition = hnsw.drop(conn)
                need = buildsize.graph_bytes(n, compact.element_bytes(dims, M))
                for share, label in ((1.0, "estimate"), (0.25, "estimate / 4")):
                    seconds, spilled = build(conn, definition, int(need * share), args.workers)
                    size = conn.execute("SELECT pg_relation_size(%s)", [name]).fetchone()[0]
                    row = (f"| {n:,} | {spec} | {label}: {need * share / 2**20:.0f} MB | {seconds:.1f} | "
                           f"{size / n:,.0f} | {f'after {spilled:,} rows' if spilled else 'no'} |")
                    print(row, common.load_average(), flush=True)
                    lines.append(row)
                    if share == 1.0:
                        hnsw.drop(conn)
    print(f"\nm {M}, ef_construction {EF_CONSTRUCTION}, {args.workers} parallel build worker(s), "
          "hard distribution\n")
    print("| rows | graph | maintenance_work_mem | build s | index bytes/row | spilled to disk |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(common.load_average())


if __name__ == "__main__":
    main()
