"""`vecsearch load DIR`: find image files, embed what is new or changed, write it in batches.

The pipeline, one batch of files at a time:
  worker processes (embed.map_batches): read + sha256 + decode + resize/crop  (ahead of ...)
  this process: ResNet50 forward, only for content not already in the database  (while ...)
  a writer thread: binary COPY into a temp table, one INSERT ... ON CONFLICT (path) DO UPDATE,
  commit. A crash loses at most the batches in flight; a re-run completes the job.

Incremental: a file whose path, size and mtime match its row is not even opened; content already
in the database under another path (same sha256) reuses that row's vector; `prune` deletes rows
whose files are gone. Table names are unqualified and `search_path` picks the schema, so
`vecsearch eval` can load into a scratch schema with its own `images` and `embedding_model`.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from . import db, models
from .config import Settings
from .errors import InvalidInput, UnreadableImage
from .images import find_images, model_input, open_decoded, sha256_of
from .progress import Progress, as_progress

COLUMNS = ("path", "sha256", "bytes", "width", "height", "format", "mtime", "embedding")
COPY_TYPES = ("text", "text", "int8", "int4", "int4", "text", "timestamptz", "vector")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# While a bulk load has the HNSW index dropped, the table's comment holds its definition, so the
# next load recreates exactly that index even if this one is killed (one definition: the
# migration's, as pg_get_indexdef read it back).
DROPPED_MARK = "vecsearch: HNSW index dropped for a bulk load; the next `vecsearch load` recreates it. "
# One lock per images table (per schema) for whoever drops/rebuilds its HNSW index.
LOCK_KEY = "hashtextextended('vecsearch.hnsw.' || 'images'::regclass::oid, 0)"
WRITE_QUEUE = 4  # batches waiting for the writer: bounds memory, keeps the model busy
RETRIES = 5  # deadlocks with a concurrent load on overlapping rows are retried


@dataclass
class LoadSummary:
    """What a load did. found == new + updated + unchanged + len(failed)."""

    found: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicate: int = 0  # new or updated rows whose content was already embedded (vector reused)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    pruned: int = 0
    embedded: int = 0  # images that went through the model
    index_rebuilt: bool = False
    interrupted: bool = False
    seconds: float = 0.0
    decode_wait: float = 0.0  # seconds the model sat waiting for decoded files (more --workers?)
    errors_csv_error: str | None = None  # why the --errors file could not be written

    @property
    def exit_code(self) -> int:
        """0 all loaded, 2 some files skipped as unreadable, 130 interrupted (Ctrl-C)."""
        return 130 if self.interrupted else 1 if self.errors_csv_error else 2 if self.failed else 0

    def describe(self) -> str:
        rate = f", {self.embedded / self.seconds:.1f} images/s" if self.embedded and self.seconds else ""
        text = (f"found {self.found}, new {self.new}, updated {self.updated}, unchanged {self.unchanged}, "
                f"duplicate content {self.duplicate}, failed {len(self.failed)}, pruned {self.pruned} "
                f"(embedded {self.embedded} images in {self.seconds:.1f} s{rate})")
        return ("interrupted: " + text) if self.interrupted else text


def connect(settings: Settings, schema: str = "public") -> psycopg.Connection:
    """A db.connect connection whose unqualified `images`/`embedding_model` are in `schema`."""
    conn = db.connect(settings)
    set_schema(conn, schema)
    # Names this process, so a later load can tell a session that outlived its load (below).
    conn.execute(sql.SQL("SET application_name = {}").format(sql.Literal(_application_name())))
    # If this process dies (SIGKILL, OOM), its backend notices within seconds, even inside a long
    # CREATE INDEX or a lock wait, and rolls back, releasing the HNSW advisory lock for the next
    # load, instead of finishing the work for nobody. PostgreSQL 14+; older servers skip it.
    try:
        conn.execute("SET client_connection_check_interval = '2s'")
    except psycopg.errors.UndefinedObject:
        pass
    return conn


def set_schema(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))


def load(settings: Settings, folder: str | os.PathLike, embedder, *, prune: bool = False,
         reembed: bool = False, schema: str = "public",
         progress: Progress | Callable[[int, int], None] | None = None,
         errors_csv: str | os.PathLike | None = None, workers: int | None = None) -> LoadSummary:
    """Load every image under `folder` into `schema`.images, embedded by `embedder` (embed.Embedder).

    reembed: re-embed every row of the table (also outside `folder`), the way to switch models;
    rows whose files cannot be re-embedded are then deleted, so no two vector spaces mix.
    progress: a progress.Progress, or a plain `fn(done, total)` callback.
    errors_csv: write the skipped files there as CSV (path, reason).
    workers: decode processes (default embed.default_workers(); 0 decodes in this process).
    Raises SchemaMismatch when the database was built with another model (and not `reembed`).
    """
    started = time.monotonic()
    report = as_progress(progress)
    summary = LoadSummary()
    errors_file = None if errors_csv is None else _open_errors(errors_csv)  # fail before the work
    with connect(settings, schema) as conn:
        run_start = conn.execute("SELECT now()").fetchone()[0]
        current = models.recorded_model(conn)
        model_changed = reembed and current is not None and current != embedder.record
        if not reembed and current not in (None, embedder.record):
            models.ensure_model(conn, embedder.record)  # refuses (or replaces on an empty table)

        found = find_images(folder)
        root = os.path.abspath(os.fspath(folder))
        for path, reason in found.failed:
            _fail(summary, report, path, reason)
        existing = _existing(conn, None if reembed else root)
        to_read: list[str] = []
        for c in found.files:
            if not reembed and existing.get(c.path) == (c.size, c.mtime_ns // 1000):
                summary.unchanged += 1
            else:
                to_read.append(c.path)
        if reembed:  # every row of the table, not only those under `folder`
            discovered = {c.path for c in found.files}
            to_read += sorted(p for p in existing if p not in discovered and os.path.isfile(p))
        summary.found = len(found.failed) + summary.unchanged + len(to_read)
        report.message(f"found {summary.found} image file{'' if summary.found == 1 else 's'} in {root}: "
                       f"{len(to_read)} to read, {summary.unchanged} unchanged")

        index = _Index(conn, report)
        additions = sum(1 for p in to_read if p not in existing)
        rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
        try:
            if to_read:
                embedder.prepare()  # fetch the weights before touching the table: fail early
            if not model_changed:
                models.ensure_model(conn, embedder.record)
            index.begin(bulk=additions > rows, additions=additions)
            if to_read:
                try:
                    _Pipeline(settings, schema, embedder, report, summary,
                              reuse_since=run_start if reembed else None).run(to_read, workers)
                except KeyboardInterrupt:
                    summary.interrupted = True
            if not summary.interrupted:
                if prune:
                    summary.pruned += _prune(conn, root, {c.path for c in found.files}, report)
                if model_changed:
                    summary.pruned += _finish_reembed(conn, embedder.record, run_start, report)
            summary.index_rebuilt = index.end()
        except BaseException:
            index.abandon()
            raise
    summary.seconds = time.monotonic() - started
    if errors_file is not None:
        try:
            write_errors(errors_file, summary.failed)
        except OSError as e:  # a full disk, say: the load itself is done and stays done
            summary.errors_csv_error = f"cannot write --errors file {errors_csv}: {e.strerror or e}"
    return summary


def _open_errors(path: str | os.PathLike):
    try:
        return open(path, "w", newline="", encoding="utf-8")
    except OSError as e:
        raise InvalidInput(f"cannot write --errors file {path}: {e.strerror or e}") from e


def write_errors(file, failed: Iterable[tuple[str, str]]) -> None:
    """CSV (path, reason) of the skipped files into an open text file, which is then closed."""
    with file:
        writer = csv.writer(file)
        writer.writerow(["path", "reason"])
        writer.writerows(failed)


def _fail(summary: LoadSummary, report: Progress, path: str, reason: str) -> None:
    summary.failed.append((path, reason))
    report.failed(path, reason)


def _prefix(root: str) -> str:
    return root if root.endswith(os.sep) else root + os.sep


def _existing(conn: psycopg.Connection, root: str | None) -> dict[str, tuple[int, int]]:
    """{path: (bytes, mtime in microseconds)} of the rows under `root` (None: all rows)."""
    rows = conn.execute(
        "SELECT path, bytes, (extract(epoch FROM mtime) * 1000000)::bigint FROM images "
        "WHERE %(prefix)s::text IS NULL OR starts_with(path, %(prefix)s)",
        {"prefix": None if root is None else _prefix(root)})
    return {path: (size, mtime) for path, size, mtime in rows}


def _prune(conn: psycopg.Connection, root: str, discovered: set[str], report: Progress) -> int:
    """Delete the rows under `root` whose files are gone."""
    gone = [id_ for id_, path in conn.execute(
        "SELECT id, path FROM images WHERE starts_with(path, %s)", [_prefix(root)])
        if path not in discovered and not os.path.exists(path)]
    if gone:
        conn.execute("DELETE FROM images WHERE id = ANY(%s)", [gone])
        report.message(f"pruned {len(gone)} rows whose files are gone")
    return len(gone)


def _finish_reembed(conn: psycopg.Connection, record: models.ModelRecord, run_start: datetime,
                    report: Progress) -> int:
    """After a model switch: drop rows not re-embedded, then record the new model, atomically."""
    with conn.transaction():
        stale = conn.execute("DELETE FROM images WHERE loaded_at < %s", [run_start]).rowcount
        models.ensure_model(conn, record, reembed=True)
    if stale:
        report.message(f"removed {stale} rows whose files could not be re-embedded with the new model")
    report.message(f"model is now {record.describe()}")
    return stale


# -- the HNSW index around a bulk load ---------------------------------------------------------


class _Index:
    """Drops the HNSW index for a bulk load and rebuilds it after, or restores one a killed load left.

    Whoever manages the index holds a session advisory lock: a concurrent load neither drops it
    again nor "restores" it under a running bulk load; a killed one releases it with its session.
    """

    def __init__(self, conn: psycopg.Connection, report: Progress) -> None:
        self.conn, self.report = conn, report
        self.locked = False
        self.definition: str | None = None  # set while this load owes the table its index

    def _lock(self) -> bool:
        take = f"SELECT pg_try_advisory_lock({LOCK_KEY})"
        self.locked = self.conn.execute(take).fetchone()[0]
        if not self.locked and _end_orphaned_holders(self.conn):
            self.locked = self.conn.execute(take).fetchone()[0]
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
            return
        if bulk and self._lock():
            name, definition = present
            previous = self.conn.execute(
                "SELECT obj_description('images'::regclass, 'pg_class')").fetchone()[0]
            mark = DROPPED_MARK + json.dumps({"index": definition, "previous_comment": previous})
            with self.conn.transaction():
                self.conn.execute(sql.SQL("COMMENT ON TABLE images IS {}").format(sql.Literal(mark)))
                self.conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(*name)))
            self.definition = definition
            self.report.message(f"bulk load ({additions} new rows): HNSW index dropped, rebuilt after "
                                "the rows are in (much faster than inserting into the graph)")
        elif bulk:
            self.report.message("another load manages the HNSW index: inserting into it")

    def end(self) -> bool:
        """Rebuild the index if this load owes it; True if it did."""
        try:
            if self.definition is None:
                return False
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


def _application_name() -> str:
    return f"vecsearch load {socket.gethostname()[:30]}:{os.getpid()}"


def _end_orphaned_holders(conn: psycopg.Connection) -> bool:
    """End sessions holding the index lock for a load of this machine whose process is gone.

    The server ends a dead client's session by itself once its socket closes; this covers a socket
    that something else still holds open (a leftover child process, say). True if any ended.
    """
    from .server import pid_alive

    holders = conn.execute(f"""
        SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
              SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.objsubid = 1 AND (l.classid::bigint << 32) | l.objid::bigint = {LOCK_KEY}
    """).fetchall()
    ended = False
    prefix = f"vecsearch load {socket.gethostname()[:30]}:"
    for backend, name in holders:
        pid = name.removeprefix(prefix)
        if name.startswith(prefix) and pid.isdigit() and not pid_alive(int(pid)):
            ended |= conn.execute("SELECT pg_terminate_backend(%s, 10000)", [backend]).fetchone()[0]
    return ended


def hnsw_index(conn: psycopg.Connection) -> tuple[tuple[str, str], str] | None:
    """((schema, name), definition) of the HNSW index on `images` (found by access method, so a
    copy made with LIKE ... INCLUDING ALL under another name counts too), or None."""
    row = conn.execute("""
        SELECT n.nspname, c.relname, pg_get_indexdef(c.oid)
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_am a ON a.oid = c.relam
        WHERE i.indrelid = 'images'::regclass AND a.amname = 'hnsw'
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


def rebuild_index(conn: psycopg.Connection, definition: str, report: Progress) -> None:
    """CREATE INDEX `definition` with memory for the whole graph and parallel workers."""
    rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    # pgvector keeps the graph in maintenance_work_mem while it fits (far faster): ~5 KB per
    # 2048-d halfvec element with its neighbour lists.
    mem_mb = int(min(max(64, rows * 6 / 1024 + 64), _memory_cap_mb()))
    workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    report.message(f"building the HNSW index on {rows} rows (maintenance_work_mem {mem_mb}MB, "
                   f"{workers} parallel worker{'' if workers == 1 else 's'})...")
    started = time.monotonic()
    stored = dropped_definition(conn)
    for attempt_workers in (workers, 0):
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(
                    sql.Literal(f"{mem_mb}MB")))
                conn.execute(sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(
                    sql.Literal(attempt_workers)))
                if hnsw_index(conn) is None:
                    conn.execute(definition)
                previous = stored[1] if stored else None
                conn.execute(sql.SQL("COMMENT ON TABLE images IS {}").format(sql.Literal(previous)))
            break
        except (psycopg.errors.DiskFull, psycopg.errors.OutOfMemory) as e:
            # Parallel builds share maintenance_work_mem through /dev/shm, which containers keep small.
            if attempt_workers == 0:
                raise
            report.message(f"parallel index build failed ({str(e).strip().splitlines()[0]}): "
                           "building without parallel workers")
    report.message(f"HNSW index built in {time.monotonic() - started:.1f} s")


def _memory_cap_mb() -> float:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        total = 8192
    return min(total / 4, 16384)


# -- the pipeline ------------------------------------------------------------------------------


def _open_nonblocking(path: str, flags: int) -> int:
    # A FIFO that replaced a file since discovery must not block the load: opened without
    # waiting for a writer, it is then refused as "not a regular file".
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


class _Reader:
    """Runs in the decode workers: one file -> its row fields and 224x224x3 pixels, or a reason.

    Content already in the database (sha256) is not decoded at all: the row reuses its vector.
    """

    def __init__(self, url: str, schema: str, reuse_since: datetime | None) -> None:
        self.url, self.schema, self.reuse_since = url, schema, reuse_since
        self._conn: psycopg.Connection | None = None

    def __getstate__(self) -> dict:  # spawn-started workers open their own connection
        return {**self.__dict__, "_conn": None}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _known(self, sha: str) -> bool:
        if self._conn is None:
            self._conn = psycopg.connect(self.url, autocommit=True)
            set_schema(self._conn, self.schema)
            import multiprocessing
            import multiprocessing.util

            if multiprocessing.parent_process() is not None:  # a worker: close it when it exits
                multiprocessing.util.Finalize(self, self.close, exitpriority=10)
        return self._conn.execute(
            "SELECT EXISTS (SELECT 1 FROM images WHERE sha256 = %s "
            "AND (%s::timestamptz IS NULL OR loaded_at >= %s))",
            [sha, self.reuse_since, self.reuse_since]).fetchone()[0]

    def __call__(self, path: str, decode: bool | None = None) -> dict[str, Any]:
        item: dict[str, Any] = {"path": path}
        try:
            with open(path, "rb", opener=_open_nonblocking) as f:
                before = os.fstat(f.fileno())
                if not stat.S_ISREG(before.st_mode):
                    raise UnreadableImage("not a regular file")
                if before.st_size == 0:
                    raise UnreadableImage("empty file (0 bytes)")
                item["sha256"] = sha256_of(f)
                item["bytes"] = before.st_size
                item["mtime"] = EPOCH + timedelta(microseconds=before.st_mtime_ns // 1000)
                if decode is None and self._known(item["sha256"]):
                    return item  # no pixels: the writer copies the existing vector
                f.seek(0)
                decoded = open_decoded(f)
                item.update(width=decoded.width, height=decoded.height, format=decoded.format,
                            pixels=model_input(decoded.image))
                after = os.fstat(f.fileno())
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                    raise UnreadableImage("the file changed while it was being read: load again")
        except UnreadableImage as e:
            item["error"] = str(e)
        except FileNotFoundError:
            item["error"] = "the file vanished during the load"
        except OSError as e:
            item["error"] = e.strerror or str(e)
        return item


class _Writer(threading.Thread):
    """Writes embedded batches in order on its own connection, one transaction per batch."""

    def __init__(self, settings: Settings, schema: str, reuse_since: datetime | None,
                 summary: LoadSummary, report: Progress) -> None:
        super().__init__(name="vecsearch-writer", daemon=True)
        self.conn = connect(settings, schema)
        self.conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS vecsearch_stage (path text, sha256 text, bytes bigint, "
            "width integer, height integer, format text, mtime timestamptz, embedding vector(2048)) "
            "ON COMMIT DELETE ROWS")
        self.reuse_since, self.summary, self.report = reuse_since, summary, report
        self.queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.pending: dict[str, int] = {}  # sha256 -> rows queued but not committed yet

    def in_flight(self, shas: Iterable[str]) -> set[str]:
        with self.lock:
            return {s for s in shas if s in self.pending}

    def put(self, rows: list[dict[str, Any]]) -> None:
        with self.lock:
            for row in rows:
                self.pending[row["sha256"]] = self.pending.get(row["sha256"], 0) + 1
        self._put(rows)

    def _put(self, item: Any) -> None:
        while True:
            self.check()
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is queued, stop, and raise the writer's error if it had one."""
        try:
            if self.is_alive():
                self._put(None)
                self.join()
            self.check()
        finally:
            self.conn.close()

    def run(self) -> None:
        try:
            while (rows := self.queue.get()) is not None:
                self._write(rows)
        except BaseException as e:
            self.error = e

    def _write(self, rows: list[dict[str, Any]]) -> None:
        for attempt in range(RETRIES):
            try:
                with self.conn.transaction():
                    returned = self._insert(rows)
                break
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))
        with self.lock:
            for row in rows:
                left = self.pending.pop(row["sha256"]) - 1
                if left:
                    self.pending[row["sha256"]] = left
        for row in rows:
            inserted = returned.get(row["path"])
            if inserted is None:  # a reused vector's row was deleted meanwhile (a concurrent prune)
                _fail(self.summary, self.report, row["path"],
                      "its content's earlier copy was removed during the load: load again")
                continue
            if inserted:
                self.summary.new += 1
            else:
                self.summary.updated += 1
            self.summary.duplicate += row["duplicate"]

    def _insert(self, rows: list[dict[str, Any]]) -> dict[str, bool]:
        cur = self.conn.cursor()
        with cur.copy(f"COPY vecsearch_stage ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(COPY_TYPES)
            for row in rows:
                copy.write_row([row.get(c) for c in COLUMNS])
        # A row without a vector takes it (and its pixel size) from a row with the same content.
        cur.execute("""
            INSERT INTO images AS i (path, sha256, bytes, width, height, format, mtime, embedding)
            SELECT s.path, s.sha256, s.bytes, coalesce(s.width, d.width), coalesce(s.height, d.height),
                   coalesce(s.format, d.format), s.mtime, coalesce(s.embedding, d.embedding)
            FROM vecsearch_stage s
            LEFT JOIN LATERAL (
                SELECT width, height, format, embedding FROM images
                WHERE s.embedding IS NULL AND sha256 = s.sha256
                  AND (%(since)s::timestamptz IS NULL OR loaded_at >= %(since)s)
                LIMIT 1) d ON true
            WHERE s.embedding IS NOT NULL OR d.embedding IS NOT NULL
            ORDER BY s.path
            ON CONFLICT (path) DO UPDATE SET
                sha256 = EXCLUDED.sha256, bytes = EXCLUDED.bytes, width = EXCLUDED.width,
                height = EXCLUDED.height, format = EXCLUDED.format, mtime = EXCLUDED.mtime,
                embedding = EXCLUDED.embedding, loaded_at = now()
            RETURNING i.path, (i.xmax = 0)
        """, {"since": self.reuse_since})
        return dict(cur.fetchall())


class _Pipeline:
    def __init__(self, settings: Settings, schema: str, embedder, report: Progress,
                 summary: LoadSummary, reuse_since: datetime | None) -> None:
        self.settings, self.schema, self.embedder = settings, schema, embedder
        self.report, self.summary, self.reuse_since = report, summary, reuse_since
        self.reader = _Reader(db.database_url(settings), schema, reuse_since)

    def run(self, paths: list[str], workers: int | None) -> None:
        from .embed import default_workers, map_batches

        workers = default_workers() if workers is None else workers
        self.report.start(len(paths))
        # The decode workers are forked first, before this process starts any thread.
        batches = map_batches(self.reader, paths, batch_size=self.embedder.batch_size, workers=workers)
        writer = None
        try:
            with connect(self.settings, self.schema) as conn:
                writer = _Writer(self.settings, self.schema, self.reuse_since, self.summary, self.report)
                writer.start()
                while True:
                    waiting = time.monotonic()
                    batch = next(batches, None)
                    self.summary.decode_wait += time.monotonic() - waiting
                    if batch is None:
                        break
                    writer.check()
                    rows, embedded = self._embed(conn, writer, batch)
                    if rows:
                        writer.put(rows)
                    self.report.advance(len(batch), embedded)
        finally:
            batches.close()
            self.reader.close()
            try:
                if writer is not None:
                    writer.close()
            finally:
                self.report.stop()

    def _embed(self, conn: psycopg.Connection, writer: _Writer,
               batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Embed the batch's new content (once per sha256); rows with known content get no vector."""
        good = []
        for item in batch:
            if "error" in item:
                _fail(self.summary, self.report, item["path"], item["error"])
            else:
                good.append(item)
        shas = {item["sha256"] for item in good}
        # In flight first, then the database: a batch the writer commits in between is in one of them.
        known = writer.in_flight(shas)
        known |= {s for (s,) in conn.execute(
            "SELECT DISTINCT sha256 FROM images WHERE sha256 = ANY(%s) "
            "AND (%s::timestamptz IS NULL OR loaded_at >= %s)",
            [list(shas - known), self.reuse_since, self.reuse_since])}
        groups: dict[str, list[dict[str, Any]]] = {}
        rows = []
        for item in good:
            if item["sha256"] in known:
                item["duplicate"] = True
                item.pop("pixels", None)
                rows.append(item)
                continue
            if "pixels" not in item:  # the worker saw it in the database; it is gone since
                item = self.reader(item["path"], decode=True)
                if "error" in item:
                    _fail(self.summary, self.report, item["path"], item["error"])
                    continue
            groups.setdefault(item["sha256"], []).append(item)
        if groups:
            firsts = [group[0] for group in groups.values()]
            import numpy as np

            vectors = self.embedder.embed_arrays(np.stack([f.pop("pixels") for f in firsts]))
            self.summary.embedded += len(firsts)
            for group, vector in zip(groups.values(), vectors, strict=True):
                for n, item in enumerate(group):
                    item.pop("pixels", None)
                    item["embedding"], item["duplicate"] = vector, n > 0
                    rows.append(item)
        return rows, len(groups)
