"""The HNSW index of `images`: found, dropped for a bulk load and rebuilt after, crash-safely.

Inserting rows one by one into a live HNSW graph is far slower than building the graph once, so
a bulk load drops the index and rebuilds it at the end. While it is dropped, the table's comment
holds its definition (the migration's, as pg_get_indexdef read it back), so the next load
recreates exactly that index even if this one is killed. Whoever drops or rebuilds the index
holds a session advisory lock, released by the server when that session ends.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from . import db, sessions
from .config import Settings
from .errors import DatabaseBusy, InvalidInput, first_line
from .progress import Progress

DROPPED_MARK = "vecsearch: HNSW index dropped for a bulk load; the next `vecsearch load` recreates it. "
# One lock per images table (per schema) for whoever drops/rebuilds its HNSW index.
LOCK_KEY = sessions.INDEX_LOCK
# A swap's DROP INDEX waits at most this long in the lock queue per try (queries that arrive
# meanwhile queue behind it), and the swap gives up after SWAP_WAIT_S, keeping the old index.
SWAP_TRY_MS = 100
SWAP_WAIT_S = 60.0


class BulkLoadIndex:
    """Drops the HNSW index for a bulk load and rebuilds it after, or restores one a killed load left.

    Whoever manages the index holds a session advisory lock: a concurrent load neither drops it
    again nor "restores" it under a running bulk load; a killed one releases it with its session.
    """

    def __init__(self, conn: psycopg.Connection, report: Progress) -> None:
        self.conn, self.report = conn, report
        self.locked = False
        self.definition: str | None = None  # set while this load owes the table its index

    def _lock(self) -> bool:
        self.locked = sessions.try_lock(self.conn, LOCK_KEY)
        return self.locked

    def _unlock(self) -> None:
        if self.locked:
            self.conn.execute(f"SELECT pg_advisory_unlock({LOCK_KEY})")
            self.locked = False

    def begin(self, bulk: bool, additions: int) -> None:
        present = hnsw_index(self.conn)
        if present is None:
            stored = dropped_definition(self.conn)
            if stored is not None and self._lock():  # lock free: the load that dropped it is gone
                self.definition = stored[0]
                self.report.message("the HNSW index is missing (an earlier load was interrupted): "
                                    "it is rebuilt at the end of this load")
            elif stored is not None:
                self.report.message("the HNSW index is missing and its lock is held by "
                                    f"{sessions.describe_holders(self.conn, LOCK_KEY)}: that session "
                                    "rebuilds it; if it is no vecsearch load, end it and load again")
            return
        if bulk and self._lock():
            self.definition = drop_marked(self.conn, *present)
            self.report.message(f"bulk load ({additions} new rows): HNSW index dropped, rebuilt after "
                                "the rows are in (much faster than inserting into the graph)")
        elif bulk:
            self.report.message("another load manages the HNSW index: inserting into it")

    def end(self) -> bool:
        """Rebuild the index if this load owes it; True if it did."""
        try:
            if self.definition is None:
                return False
            if decide_on_load(self.conn):
                done = reindex(self.conn, report=self.report, dims="auto")
                self.report.message(f"index: {'full' if done.dims is None else f'compact, {done.dims} dims'} "
                                    f"({done.reason})")
            else:
                rebuild_index(self.conn, self.definition, self.report)
            self.definition = None
            return True
        finally:
            self._unlock()

    def abandon(self) -> None:
        if self.definition is not None:
            self.report.message("the HNSW index is rebuilt by the next `vecsearch load` "
                                "(queries scan the table until then)")
        try:
            self._unlock()
        except psycopg.Error:
            pass  # the connection is gone: so is the lock


def drop_marked(conn: psycopg.Connection, name: tuple[str, str], definition: str) -> str:
    """Drop the HNSW index, leaving its definition in the table's comment in the same
    transaction, so that whoever comes next (a load, a reindex) rebuilds it if this process dies
    before it does; the definition."""
    previous = conn.execute("SELECT obj_description('images'::regclass, 'pg_class')").fetchone()[0]
    mark = DROPPED_MARK + json.dumps({"index": definition, "previous_comment": previous})
    with conn.transaction():
        conn.execute(sql.SQL("COMMENT ON TABLE images IS {}").format(sql.Literal(mark)))
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(*name)))
    return definition


# The HNSW indexes (i: pg_index, c: their pg_class rows), found by access method: a copy made
# with LIKE ... INCLUDING ALL, or a shard's index on a Citus worker, counts under any name. Add
# `AND i.indrelid = ...` for a table's.
HNSW_INDEXES = ("pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'hnsw'")


def bytes_sql(tables: str) -> str:
    """A query for the bytes of the HNSW indexes on `tables` (an SQL regclass[] expression); it
    is also sent to Citus workers as text, so it takes no parameters."""
    return (f"SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0) FROM {HNSW_INDEXES} "
            f"AND i.indrelid = ANY({tables})")


def hnsw_index(conn: psycopg.Connection) -> tuple[tuple[str, str], str] | None:
    """((schema, name), definition) of the HNSW index on `images`, or None."""
    row = conn.execute(f"""
        SELECT (SELECT nspname FROM pg_namespace WHERE oid = c.relnamespace), c.relname,
               pg_get_indexdef(c.oid)
        FROM {HNSW_INDEXES} AND i.indrelid = 'images'::regclass
        ORDER BY c.relname LIMIT 1
    """).fetchone()
    return ((row[0], row[1]), row[2]) if row else None


def dropped_definition(conn: psycopg.Connection) -> tuple[str, str | None] | None:
    """(index definition, previous table comment) left by a bulk load, if it is for this table."""
    comment, table = conn.execute(
        "SELECT obj_description('images'::regclass, 'pg_class'), 'images'::regclass::oid::regclass::text"
    ).fetchone()
    if not comment or not comment.startswith(DROPPED_MARK):
        return None
    try:
        stored = json.loads(comment[len(DROPPED_MARK):])
        definition = stored["index"]
    except (ValueError, KeyError, TypeError):
        return None
    qualified = conn.execute(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'images'::regclass").fetchone()[0]
    # Only a plain CREATE INDEX on this very table (a comment copied by LIKE names another one).
    if (";" in definition or not definition.startswith("CREATE INDEX ")
            or f" ON {qualified} USING hnsw " not in definition):
        return None
    return definition, stored.get("previous_comment")


def drop(conn: psycopg.Connection) -> str | None:
    """Drop the HNSW index (for a bulk COPY by a benchmark or test); its definition, or None."""
    present = hnsw_index(conn)
    if present is None:
        return None
    conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(*present[0])))
    return present[1]


def rebuild_index(conn: psycopg.Connection, definition: str, report: Progress | None = None,
                  workers: int | None = None) -> float:
    """CREATE INDEX `definition` (unless the table has its HNSW index again), restoring the table
    comment a bulk load replaced; seconds. `workers`: parallel build workers (default: what each
    building node decides for itself, vecsearch/buildsize.py)."""
    stored = dropped_definition(conn)

    def build() -> None:
        if hnsw_index(conn) is None:
            conn.execute(definition)
        previous = stored[1] if stored else None
        conn.execute(sql.SQL("COMMENT ON TABLE images IS {}").format(sql.Literal(previous)))

    from . import compact

    m = _m_of(definition)
    return _build(conn, build, report or Progress(), m, workers,
                  element_bytes=compact.element_bytes(_dims_of(definition), m))


@dataclass
class Reindexed:
    """What `reindex` built."""

    definition: str
    seconds: float  # the build transaction: fit, reduced vectors, graph, swap
    dims: int | None  # the compact index's, or None: the full index
    reason: str = ""  # why this representation (auto says what it measured)
    recall: float | None = None  # measured by auto, at ef_search
    ef_search: int | None = None


def reindex(conn: psycopg.Connection, m: int | None = None, ef_construction: int | None = None,
            report: Progress | None = None, swap_wait: float = SWAP_WAIT_S,
            dims: int | str | None = None) -> Reindexed:
    """Rebuild the HNSW index, with new `m` / `ef_construction` if given (else its own).

    dims: "full" (the graph over the whole vector), N (a compact graph over a PCA projection to N
    dims fitted on the table's rows, vecsearch/compact.py), "auto" (the smallest N that keeps
    recall@10 >= 0.99 here with a short re-rank, else a deep one, measured; else full), or None
    (the representation in use, refitted).
    The new index is built under another name and swapped in within one transaction that holds
    off writers (not readers): queries use the old index meanwhile, and a kill at any point leaves
    one complete index, old or new, with its projection. The swap never queues for long ahead of
    queries (see _drop_for_swap). Works too when the table has no HNSW index (an ETL dropped it).
    """
    from . import compact

    report = report or Progress()
    options = dict(index_options(conn)
                   or {"m": Settings.hnsw_m, "ef_construction": Settings.hnsw_ef_construction})
    options.update({k: v for k, v in (("m", m), ("ef_construction", ef_construction)) if v is not None})
    check_options(options)
    current = conn.execute("SELECT dims FROM vecsearch_projection WHERE in_use").fetchone()
    spec = dims if dims is not None else (current[0] if current else "full")
    if not sessions.try_lock(conn, LOCK_KEY):
        raise DatabaseBusy(f"the HNSW index is being managed by {sessions.describe_holders(conn, LOCK_KEY)} "
                           "(a load or another reindex): run `vecsearch db reindex` when it has finished")
    if dims is not None:
        _remember(conn, dims)
    try:
        if spec == "auto":
            return _auto(conn, options, report, swap_wait)
        if spec == "full":
            return _swap_in(conn, None, options, report, swap_wait, "asked for (--dims full)")
        d = compact.parse_dims(spec)
        _, rows = compact.sample(conn)
        return _swap_in(conn, compact.fit(rows, d), options, report, swap_wait, f"asked for (--dims {d})")
    finally:
        conn.execute("SELECT pg_advisory_unlock(" + LOCK_KEY + ")")


def decide_on_load(conn: psycopg.Connection) -> bool:
    """Whether a bulk load's rebuild should let `--dims auto` choose the index: a table big enough
    to fit a projection on, with a full index, where nobody chose the representation by hand."""
    from . import compact

    chosen = conn.execute("SELECT nullif(current_setting('vecsearch.dims', true), '')").fetchone()[0]
    if chosen not in (None, "auto"):
        return False
    rows, projection = conn.execute(
        "SELECT (SELECT count(*) FROM images), (SELECT version FROM vecsearch_projection WHERE in_use)"
    ).fetchone()
    return projection is None and rows >= compact.AUTO_MIN_ROWS


def _remember(conn: psycopg.Connection, dims: int | str) -> None:
    """Keep the representation asked for as the database's `vecsearch.dims`: a later bulk load
    decides again only where it is auto."""
    try:
        with conn.transaction():
            db.set_database_default(conn, "vecsearch.dims", str(dims))
    except psycopg.errors.InsufficientPrivilege:
        pass  # not the owner: loads may decide again, which measures before it changes anything


def _swap_in(conn: psycopg.Connection, projection, options: dict[str, int], report: Progress,
             swap_wait: float, reason: str) -> Reindexed:
    """Build the full graph (projection None) or the compact one over `projection` beside the
    present index and swap it in, in one transaction."""
    from . import compact

    present = hnsw_index(conn)
    m, ef = int(options["m"]), int(options["ef_construction"])
    dims = None if projection is None else projection.dims
    if projection is not None and present is not None and "reduced_version" not in present[1]:
        # From the full graph to a compact one: writing each row's reduced vector would insert
        # every row into the full graph again (a non-HOT update enters every index), as slow as
        # building it. So it goes first, as for a bulk load: queries scan exactly until the swap,
        # and if this process dies the next load or reindex rebuilds it from the table's comment.
        report.message("the full HNSW index is dropped first (queries are exact until the compact one "
                       "is in)")
        drop_marked(conn, *present)
        present = None
    final = compact.FULL_INDEX if dims is None else compact.COMPACT_INDEX
    built = {}

    def build() -> None:
        conn.execute("LOCK TABLE images IN SHARE ROW EXCLUSIVE MODE")  # writers wait, readers go on
        version = None
        if projection is not None:
            version = compact.store(conn, projection, reason)
            compact.fill(conn, projection, report=report)
        built["definition"] = compact.definition(dims, m, ef, version, name=f"{final}_rebuilt")
        conn.execute(built["definition"])
        if present is not None:
            _drop_for_swap(conn, *present[0], swap_wait)
        stored = dropped_definition(conn)
        if stored is not None:  # a bulk load's mark: the table has its index again
            conn.execute(sql.SQL("COMMENT ON TABLE images IS {}").format(sql.Literal(stored[1])))
        compact.rename(conn, conn.execute("SELECT current_schema()").fetchone()[0], f"{final}_rebuilt", final)
        compact.set_in_use(conn, version)

    what = "full" if dims is None else f"compact ({dims} dims)"
    report.message(f"building the {what} HNSW index: {reason}")
    seconds = _build(conn, build, report, m, element_bytes=compact.element_bytes(dims, m))
    return Reindexed(hnsw_index(conn)[1], seconds, dims, reason)


def _auto(conn: psycopg.Connection, options: dict[str, int], report: Progress,
          swap_wait: float) -> Reindexed:
    """The compact index of the first screened d (compact.screened) whose measured recall@10
    reaches recall.TARGET, trying at most two, the second larger than the first; else full."""
    from . import compact, recall

    rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    if rows < compact.AUTO_MIN_ROWS:
        done = _swap_in(conn, None, options, report, swap_wait,
                        f"auto: {rows} rows, under {compact.AUTO_MIN_ROWS}: the full index is small here")
        return done
    sample_ids, sample = compact.sample(conn)
    fitted = compact.fit(sample, min(max(compact.DIMS), len(sample) - 1))
    bounds = compact.screen(conn, fitted, sample, sample_ids)
    said = compact.describe_screen(bounds, rows)
    report.message(f"screen: {said}")
    queries = recall.sample(conn, min(recall.AUTO_QUERIES, rows), seed=1)
    truth = None
    tried = []
    candidates = compact.screened(bounds)
    for _ in range(2):
        if not candidates:
            break
        d, depth = candidates[0]
        candidates = [c for c in candidates if c[0] > d]  # after a miss only a larger d can do better
        done = _swap_in(conn, fitted.first(d), options, report, swap_wait, "auto")
        truth = truth or recall.exact_answers(conn, queries)
        chosen, measured = recall.tune(conn, queries, truth=truth)
        best = measured[-1]
        tried.append(f"{d} dims: recall@10 {best.recall:.3f} at ef_search {best.ef_search}")
        if best.recall >= recall.TARGET:
            kept = "" if best.rerank is None else f", re-ranking the nearest {best.rerank}"
            which, before = ("the smallest", "") if len(tried) == 1 else ("the next", f" after {tried[0]}")
            done.reason = (f"auto: {d} dims, {which} whose screen reached {compact.SCREEN_TARGET} "
                           f"with a {depth}-deep re-rank ({said}){before}; measured recall@10 "
                           f"{best.recall:.3f} at ef_search {chosen}{kept} on {len(queries)} "
                           "held-out-style queries")
            conn.execute("UPDATE vecsearch_projection SET reason = %s WHERE in_use", [done.reason])
            done.recall, done.ef_search = best.recall, chosen
            return done
    why = "; ".join(tried) or f"no d reached {compact.SCREEN_TARGET} in the screen: {said}"
    done = _swap_in(conn, None, options, report, swap_wait,
                    f"auto: no reduction kept recall@10 >= {recall.TARGET} here ({why})")
    truth = truth or recall.exact_answers(conn, queries)
    chosen, measured = recall.tune(conn, queries, truth=truth)
    done.recall, done.ef_search = measured[-1].recall, chosen
    return done


def _drop_for_swap(conn: psycopg.Connection, schema: str, name: str, wait: float) -> None:
    """DROP INDEX for the swap, in short tries: its ACCESS EXCLUSIVE lock request would make every
    new query queue behind it while a long reader holds the table. Between tries queries run; after
    `wait` seconds DatabaseBusy, and the transaction's rollback keeps the old index."""
    deadline = time.monotonic() + wait
    while True:
        conn.execute("SAVEPOINT swap")
        conn.execute(f"SET LOCAL lock_timeout = '{SWAP_TRY_MS}ms'")
        try:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, name)))
            conn.execute("RELEASE SAVEPOINT swap")
            conn.execute("SET LOCAL lock_timeout = 0")
            return
        except psycopg.errors.LockNotAvailable:
            conn.execute("ROLLBACK TO SAVEPOINT swap")
        if time.monotonic() >= deadline:
            raise DatabaseBusy(f"the new HNSW index is built, but sessions using the table kept it from "
                               f"being swapped in for {wait:g} s, so the old index stays: run "
                               "`vecsearch db reindex` again when long queries have finished")
        time.sleep(0.5)


def index_options(conn: psycopg.Connection) -> dict[str, int] | None:
    """The HNSW index's build parameters (m, ef_construction), pgvector's defaults filled in."""
    present = hnsw_index(conn)
    if present is None:
        return None
    stored = conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                          [".".join(f'"{part}"' for part in present[0])]).fetchone()[0] or []
    options = {"m": 16, "ef_construction": 64}  # pgvector's defaults
    options.update({k: int(v) for k, v in (o.split("=", 1) for o in stored) if k in options})
    return options


def check_options(options: dict[str, int]) -> None:
    """pgvector's ranges: m 2..100, ef_construction 4..1000 and at least 2 m."""
    m, ef = options["m"], options["ef_construction"]
    if not 2 <= m <= 100:
        raise InvalidInput(f"--m must be from 2 to 100, not {m}")
    if not 4 <= ef <= 1000 or ef < 2 * m:
        raise InvalidInput(f"--ef-construction must be from 4 to 1000 and at least 2 x m ({2 * m}), not {ef}")


def _m_of(definition: str) -> int:
    found = re.search(r"\bm\s*=\s*'?(\d+)", definition.partition(" WITH (")[2])
    return int(found.group(1)) if found else 16


def _dims_of(definition: str) -> int | None:
    """The compact index's dims (its `reduced::halfvec(N)`), None for the full graph."""
    found = re.search(r"\(\(?reduced::halfvec\((\d+)\)", definition)
    return int(found.group(1)) if found else None


def _build(conn: psycopg.Connection, build, report: Progress, m: int = 16,
           workers: int | None = None, element_bytes: int | None = None) -> float:
    """Run `build` (the CREATE INDEX and what goes with it) in one transaction, with the memory and
    parallel workers each building node decided for itself (vecsearch/buildsize.py); again without
    workers if those fail. Seconds taken."""
    from . import buildsize, compact

    per_row = element_bytes or compact.element_bytes(None, m)
    distributed = buildsize.is_distributed(conn)
    if distributed:
        nodes = buildsize.cluster_plans(conn, per_row, workers)
        plans = [n.plan for n in nodes]
        rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
        report.message(f"building the HNSW index on {rows} rows in {buildsize.shard_count(conn)} shards, "
                       "each worker's shards one after another, the workers at once; each worker's "
                       "settings from what it reports about itself:")
    else:
        rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
        plans = [buildsize.local_plan(conn, rows, per_row, workers)]
        report.message(f"building the HNSW index on {rows} rows...")
    for p in plans:
        report.message(f"  {p.reason}")
    started = time.monotonic()
    for attempt in (None, 0):
        try:
            with conn.transaction():
                if distributed:
                    # SET LOCALs in `build` (the swap's lock_timeout) reach the shards too.
                    conn.execute("SET LOCAL citus.propagate_set_commands = 'local'")
                    buildsize.apply_on_shards(conn, [n if attempt is None else
                                                     buildsize.NodePlan(n.plan.with_workers(0), n.key)
                                                     for n in nodes])
                else:
                    p = plans[0] if attempt is None else plans[0].with_workers(0)
                    conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(
                        sql.Literal(p.memory_setting)))
                    conn.execute(sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(
                        sql.Literal(p.workers)))
                build()
            break
        except (psycopg.errors.DiskFull, psycopg.errors.OutOfMemory) as e:
            # Parallel builds share maintenance_work_mem through /dev/shm, which containers keep small.
            if attempt == 0 or all(p.workers == 0 for p in plans):
                raise
            report.message(f"parallel index build failed ({first_line(e)}): "
                           "building without parallel workers")
    seconds = time.monotonic() - started
    report.message(f"HNSW index built in {seconds:.1f} s")
    return seconds
