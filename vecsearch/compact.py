"""The compact index: the HNSW graph over a PCA reduction of the embeddings, fitted on the table's
own rows; the neighbour functions re-rank the candidates by the full vector (migrations 0006, 0007).

A full-width graph element is a 4 KB halfvec, one per 8 KB index page; a reduced one of d dims
is 2d bytes, so the graph shrinks and every search step reads less. What the reduction loses is
decided by measurement on this database, never assumed: `screen` tries each d over the table
(exact search in the reduced space, then the exact re-rank: what any graph over it can at best
recall), and `vecsearch db reindex --dims auto` then measures the built index through the
SQL function every caller uses, on held-out-style queries, and falls back to a larger d or to
the full index when recall stays under the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from .errors import InvalidInput
from .limits import DIM

DIMS = (64, 128, 256, 512, 1024)  # what `auto` tries, smallest first
AUTO_MIN_ROWS = 10_000  # below this the full index is small and fast: auto keeps it
FIT_ROWS = 20_000  # rows sampled to fit the projection
SCREEN_QUERIES = 200
SCREEN_TARGET = 0.995  # the bound a d must reach before its graph is built (the graph loses some)
# Re-rank depths the screen measures, shallowest first. Each re-ranked candidate is an 8 KB read,
# and the graph must hand over that many (ef_search >= depth): a d that needs 400 costs a query
# more than the next d up that needs 100 (docs/ann-frontier.md), so auto prefers the shallow one.
SCREEN_DEPTHS = (100, 400)
PASS_ROWS = 10_000  # rows per block of a pass over the table
NEAR_COPY_NOISE = 0.15  # held-out-style queries: a row moved by this share of its length
COMPACT_INDEX = "images_reduced_hnsw"
FULL_INDEX = "images_embedding_hnsw"
FULL_DEFINITION = ("CREATE INDEX {name} ON images USING hnsw ((embedding::halfvec(2048)) "
                   "halfvec_cosine_ops) WITH (m = {m}, ef_construction = {ef_construction})")
COMPACT_DEFINITION = ("CREATE INDEX {name} ON images USING hnsw ((reduced::halfvec({dims})) "
                      "halfvec_l2_ops) WITH (m = {m}, ef_construction = {ef_construction}) "
                      "WHERE reduced_version = {version}")


@dataclass
class Projection:
    """A fitted PCA projection: reduce(x) = components . x - offsets, as vecsearch_reduce()."""

    components: np.ndarray  # dims x 2048 float32, each value a half
    offsets: np.ndarray  # dims float32
    version: int = 0
    retained: float = 1.0  # share of the sample's variance kept
    fitted_on: int = 0

    @property
    def dims(self) -> int:
        return len(self.components)

    def reduce(self, x: np.ndarray) -> np.ndarray:
        """Rows of `x` (n x 2048, or one vector) in the reduced space, as halves (float16)."""
        halves = np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
        return (halves @ self.components.T - self.offsets).astype(np.float16)

    def first(self, dims: int) -> Projection:
        """The projection onto the first `dims` axes (PCA axes nest: one fit serves every d)."""
        return Projection(self.components[:dims], self.offsets[:dims], self.version,
                          self.retained, self.fitted_on)


def parse_dims(spec: int | str) -> int:
    """The N of `--dims N` (full and auto are the caller's)."""
    try:
        dims = int(spec)
    except ValueError:
        raise InvalidInput(f"--dims must be a number of dimensions (1-2000), full or auto, "
                           f"not {spec!r}") from None
    if not 1 <= dims <= 2000:
        raise InvalidInput(f"--dims must be from 1 to 2000 (pgvector indexes at most 2000), not {dims}")
    return dims


def fit(sample: np.ndarray, dims: int) -> Projection:
    """PCA of `sample` (n x 2048): its `dims` axes of largest variance."""
    if not 1 <= dims <= min(len(sample), 2000):
        raise InvalidInput(f"--dims {dims}: a projection needs 1 to {min(len(sample), 2000)} dims here "
                           f"({len(sample)} rows to fit on, and pgvector indexes at most 2000)")
    x = np.asarray(sample, dtype=np.float32)
    mean = x.mean(axis=0, dtype=np.float64)
    centred = x - mean.astype(np.float32)
    import scipy.linalg  # here, not on `db status`'s path, which only describes the projection

    covariance = centred.T @ centred / np.float32(len(x))
    # Only the `dims` largest eigenpairs (LAPACK's syevr): several times faster than all 2048.
    values, vectors = scipy.linalg.eigh(covariance, subset_by_index=[DIM - dims, DIM - 1], driver="evr")
    order = np.argsort(values)[::-1]
    axes = vectors[:, order].T.astype(np.float16).astype(np.float32)  # stored as halfvecs
    total = float(np.trace(covariance, dtype=np.float64)) or 1.0
    return Projection(axes, (axes @ mean).astype(np.float32),
                      retained=float(values[order].sum()) / total, fitted_on=len(x))


def sample(conn: psycopg.Connection, size: int = FIT_ROWS, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """Ids and embeddings of up to `size` rows drawn at random."""
    conn.execute("SELECT setseed(%s)", [(seed % 1000) / 1000])
    rows = conn.execute("SELECT id, embedding FROM images WHERE id IN ("
                        "SELECT id FROM images ORDER BY random() LIMIT %s) ORDER BY id", [size]).fetchall()
    if not rows:
        return [], np.empty((0, DIM), dtype=np.float32)
    return [r[0] for r in rows], np.vstack([r[1].to_numpy() for r in rows]).astype(np.float32)


def held_out(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """Held-out-style queries from rows: each moved by NEAR_COPY_NOISE of its length, normalised
    (what a re-encoded, cropped or re-lit copy of a picture sends), so they are not rows."""
    rng = np.random.default_rng(seed)
    moved = rows + rng.normal(0, NEAR_COPY_NOISE / np.sqrt(DIM), rows.shape).astype(np.float32)
    return (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)


def screen(conn: psycopg.Connection, projection: Projection, sample_rows: np.ndarray,
           sample_ids: list[int], dims: tuple[int, ...] | None = None, k: int = 10,
           queries: int = SCREEN_QUERIES, seed: int = 0,
           depths: tuple[int, ...] | None = None) -> dict[int, dict[int, float]]:
    """{d: {depth: recall@k}} of exact search in the first d axes, then the exact re-rank of the
    nearest `depth` there, over the whole table (one pass): the best any graph over that reduction
    can do with that many candidates. Half the queries are sampled rows (themselves excluded),
    half held-out near-copies of others. On the table itself, not on the sample: how many rows
    outrank a true neighbour in the reduced space grows with the table, and no scaling of a
    sample's depth says by how much."""
    dims = DIMS if dims is None else dims
    depths = SCREEN_DEPTHS if depths is None else depths
    if not depths:
        raise ValueError("screen: at least one re-rank depth")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(sample_rows), size=min(queries, len(sample_rows)), replace=False)
    half = len(picked) // 2
    q = np.vstack([sample_rows[picked[:half]], held_out(sample_rows[picked[half:]], seed)])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    own = np.full(len(q), -1, dtype=np.int64)
    own[:half] = np.asarray(sample_ids, dtype=np.int64)[picked[:half]]
    tried = [d for d in dims if d <= projection.dims]
    rq = projection.reduce(q).astype(np.float32)
    truth = TopK(len(q), k)
    reduced = {d: TopK(len(q), max(depths), extra=True) for d in tried}
    for ids, x in blocks(conn):
        exact = 1.0 - (x @ q.T).T / np.linalg.norm(x, axis=1)  # queries x block
        exact[own[:, None] == ids[None, :]] = np.inf  # a row is not its own neighbour
        truth.add(ids, exact)
        rx = projection.reduce(x).astype(np.float32)
        for d in tried:
            a, b = rx[:, :d], rq[:, :d]
            far = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None, :]
            far[~np.isfinite(exact)] = np.inf
            reduced[d].add(ids, far, exact)
    out: dict[int, dict[int, float]] = {}
    for d in tried:
        out[d] = {}
        for depth in depths:  # the kept candidates are in reduced order: a depth is a prefix
            found = reduced[d].rerank(k, depth)
            out[d][depth] = float(np.mean([len(set(f) & set(t)) / k
                                           for f, t in zip(found, truth.ids, strict=True)]))
    return out


def screened(bounds: dict[int, dict[int, float]]) -> list[tuple[int, int]]:
    """(d, depth) worth building, cheapest query first: the d whose shallowest depth reaches
    SCREEN_TARGET (smallest first), then those that need a deeper re-rank."""
    shallowest = {d: min((x for x, r in b.items() if r >= SCREEN_TARGET), default=None)
                  for d, b in bounds.items()}
    return sorted(((d, x) for d, x in shallowest.items() if x is not None), key=lambda c: (c[1], c[0]))


def describe_screen(bounds: dict[int, dict[int, float]], rows: int) -> str:
    """What the screen measured, for auto's progress and reason."""
    if not bounds:
        return "no d screened"
    depths = _depths(bounds)
    return (f"recall@10 over the {rows} rows of exact search in d dims, then the exact re-rank of "
            f"the nearest {' / '.join(map(str, depths))}: "
            + ", ".join(f"{d}: " + " / ".join("-" if x not in b else f"{b[x]:.3f}" for x in depths)
                        for d, b in sorted(bounds.items())))


def _depths(bounds: dict[int, dict[int, float]]) -> list[int]:
    return sorted({x for b in bounds.values() for x in b})


class TopK:
    """The `size` smallest distances per query seen so far, ties by id, over blocks of rows;
    with `extra`, a second distance carried along (the exact one, for a re-rank)."""

    def __init__(self, queries: int, size: int, extra: bool = False) -> None:
        self.d = np.full((queries, 0), np.inf)
        self.ids = np.zeros((queries, 0), dtype=np.int64)
        self.e = np.full((queries, 0), np.inf) if extra else None
        self.size = size

    def add(self, ids: np.ndarray, d: np.ndarray, e: np.ndarray | None = None) -> None:
        all_d = np.hstack([self.d, d])
        all_ids = np.hstack([self.ids, np.broadcast_to(ids, d.shape)])
        order = np.lexsort((all_ids, all_d), axis=1)[:, :self.size]
        self.d, self.ids = np.take_along_axis(all_d, order, 1), np.take_along_axis(all_ids, order, 1)
        if self.e is not None:
            self.e = np.take_along_axis(np.hstack([self.e, e]), order, 1)

    def finite_ids(self) -> list[list[int]]:
        return [[int(i) for i, d in zip(ids, ds, strict=True) if np.isfinite(d)]
                for ids, ds in zip(self.ids, self.d, strict=True)]

    def rerank(self, k: int, depth: int | None = None) -> list[list[int]]:
        """The k nearest by the extra (exact) distance of the first `depth` kept (default all)."""
        ids, e = self.ids[:, :depth], self.e[:, :depth]
        order = np.lexsort((ids, e), axis=1)[:, :k]
        return [[int(i) for i, x in zip(row, es, strict=True) if np.isfinite(x)]
                for row, es in zip(np.take_along_axis(ids, order, 1),
                                   np.take_along_axis(e, order, 1), strict=True)]


def blocks(conn: psycopg.Connection, size: int | None = None):
    """(ids, embeddings) of every row of `images` in blocks of `size` rows, read once by a binary
    COPY: a pass over the table for many queries at a time, where a scan per query costs hours."""
    size = size or PASS_ROWS
    with conn.cursor().copy("COPY (SELECT id, embedding FROM images) TO STDOUT (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "vector"])
        ids, rows = [], []
        for image_id, vector in copy.rows():
            ids.append(image_id)
            rows.append(vector.to_numpy())
            if len(rows) == size:
                yield np.asarray(ids, dtype=np.int64), np.vstack(rows)
                ids, rows = [], []
        if rows:
            yield np.asarray(ids, dtype=np.int64), np.vstack(rows)


# -- in the database ---------------------------------------------------------------------------


def in_use(conn: psycopg.Connection) -> Projection | None:
    """The projection the compact index is built over, or None (the full index)."""
    version = in_use_version(conn)
    return None if version is None else load(conn, version)


def in_use_version(conn: psycopg.Connection) -> int | None:
    row = conn.execute("SELECT version FROM vecsearch_projection WHERE in_use").fetchone()
    return None if row is None else row[0]


def rerank(conn: psycopg.Connection) -> int | None:
    """How many of the compact graph's candidates the neighbour functions re-rank (None: all)."""
    row = conn.execute("SELECT rerank FROM vecsearch_projection WHERE in_use").fetchone()
    return None if row is None else row[0]


def set_rerank(conn: psycopg.Connection, depth: int | None) -> None:
    conn.execute("UPDATE vecsearch_projection SET rerank = %s WHERE in_use", [depth])


def load(conn: psycopg.Connection, version: int) -> Projection:
    offsets, retained, fitted_on = conn.execute(
        "SELECT offsets, retained, fitted_on FROM vecsearch_projection WHERE version = %s",
        [version]).fetchone()
    axes = [r[0].to_numpy() for r in conn.execute(
        "SELECT u.c FROM vecsearch_projection p, unnest(p.components) WITH ORDINALITY AS u(c, n) "
        "WHERE p.version = %s ORDER BY u.n", [version])]
    return Projection(np.vstack(axes).astype(np.float32), np.asarray(offsets, dtype=np.float32),
                      version, retained, fitted_on)


def store(conn: psycopg.Connection, projection: Projection, reason: str) -> int:
    """Insert `projection` (not in use yet); its new version."""
    from pgvector import HalfVector

    version = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM vecsearch_projection").fetchone()[0]
    conn.execute(
        "INSERT INTO vecsearch_projection (version, dims, fitted_on, retained, components, offsets, reason) "
        "VALUES (%s, %s, %s, %s, %s::halfvec[], %s, %s)",
        [version, projection.dims, projection.fitted_on, projection.retained,
         [HalfVector(c) for c in projection.components], projection.offsets.tolist(), reason])
    projection.version = version
    return version


def fill(conn: psycopg.Connection, projection: Projection, only_missing: bool = False,
         chunk: int = 10_000, report=None) -> int:
    """Write every row's reduced vector for `projection` (only_missing: the rows that have none);
    the rows written. Run inside the transaction that builds the index over them."""
    from pgvector import HalfVector

    conn.execute("CREATE TEMP TABLE IF NOT EXISTS vecsearch_fill (path text, reduced halfvec) "
                 "ON COMMIT DROP")
    total = conn.execute("SELECT count(*) FROM images"
                         + (" WHERE reduced IS NULL" if only_missing else "")).fetchone()[0]
    written, last = 0, 0
    missing = " AND reduced IS NULL" if only_missing else ""
    while True:
        rows = conn.execute(f"SELECT id, path, embedding FROM images WHERE id > %s{missing} "
                            "ORDER BY id LIMIT %s", [last, chunk]).fetchall()
        if not rows:
            break
        last = rows[-1][0]
        reduced = projection.reduce(np.vstack([r[2].to_numpy() for r in rows]))
        with conn.cursor().copy("COPY vecsearch_fill (path, reduced) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "halfvec"])
            for (_, path, _), vector in zip(rows, reduced, strict=True):
                copy.write_row([path, HalfVector(vector)])
        written += len(rows)
        if report is not None:
            report.message(f"reduced vectors: {written} of {total} rows")
    conn.execute("UPDATE images i SET reduced = f.reduced, reduced_version = %s "
                 "FROM vecsearch_fill f WHERE i.path = f.path", [projection.version])
    conn.execute("TRUNCATE vecsearch_fill")
    return written


def definition(dims: int | None, m: int, ef_construction: int, version: int | None = None,
               name: str | None = None) -> str:
    """CREATE INDEX of the full graph (dims None) or of the compact one over `version`."""
    if dims is None:
        return FULL_DEFINITION.format(name=name or FULL_INDEX, m=m, ef_construction=ef_construction)
    return COMPACT_DEFINITION.format(name=name or COMPACT_INDEX, dims=dims, m=m,
                                     ef_construction=ef_construction, version=version)


def element_bytes(dims: int | None, m: int) -> int:
    """Graph memory per row while building: the element (2 bytes a dim), its layer-0 neighbour
    list (2 m candidates) and pgvector's element header; bench/buildcurve.py measures it (the row
    count at which a build outgrows a given maintenance_work_mem)."""
    return 2 * (dims or DIM) + 2 * m * 24 + 256


def describe(conn: psycopg.Connection) -> str:
    """One line on the representation in use, for `db status` and `db recall`."""
    row = conn.execute("SELECT version, dims, fitted_at, fitted_on, retained, reason, rerank "
                       "FROM vecsearch_projection WHERE in_use").fetchone()
    if row is None:
        return "full: the graph over the whole halfvec(2048)"
    version, dims, fitted_at, fitted_on, retained, reason, depth = row
    which = "every candidate" if depth is None else f"the nearest {depth} candidates"
    text = (f"compact: PCA to {dims} dims (projection {version}, fitted {fitted_at:%Y-%m-%d %H:%M} "
            f"on {fitted_on} rows, {retained:.0%} of the variance), exact re-rank of {which} by the "
            "full vector")
    return text + (f"; {reason}" if reason else "")


def set_in_use(conn: psycopg.Connection, version: int | None) -> None:
    """Make `version` the projection in use (None: none, the full index); others are deleted."""
    conn.execute("UPDATE vecsearch_projection SET in_use = false WHERE in_use")
    if version is None:
        conn.execute("DELETE FROM vecsearch_projection")
        return
    conn.execute("DELETE FROM vecsearch_projection WHERE version <> %s", [version])
    conn.execute("UPDATE vecsearch_projection SET in_use = true WHERE version = %s", [version])


def rename(conn: psycopg.Connection, schema: str, old: str, new: str) -> None:
    conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(schema, old),
                                                              sql.Identifier(new)))
