"""What the hard distribution allows any index, in RAM, outside PostgreSQL: the bound issue 19's
hard-data target meets before pgvector's costs come in.

    .venv/bin/python bench/hard_bound.py [--rows 100000] [--data hard] [--no-hnsw]

Over `--rows` rows of bench/datasets.py's distribution, 100 queries by id (the row itself
excluded) and 100 held out, k = 10, one thread each, side by side:

- the relative contrast: median cosine distance of the 10th, 100th and 1000th neighbour (where
  they are close, every approximate method must look at many rows to tell them apart);
- numpy brute force, one query at a time;
- FAISS IndexHNSWFlat over the full vectors, m 32 / ef_construction 128 (vecsearch's defaults),
  ef_search 200-1000;
- FAISS IVFFlat over the same PCA reduction vecsearch fits (vecsearch.compact.fit on 20k rows),
  256 and 512 dims, sqrt(n) and n/100 lists, 5-80 probes, the nearest R = 100-400 re-ranked
  exactly: the other candidate generator pgvector offers (ivfflat).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
from common import load_average  # noqa: E402

from vecsearch import compact  # noqa: E402

K = 10


def recall(found, truth: np.ndarray, own: np.ndarray) -> np.ndarray:
    """recall@K of each query's ids in `found` (own row and -1 dropped, first K kept)."""
    out = []
    for f, t, o in zip(found, truth, own, strict=True):
        kept = [j for j in f if j >= 0 and j != o][:K]
        out.append(len(set(kept) & set(t)) / K)
    return np.array(out)


def rerank(x: np.ndarray, candidates: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The candidates (-1: none) by exact cosine similarity to `query`, nearest first."""
    c = candidates[candidates >= 0]
    return c[np.argsort(-(x[c] @ query))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--data", default="hard", choices=datasets.NAMES)
    parser.add_argument("--no-hnsw", action="store_true", help="skip the FAISS HNSW build")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)
    print(f"{args.data}, {args.rows:,} rows; {load_average()}", flush=True)
    ds = datasets.make(args.data, args.rows, 200)
    x, n = ds.rows, len(ds.rows)
    rng = np.random.default_rng(1)
    by_id = rng.choice(n, 100, replace=False)
    q = np.vstack([x[by_id], ds.held_out[:100]]).astype(np.float32)
    own = np.concatenate([by_id, np.full(100, -1)])
    sims = q @ x.T
    sims[np.arange(100), by_id] = -np.inf
    order = np.argsort(-sims, axis=1)
    truth = order[:, :K]
    for rank in (10, 100, 1000):
        d = 1 - sims[np.arange(len(q)), order[:, rank - 1]]
        print(f"median distance of the {rank}th neighbour: {np.median(d):.4f}")
    del sims, order
    start = time.perf_counter()
    for i in range(20):
        np.argpartition(-(x @ q[i]), K)[:K]
    numpy_ms = (time.perf_counter() - start) / 20 * 1000
    print(f"numpy brute force: {numpy_ms:.1f} ms a query")

    def row(method: str, found: np.ndarray, ms: float, extra: str = "") -> None:
        r = recall(found, truth, own)
        print(f"| {method} | {r[:100].mean():.3f} | {r[100:].mean():.3f} | {ms:.2f} | "
              f"{ms / numpy_ms:.2f} | {extra} |", flush=True)

    print("| method | recall@10 by id | held out | ms | / numpy | notes |\n|---|---|---|---|---|---|")
    if not args.no_hnsw:
        hnsw = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 128
        start = time.perf_counter()
        hnsw.add(x)
        built = time.perf_counter() - start
        for ef in (200, 400, 600, 800, 1000):
            hnsw.hnsw.efSearch = ef
            start = time.perf_counter()
            _, found = hnsw.search(q, K + 1)
            row(f"FAISS HNSWFlat m 32, ef_c 128, ef_search {ef}", found,
                (time.perf_counter() - start) / len(q) * 1000, f"build {built:.0f} s")
    fit_rows = x[rng.choice(n, min(n, compact.FIT_ROWS), replace=False)]
    for dims in (256, 512):
        projection = compact.fit(fit_rows, dims)
        rx, rq = (projection.reduce(v).astype(np.float32) for v in (x, q))
        for lists in (int(np.sqrt(n)), n // 100):
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(dims), dims, lists)
            ivf.train(rx[rng.choice(n, min(n, 50 * lists), replace=False)])
            ivf.add(rx)
            for probes in (10, 40, 80):
                ivf.nprobe = probes
                for depth in (100, 400):
                    start = time.perf_counter()
                    _, candidates = ivf.search(rq, depth + 1)
                    found = [rerank(x, c, qi) for c, qi in zip(candidates, q, strict=True)]
                    row(f"FAISS IVF{lists} over PCA{dims}, {probes} probes, re-rank {depth}", found,
                        (time.perf_counter() - start) / len(q) * 1000,
                        f"{100 * probes / lists:.1f} % of rows scanned")


if __name__ == "__main__":
    main()
