"""How well the HNSW index answers on this database's own data, and the ef_search it needs.

Recall depends on the data (docs/benchmarks.md): the same index settings give 0.998 on one
library and 0.93 on another. So vecsearch measures it where it matters: images sampled from the
table, each asked for its k nearest other images through `vecsearch_similar` (the function every
caller uses), by the index and by the exact scan. `tune` then stores, as the database's default
ef_search (`ALTER DATABASE ... SET vecsearch.ef_search`, read by the SQL functions when a caller
gives none), the smallest of STEPS that reaches the target on the sample.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .errors import InvalidInput, NotFound, first_line
from .limits import MAX_K
from .metrics import recall_against_exact
from .query import check_ef_search

STEPS = (100, 200, 400, 800, 1000)
TARGET = 0.99


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


def measure(conn: psycopg.Connection, ids: list[int], k: int, ef_searches: list[int],
            ) -> list[Measured]:
    """Recall@k of vecsearch_similar at each ef_search against its exact answers, on `ids`."""
    if not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be between 1 and {MAX_K}, not {k}")
    for ef in ef_searches:
        check_ef_search(ef)
    ask = "SELECT id FROM vecsearch_similar(%s, %s, ef_search => %s, exact => %s)"

    def answers(ef: int | None, exact: bool) -> tuple[dict[int, list[int]], float]:
        """Each id's answer, one query at a time (the p50 is per query, as a caller sees it)."""
        found, seconds = {}, []
        for image_id in ids:
            t = time.perf_counter()
            found[image_id] = [r[0] for r in conn.execute(ask, [image_id, k, ef, exact])]
            seconds.append(time.perf_counter() - t)
        return found, 1000 * statistics.median(seconds)

    exact, exact_ms = answers(None, True)
    out = []
    for ef in ef_searches:
        ann, ann_ms = answers(ef, False)
        worst = min(recall_against_exact({q: ann[q]}, exact, k) for q in ids)
        out.append(Measured(ef, recall_against_exact(ann, exact, k), worst, ann_ms, exact_ms))
    return out


def tune(conn: psycopg.Connection, ids: list[int], k: int = 10, target: float = TARGET
         ) -> tuple[int, list[Measured]]:
    """The smallest ef_search of STEPS whose recall@k reaches `target` on `ids` (else the
    largest), stored as the database's default; it and the measurements."""
    measured = []
    for ef in STEPS:
        measured += measure(conn, ids, k, [ef])
        if measured[-1].recall >= target:
            break
    chosen = measured[-1].ef_search
    database = conn.execute("SELECT current_database()").fetchone()[0]
    try:
        conn.execute(sql.SQL("ALTER DATABASE {} SET vecsearch.ef_search = {}").format(
            sql.Identifier(database), sql.Literal(str(chosen))))
    except psycopg.errors.InsufficientPrivilege as e:
        raise InvalidInput(f"ef_search {chosen} reaches recall {measured[-1].recall:.3f} here, but this "
                           f"login cannot set the database's default ({first_line(e)}): run --tune as "
                           "the database owner, or pass --ef-search to queries") from e
    conn.execute(sql.SQL("SET vecsearch.ef_search = {}").format(sql.Literal(str(chosen))))
    return chosen, measured
