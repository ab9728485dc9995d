"""Near-duplicate groups found with the HNSW index, never with an all-pairs matrix.

Each image asks the index for its k nearest neighbours (set-based: one LATERAL query per
chunk of images, the ids streamed from a server-side cursor); only the pairs closer than the
threshold come back to the client, where union-find joins them into groups. Files with the
same sha256 are joined at distance 0 whatever k is. Client memory grows with the number of
duplicates, not with the number of images: this is what lets it run on 100k+ images where a
dense n x n similarity matrix (imagededup's approach) runs out of memory.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from .errors import InvalidInput
from .limits import DEFAULT_K, MAX_K, check_ef_search
from .paths import under_prefix
from .progress import Progress, as_progress

# Cosine distance under which two images count as near-duplicates, for the pretrained
# ResNet50. A judgement, not a measurement made here (no pretrained weights can be
# downloaded on the build machine): imagededup's CNN default is cosine similarity 0.9
# (distance 0.1) on MobileNetV3 features, and meant to catch crops and rotations too; we
# take half of it, favouring precision because a false duplicate risks a photo being
# deleted. Re-encodes and resizes sit far below it. Measure your own set with
# `vecsearch eval perturb`, which prints the distances its copies actually get.
DEFAULT_THRESHOLD = 0.05
# The index's candidates per image. Some graph searches do not even find their own starting
# image (a node without incoming links, or one that ends in the wrong cluster), at any
# ef_search (docs/benchmarks.md); those images get an exact pass instead, so ef_search trades
# speed for the size of that pass, not for missed duplicates.
EF_SEARCH = 100
CHUNK = 256
# Exact comparison within the --under subset when subset^2 < EXACT_FACTOR * k * all images.
EXACT_FACTOR = 3

COLUMNS = ["group", "role", "id", "distance", "resolution", "bytes", "path"]


@dataclass(frozen=True)
class Member:
    id: int
    path: str
    width: int
    height: int
    bytes: int
    format: str
    sha256: str
    distance: float  # cosine distance to the group's keeper (0 for the keeper itself)
    mtime: datetime | None = None  # the file's modification time when it was loaded


# The suggested keeper, stated once: the pages and the CLI say it, _describe's ORDER BY applies it.
KEEPER_RULE = "the most pixels, then the largest file, then the oldest (modification time)"


@dataclass(frozen=True)
class Group:
    """Near-duplicate images; the suggested keeper (KEEPER_RULE) first."""

    members: list[Member]

    @property
    def keeper(self) -> Member:
        return self.members[0]


@dataclass
class DupesResult:
    groups: list[Group]
    threshold: float
    images: int  # images searched (after --under)
    pairs: int = 0  # near pairs returned by the index (each found from both ends counts twice)
    exact_copy_sets: int = 0  # sets of files with one sha256
    seconds: float = 0.0
    truncated: list[int] = field(default_factory=list)  # ids still saturated at MAX_K
    unreached: int = 0  # images the graph search did not reach, compared exactly instead

    def rows(self) -> list[dict[str, Any]]:
        """One row per image, for vecsearch.output.render."""
        return [
            {"group": n, "role": "keep" if i == 0 else "dupe", "id": m.id, "distance": m.distance,
             "resolution": f"{m.width}x{m.height}", "bytes": m.bytes, "path": m.path}
            for n, group in enumerate(self.groups, 1) for i, m in enumerate(group.members)
        ]


class UnionFind:
    """Disjoint sets over ids, with path halving and union by size."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        if x not in parent:
            parent[x] = x
            self.size[x] = 1
            return x
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size.pop(rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return [sorted(members) for members in out.values() if len(members) > 1]


def find_duplicates(conn: psycopg.Connection, threshold: float = DEFAULT_THRESHOLD, *,
                    under: str | os.PathLike | None = None, k: int = DEFAULT_K,
                    ef_search: int = EF_SEARCH, chunk: int = CHUNK, jobs: int = 1,
                    progress: Progress | Callable[[int, int], None] | None = None) -> DupesResult:
    """Groups of images closer than `threshold` (cosine distance), plus exact copies (sha256).

    `k` neighbours are asked per image; an image whose k neighbours all fall under the
    threshold is asked again with a larger k (up to MAX_K), so big groups are not cut. An image
    the graph search cannot reach (it does not find itself) is compared exactly with every
    image instead, in one streamed pass. `jobs` connections search chunks in parallel (each a
    server backend, so up to the server's cores). `progress` (stage "dupes") advances after each
    chunk.
    """
    if not 0 <= threshold < 2:
        raise InvalidInput(f"threshold {threshold} is not a cosine distance in [0, 2)")
    check_ef_search(ef_search)
    if k < 1 or chunk < 1 or jobs < 1:
        raise InvalidInput("k, chunk and jobs must be positive")
    started = time.perf_counter()
    prefix = under_prefix(under) if under is not None else None
    where_q = "starts_with(q.path, %(prefix)s)" if prefix else "true"
    params: dict[str, Any] = {"prefix": prefix, "threshold": threshold}
    sets = UnionFind()
    result = DupesResult(groups=[], threshold=threshold, images=0)
    with conn.transaction():
        total = conn.execute(f"SELECT count(DISTINCT sha256), count(*) FROM images q WHERE {where_q}",
                             params).fetchone()
        result.images = total[1]
        everything = conn.execute("SELECT count(*) FROM images").fetchone()[0]
        # A small subset under --under: walking the graph past all the rows outside it costs more
        # than comparing the subset's images with each other.
        exact = result.images ** 2 < EXACT_FACTOR * k * everything
        _join_exact_copies(conn, where_q, params, sets, result)
        with _Searcher(conn, {**params, "ef_search": ef_search, "exact": exact}, jobs) as search:
            # One query image per distinct content, streamed from a server-side cursor.
            with conn.cursor(name="vecsearch_dupes_ids") as ids_cur:
                ids_cur.itersize = chunk
                ids_cur.execute(f"SELECT min(id) FROM images q WHERE {where_q} GROUP BY sha256 "
                                "ORDER BY 1", params)
                ids = (row[0] for row in ids_cur)
                report = as_progress(progress)
                report.start(total[0], "dupes")
                try:
                    saturated, lost = _search(search, ids, k, chunk, sets, result, report)
                finally:
                    report.stop()
            # Images whose k nearest all were duplicates: ask again with a larger k.
            while saturated and k < MAX_K:
                k = min(MAX_K, k * 8)
                saturated = _search(search, saturated, k, chunk, sets, result)[0]
        result.truncated = saturated
        # Images the graph search never reached (HNSW leaves a few nodes, often near-duplicates
        # of each other, without incoming links): their near pairs come from an exact pass.
        result.unreached = len(lost)
        _exact_pass(conn, lost, where_q, params, threshold, sets, result)
        result.groups = _describe(conn, sets.groups())
    result.seconds = time.perf_counter() - started
    return result


# A chunk of query images (%(ids)s) joined to their %(k)s nearest closer than %(threshold)s, by
# `vecsearch similar`'s own query (the SQL function, given each row's reduced vector), batched.
# The query image itself is not excluded and comes back as a (q, q) row: a graph search that
# does not find its own starting image went astray (see _exact_pass). Other images with the
# query's sha256 are excluded (those copies are joined separately), so they do not use up the k
# slots. The query rows are read first (materialised CTEs): Citus runs no function call per row
# of a distributed table.
NEIGHBOURS_SQL = """
    WITH q AS MATERIALIZED (
        SELECT id, sha256, embedding, reduced, reduced_version FROM images WHERE id = ANY(%(ids)s)
    ), copies AS MATERIALIZED (
        SELECT c.sha256, array_agg(c.id) AS ids FROM images c
        WHERE c.sha256 IN (SELECT sha256 FROM q) GROUP BY c.sha256
    )
    SELECT q.id, n.id
    FROM q LEFT JOIN copies USING (sha256)
    CROSS JOIN LATERAL vecsearch_nearest(
        q.embedding, q.reduced, q.reduced_version, %(k)s + 1, %(ef_search)s, %(prefix)s, %(exact)s,
        array_remove(copies.ids, q.id)) n
    WHERE n.id = q.id OR n.distance < %(threshold)s
"""


class _Searcher:
    """Runs the neighbour query over chunks of ids on `jobs` connections of their own.

    At most 2 x jobs chunks are in flight, so the id stream is consumed only as fast as it is
    searched: client memory stays bounded whatever the table size.
    """

    def __init__(self, conn: psycopg.Connection, params: dict[str, Any], jobs: int) -> None:
        self.params, self.jobs = params, jobs
        # The same server and database, password included (conn.info.dsn leaves it out).
        self.dsn, self.password = conn.info.dsn, conn.info.password
        self.local = threading.local()
        self.connections: list[psycopg.Connection] = []
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> _Searcher:
        self.pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="vecsearch-dupes")
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for c in self.connections:
            c.close()

    def _conn(self) -> psycopg.Connection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = psycopg.connect(self.dsn, password=self.password, autocommit=True)
            self.local.conn = conn
            with self.lock:
                self.connections.append(conn)
        return conn

    def _one(self, ids: list[int], k: int) -> list[tuple[int, int]]:
        # The function scopes its own settings (ef_search, iterative scans) to each call.
        return self._conn().execute(NEIGHBOURS_SQL, {**self.params, "ids": ids, "k": k}).fetchall()

    def run(self, chunks: Iterable[list[int]], k: int) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
        """(chunk, its near pairs) for every chunk, in order."""
        pending: deque[tuple[list[int], Future]] = deque()
        for ids in chunks:
            pending.append((ids, self.pool.submit(self._one, ids, k)))
            if len(pending) >= 2 * self.jobs:
                ids, future = pending.popleft()
                yield ids, future.result()
        while pending:
            ids, future = pending.popleft()
            yield ids, future.result()


def _join_exact_copies(conn: psycopg.Connection, where_q: str, params: dict[str, Any], sets: UnionFind,
                       result: DupesResult) -> None:
    """Exact copies: one sha256 under several paths, distance 0 whatever k is."""
    with conn.cursor(name="vecsearch_dupes_sha") as cur:
        cur.execute(f"SELECT array_agg(id) FROM images q WHERE {where_q} "
                    "GROUP BY sha256 HAVING count(*) > 1", params)
        for (ids,) in cur:
            result.exact_copy_sets += 1
            for other in ids[1:]:
                sets.union(ids[0], other)


def _chunks(ids: Iterable[int], size: int) -> Iterator[list[int]]:
    batch: list[int] = []
    for i in ids:
        batch.append(i)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _search(search: _Searcher, ids: Iterable[int], k: int, chunk: int, sets: UnionFind,
            result: DupesResult, progress: Progress | None = None) -> tuple[list[int], list[int]]:
    """Search every id's k nearest, joining near pairs; (ids whose k nearest were all near, ids
    whose search did not find the image itself)."""
    saturated: list[int] = []
    lost: list[int] = []
    for batch, pairs in search.run(_chunks(ids, chunk), k):
        more, unreached = _join(batch, pairs, k, sets, result)
        saturated += more
        lost += unreached
        if progress:
            progress.advance(len(batch))
    return saturated, lost


def _join(ids: list[int], pairs: list[tuple[int, int]], k: int, sets: UnionFind,
          result: DupesResult) -> tuple[list[int], list[int]]:
    """Union the near pairs; return the query ids whose k neighbours were all near, and those
    whose search did not find the query image itself."""
    counts: dict[int, int] = {}
    reached = set()
    for qid, nid in pairs:
        if qid == nid:
            reached.add(qid)
            continue
        sets.union(qid, nid)
        counts[qid] = counts.get(qid, 0) + 1
        result.pairs += 1
    return [qid for qid, n in counts.items() if n >= k], [qid for qid in ids if qid not in reached]


def _exact_pass(conn: psycopg.Connection, ids: list[int], where_q: str, params: dict[str, Any],
                threshold: float, sets: UnionFind, result: DupesResult, block: int = 1024,
                rows: int = 2000) -> None:
    """Near pairs of `ids` with every image, exactly: the table streams once per block of ids.

    Memory: `rows` x 2048 floats of the table plus `block` query vectors at a time.
    """
    if not ids:
        return
    import numpy as np

    def unit(vectors: list) -> np.ndarray:
        # pgvector's loader gives Vector objects (numpy arrays in older versions)
        m = np.stack([np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32)
                      for v in vectors])
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)

    for start in range(0, len(ids), block):
        found = conn.execute("SELECT id, embedding FROM images WHERE id = ANY(%s)",
                             [ids[start:start + block]]).fetchall()
        qids = np.array([r[0] for r in found])
        queries = unit([r[1] for r in found])
        with conn.cursor(name="vecsearch_dupes_exact", binary=True) as cur:
            cur.itersize = rows
            cur.execute(f"SELECT id, embedding FROM images q WHERE {where_q}", params)
            while batch := cur.fetchmany(rows):
                cids = np.array([r[0] for r in batch])
                near = (1 - unit([r[1] for r in batch]) @ queries.T) < threshold
                for c, q in zip(*np.nonzero(near), strict=True):
                    if cids[c] != qids[q]:
                        sets.union(int(cids[c]), int(qids[q]))
                        result.pairs += 1


def _describe(conn: psycopg.Connection, groups: list[list[int]]) -> list[Group]:
    """Members' metadata and distance to the keeper (KEEPER_RULE, then the lowest id)."""
    if not groups:
        return []
    ids = [i for g in groups for i in g]
    numbers = [n for n, g in enumerate(groups) for _ in g]
    # The members are read first (a materialised CTE), then ranked and compared among themselves:
    # Citus joins a distributed table to itself only on its distribution column.
    rows = conn.execute("""
        WITH g AS MATERIALIZED (
            SELECT g.grp, i.id, i.path, i.width, i.height, i.bytes, i.format, i.sha256, i.mtime, i.embedding
            FROM unnest(%s::bigint[], %s::int[]) AS g(id, grp) JOIN images i USING (id)
        ), m AS (
            SELECT g.*, first_value(g.id) OVER (PARTITION BY g.grp ORDER BY g.width::bigint * g.height DESC,
                                                g.bytes DESC, g.mtime, g.id) AS keeper
            FROM g
        )
        SELECT m.grp, m.id, m.path, m.width, m.height, m.bytes, m.format, m.sha256,
               CASE WHEN m.id = m.keeper THEN 0 ELSE m.embedding <=> k.embedding END, m.mtime
        FROM m JOIN g k ON k.id = m.keeper AND k.grp = m.grp
        ORDER BY m.grp, m.id <> m.keeper, 9, m.id
    """, [ids, numbers]).fetchall()
    by_group: dict[int, list[Member]] = {}
    for grp, *fields, distance, mtime in rows:
        by_group.setdefault(grp, []).append(Member(*fields, distance=float(distance), mtime=mtime))
    out = [Group(members) for members in by_group.values()]
    out.sort(key=lambda g: (-len(g.members), g.keeper.path))
    return out


# -- contact sheet ---------------------------------------------------------------------------
