"""How well the HNSW index answers on this database's own data, and the ef_search it needs.

Recall depends on the data (docs/benchmarks.md): the same index settings give 0.998 on one
library and 0.93 on another. So vecsearch measures it where it matters: images sampled from the
table, half asked for their k nearest other images, half moved a little off the row first (a
held-out query: not a row), through `vecsearch_similar_to` (the function every caller uses), by
the index and by the exact scan. `tune` then stores, as the database's default
ef_search (`ALTER DATABASE ... SET vecsearch.ef_search`, read by the SQL functions when a caller
gives none), the smallest of STEPS that reaches the target on the sample; with a compact index
also the smallest re-rank depth that keeps it there (`vecsearch_projection.rerank`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import psycopg

from . import compact, db
from .errors import InvalidInput, NotFound, first_line
from .eval.metrics import recall_against_exact
from .limits import check_ef_search, check_k

STEPS = (40, 100, 200, 400, 800, 1000)
RERANK_SHARES = (8, 4, 2)  # a compact index's re-rank depths tried: ef_search / these, deepest last
TARGET = 0.99
AUTO_QUERIES = 100  # sampled rows `db reindex --dims auto` measures the built index with


@dataclass
class Measured:
    ef_search: int
    recall: float  # mean recall@k of the ANN answers against the exact ones
    worst: float  # the lowest recall of one query
    ann_ms: float  # p50 of one ANN query
    exact_ms: float  # p50 of one exact query
    rerank: int | None = None  # a compact index's candidates re-ranked (None: all, or the full index)


def sample(conn: psycopg.Connection, size: int, seed: int = 0) -> list[int]:
    if size < 1:
        raise InvalidInput(f"--sample must be at least 1, not {size}")
    conn.execute("SELECT setseed(%s)", [(seed % 1000) / 1000])
    ids = [r[0] for r in conn.execute("SELECT id FROM images ORDER BY random() LIMIT %s", [size])]
    if not ids:
        raise NotFound("the images table is empty: load images first")
    return ids


Query = tuple[list[float], list[int]]  # (vector, ids excluded from its answer)


def queries(conn: psycopg.Connection, ids: list[int], seed: int = 0) -> list[Query]:
    """Held-out-style queries from sampled rows: the first half as themselves (excluded from
    their own answers, as `vecsearch similar ID`), the rest moved a little off the row
    (compact.held_out: what a re-encoded or cropped copy sends), so not rows at all."""
    vectors = dict(conn.execute("SELECT id, embedding FROM images WHERE id = ANY(%s)", [ids]).fetchall())
    kept = [i for i in ids if i in vectors]
    half = len(kept) // 2
    rest = [vectors[i].to_numpy() for i in kept[half:]]
    moved = compact.held_out(np.vstack(rest), seed) if rest else []
    return ([(vectors[i].to_numpy().tolist(), [i]) for i in kept[:half]]
            + [(v.tolist(), []) for v in moved])


def _answers(conn: psycopg.Connection, asked: list[Query], k: int, ef: int | None, exact: bool,
             ) -> tuple[list[list[int]], float]:
    """Each query's answer through vecsearch_similar_to, one at a time (the p50 is per query, as
    a caller sees it)."""
    ask = ("SELECT id FROM vecsearch_similar_to(%s::vector, %s, ef_search => %s, exact => %s, "
           "exclude => %s::bigint[])")
    found, seconds = [], []
    for vector, exclude in asked:
        t = time.perf_counter()
        found.append([r[0] for r in conn.execute(ask, [str(vector), k, ef, exact, exclude])])
        seconds.append(time.perf_counter() - t)
    return found, 1000 * statistics.median(seconds)


@dataclass
class Truth:
    answers: list[list[int]]
    exact_ms: float
    asked: list[Query]


EXACT_TIMED = 3  # exact queries run through SQL for the exact scan's p50 (each reads the table)


def exact_answers(conn: psycopg.Connection, ids: list[int], k: int = 10) -> Truth:
    """The exact answers of the held-out-style queries made from `ids`, in one pass over the
    table for all of them (a scan per query costs hours on millions of rows); the exact scan's
    p50 is timed on a few of them through vecsearch_similar_to, as a caller runs it."""
    asked = queries(conn, ids)
    _, ms = _answers(conn, asked[:EXACT_TIMED], k, None, True)
    return Truth(_exact_pass(conn, asked, k), ms, asked)


def _exact_pass(conn: psycopg.Connection, asked: list[Query], k: int) -> list[list[int]]:
    """The k nearest ids of each query by cosine distance, ties by id (as the exact scan orders),
    over every row of `images` read once."""
    q = np.asarray([v for v, _ in asked], dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    excluded = [np.asarray(e, dtype=np.int64) for _, e in asked]
    best = compact.TopK(len(q), k)
    for ids, x in compact.blocks(conn):
        d = 1.0 - (x @ q.T).T / np.linalg.norm(x, axis=1)  # queries x block
        for row, gone in enumerate(excluded):
            if len(gone):
                d[row, np.isin(ids, gone)] = np.inf
        best.add(ids, d)
    return best.finite_ids()


def measure(conn: psycopg.Connection, ids: list[int], k: int, ef_searches: list[int],
            truth: Truth | None = None) -> list[Measured]:
    """Recall@k of vecsearch_similar_to at each ef_search against its exact answers, on
    held-out-style queries made from `ids` (`truth`: those answers, if already computed)."""
    check_k(k)
    for ef in ef_searches:
        check_ef_search(ef)
    truth = truth or exact_answers(conn, ids, k)
    exact = dict(enumerate(truth.answers))
    rerank = compact.rerank(conn)
    out = []
    for ef in ef_searches:
        ann, ann_ms = _answers(conn, truth.asked, k, ef, False)
        found = dict(enumerate(ann))
        worst = min(recall_against_exact({q: found[q]}, exact, k) for q in exact)
        out.append(Measured(ef, recall_against_exact(found, exact, k), worst, ann_ms, truth.exact_ms,
                            None if rerank is None else min(rerank, ef)))
    return out


def tune(conn: psycopg.Connection, ids: list[int], k: int = 10, target: float = TARGET,
         truth: Truth | None = None) -> tuple[int, list[Measured]]:
    """The smallest ef_search of STEPS whose recall@k reaches `target` on `ids` (else the
    largest), stored as the database's default; it and the measurements. With a compact index in
    use, then the smallest re-rank depth (ef_search / RERANK_SHARES) that still reaches it, stored
    with the projection: fewer full vectors read per query. The exact answers are computed once."""
    compacted = compact.in_use_version(conn) is not None
    if compacted and not conn.execute(
            "SELECT has_table_privilege('vecsearch_projection', 'UPDATE')").fetchone()[0]:
        raise InvalidInput("this login may not set the compact index's re-rank depth: run --tune as "
                           "the database owner, or pass --ef-search to queries")
    truth = truth or exact_answers(conn, ids, k)
    if compacted:
        compact.set_rerank(conn, None)  # every candidate re-ranked: what each ef_search can reach
    measured = []
    for ef in STEPS:
        measured += measure(conn, ids, k, [ef], truth)
        if measured[-1].recall >= target:
            break
    chosen, every = measured[-1].ef_search, measured[-1]
    if compacted and every.recall >= target:
        for share in RERANK_SHARES:
            depth = chosen // share
            if depth < max(k + 10, 2 * k):
                continue
            compact.set_rerank(conn, depth)
            measured += measure(conn, ids, k, [chosen], truth)
            if measured[-1].recall >= target:
                break
        else:
            compact.set_rerank(conn, None)
            measured.append(every)  # the last is what is in use
    try:
        db.set_database_default(conn, "vecsearch.ef_search", str(chosen))
    except psycopg.errors.InsufficientPrivilege as e:
        raise InvalidInput(f"ef_search {chosen} reaches recall {measured[-1].recall:.3f} here, but this "
                           f"login cannot set the database's default ({first_line(e)}): run --tune as "
                           "the database owner, or pass --ef-search to queries") from e
    return chosen, measured
