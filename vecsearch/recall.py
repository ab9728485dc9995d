"""How well the HNSW index answers on this database's own data, and the ef_search it needs.

Recall depends on the data (docs/benchmarks.md): the same index settings give 0.998 on one
library and 0.93 on another. So vecsearch measures it where it matters: images sampled from the
table, half asked for their k nearest other images, half moved a little off the row first (a
held-out query: not a row), through `vecsearch_similar_to` (the function every caller uses), by
the index and by the exact scan. `tune` then stores, as the database's default
ef_search (`ALTER DATABASE ... SET vecsearch.ef_search`, read by the SQL functions when a caller
gives none), the smallest of STEPS that reaches the target on the sample.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import psycopg

from . import db
from .errors import InvalidInput, NotFound, first_line
from .limits import MAX_K
from .metrics import recall_against_exact
from .query import check_ef_search

STEPS = (40, 100, 200, 400, 800, 1000)
TARGET = 0.99
AUTO_QUERIES = 100  # sampled rows `db reindex --dims auto` measures the built index with


@dataclass
class Measured:
    ef_search: int
    recall: float  # mean recall@k of the ANN answers against the exact ones
    worst: float  # the lowest recall of one query
    ann_ms: float  # p50 of one ANN query
    exact_ms: float  # p50 of one exact query


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
    from .compact import held_out

    vectors = dict(conn.execute("SELECT id, embedding FROM images WHERE id = ANY(%s)", [ids]).fetchall())
    kept = [i for i in ids if i in vectors]
    half = len(kept) // 2
    moved = held_out(np.vstack([vectors[i].to_numpy() for i in kept[half:]]), seed) if kept[half:] else []
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


def exact_answers(conn: psycopg.Connection, ids: list[int], k: int = 10) -> Truth:
    """The exact answers of the held-out-style queries made from `ids`, computed once."""
    asked = queries(conn, ids)
    answers, ms = _answers(conn, asked, k, None, True)
    return Truth(answers, ms, asked)


def measure(conn: psycopg.Connection, ids: list[int], k: int, ef_searches: list[int],
            truth: Truth | None = None) -> list[Measured]:
    """Recall@k of vecsearch_similar_to at each ef_search against its exact answers, on
    held-out-style queries made from `ids` (`truth`: those answers, if already computed)."""
    if not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be between 1 and {MAX_K}, not {k}")
    for ef in ef_searches:
        check_ef_search(ef)
    truth = truth or exact_answers(conn, ids, k)
    exact = dict(enumerate(truth.answers))
    out = []
    for ef in ef_searches:
        ann, ann_ms = _answers(conn, truth.asked, k, ef, False)
        found = dict(enumerate(ann))
        worst = min(recall_against_exact({q: found[q]}, exact, k) for q in exact)
        out.append(Measured(ef, recall_against_exact(found, exact, k), worst, ann_ms, truth.exact_ms))
    return out


def tune(conn: psycopg.Connection, ids: list[int], k: int = 10, target: float = TARGET,
         truth: Truth | None = None) -> tuple[int, list[Measured]]:
    """The smallest ef_search of STEPS whose recall@k reaches `target` on `ids` (else the
    largest), stored as the database's default; it and the measurements. The exact answers are
    computed once, not per step."""
    truth = truth or exact_answers(conn, ids, k)
    measured = []
    for ef in STEPS:
        measured += measure(conn, ids, k, [ef], truth)
        if measured[-1].recall >= target:
            break
    chosen = measured[-1].ef_search
    try:
        db.set_database_default(conn, "vecsearch.ef_search", str(chosen))
    except psycopg.errors.InsufficientPrivilege as e:
        raise InvalidInput(f"ef_search {chosen} reaches recall {measured[-1].recall:.3f} here, but this "
                           f"login cannot set the database's default ({first_line(e)}): run --tune as "
                           "the database owner, or pass --ef-search to queries") from e
    return chosen, measured
