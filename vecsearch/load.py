"""`vecsearch load DIR`: find image files, embed what is new or changed, write it in batches.

Incremental: a file whose path, size and mtime match its row is not even opened; content already
in the database under another path (same sha256) reuses that row's vector; `prune` deletes rows
whose files are gone. The embedding and writing is vecsearch/pipeline.py's; the HNSW index around
a bulk load is vecsearch/hnsw.py's.
"""

from __future__ import annotations

import csv
import hashlib
import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime

import psycopg

from . import models, sessions
from .config import Settings
from .errors import DatabaseBusy, InvalidInput
from .hnsw import BulkLoadIndex
from .images import Found, find_images, find_some
from .paths import directory_prefix
from .pipeline import LoadSummary, Pipeline, connect, fail
from .pipeline import reread_metadata as read_metadata_of
from .progress import Progress, as_progress

__all__ = ["LoadSummary", "connect", "load", "write_errors"]


def load(settings: Settings, folder: str | os.PathLike, embedder, *, prune: bool = False,
         reembed: bool = False, schema: str = "public",
         progress: Progress | Callable[[int, int], None] | None = None,
         errors_csv: str | os.PathLike | None = None, workers: int | None = None,
         shard: tuple[int, int] | None = None, paths: Iterable[str] | None = None,
         reread_metadata: bool = False) -> LoadSummary:
    """Load every image under `folder` into `schema`.images, embedded by `embedder` (embed.Embedder).

    reembed: re-embed every row of the table (also outside `folder`), the way to switch models;
    rows whose files cannot be re-embedded are then deleted, so no two vector spaces mix.
    progress: a progress.Progress, or a plain `fn(done, total)` callback.
    errors_csv: write the skipped files there as CSV (path, reason).
    workers: decode processes (default embed.default_workers(); 0 decodes in this process).
    shard: (K, N) loads only the files of share K of N (1-based, by a hash of the path), so N
    loaders on N machines split one folder; prune then deletes only rows of that share.
    paths: only these files and folders under `folder` (what `load --watch` saw change), so a
    sync costs what changed, not a walk of the tree; `prune` then checks only rows at or under them.
    Unchanged files whose photo metadata is not current (rows from before migration 0009; every
    row with `reread_metadata`) have their metadata read again, without re-embedding.
    Raises SchemaMismatch when the database was built with another model (and not `reembed`).
    """
    scope = None if paths is None else sorted({os.path.abspath(os.fspath(p)) for p in paths})
    if scope is not None and reembed:
        raise InvalidInput("--reembed re-reads every row: it cannot be limited to some paths")
    if shard is not None:
        check_shard(shard)
        if reembed:
            raise InvalidInput("--reembed cannot be split with --shard: a model switch is one load "
                               "(run it without --shard)")
    started = time.monotonic()
    report = as_progress(progress)
    summary = LoadSummary()
    errors_file = None if errors_csv is None else _open_errors(errors_csv)  # fail before the work
    with connect(settings, schema) as conn:
        # Held shared while the load runs: a restore (which takes it exclusively) is refused meanwhile.
        if not sessions.try_lock(conn, sessions.LOAD_LOCK, shared=True):
            holders = sessions.describe_holders(conn, sessions.LOAD_LOCK)
            raise DatabaseBusy(f"a `vecsearch db restore` is running ({holders}): load again when it "
                               "has finished")
        run_start = conn.execute("SELECT now()").fetchone()[0]
        current = models.recorded_model(conn)
        model_changed = reembed and current is not None and current != embedder.record
        if not reembed and current not in (None, embedder.record):
            models.ensure_model(conn, embedder.record)  # refuses (or replaces on an empty table)

        found = find_images(folder) if scope is None else find_some(folder, scope)
        if shard is not None:
            found = Found([c for c in found.files if in_share(c.path, shard)],
                          [f for f in found.failed if in_share(f[0], shard)], found.unlisted)
        root = os.path.abspath(os.fspath(folder))
        existing = _existing(conn, None if reembed else root, scope)
        to_read = _to_read(found, existing, reembed, summary, report)
        stale = _metadata_stale(conn, root, found, set(to_read), reread_metadata)
        share = "" if shard is None else f" (share {shard[0]}/{shard[1]})"
        report.message(f"found {summary.found} image file{'' if summary.found == 1 else 's'} in "
                       f"{root}{share}: {len(to_read)} to read, {summary.unchanged} unchanged"
                       + (f" ({len(stale)} of them to read the metadata of)" if stale else ""))
        index = BulkLoadIndex(conn, report)
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
                    Pipeline(settings, schema, embedder, report, summary,
                             reuse_since=run_start if reembed else None).run(to_read, workers)
                except KeyboardInterrupt:
                    summary.interrupted = True
            if stale and not summary.interrupted:
                try:
                    read_metadata_of(conn, stale, summary, report)
                except KeyboardInterrupt:
                    summary.interrupted = True
            if not summary.interrupted:
                if prune:
                    summary.pruned += _prune(conn, root, found, report, shard, scope)
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


def _to_read(found: Found, existing: dict[str, tuple[int, int]], reembed: bool, summary: LoadSummary,
             report: Progress) -> list[str]:
    """The files to read: new or changed (path, size and mtime); with `reembed`, every row's file."""
    for path, reason in found.failed:
        fail(summary, report, path, reason)
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
    return to_read


def _metadata_stale(conn: psycopg.Connection, root: str, found: Found, to_read: set[str],
                    every: bool) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of the unchanged files whose row's metadata is not of this
    vecsearch's EXIF reading (exif.VERSION; NULL: loaded before migration 0009), or all of them
    with `every`. Only the stale rows are fetched: after the first load there are none."""
    from . import exif

    unchanged = [c for c in found.files if c.path not in to_read]
    if not every and unchanged:
        prefix = root if root.endswith(os.sep) else root + os.sep
        stale = {p for (p,) in conn.execute(
            "SELECT path FROM images WHERE starts_with(path, %s) "
            "AND metadata_version IS DISTINCT FROM %s", [prefix, exif.VERSION])}
        unchanged = [c for c in unchanged if c.path in stale]
    return [(c.path, c.size, c.mtime_ns) for c in unchanged]


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


_IN_SCOPE = ("(%(scope)s::text[] IS NULL OR path = ANY(%(scope)s) "
             "OR EXISTS (SELECT FROM unnest(%(dirs)s::text[]) d WHERE starts_with(path, d)))")


def _scope(scope: list[str] | None) -> dict:
    return {"scope": scope, "dirs": None if scope is None else [directory_prefix(p) for p in scope]}


def _existing(conn: psycopg.Connection, root: str | None,
              scope: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """{path: (bytes, mtime in microseconds)} of the rows under `root` (None: all rows), at or
    under the paths of `scope` when given."""
    rows = conn.execute(
        "SELECT path, bytes, (extract(epoch FROM mtime) * 1000000)::bigint FROM images "
        "WHERE (%(prefix)s::text IS NULL OR starts_with(path, %(prefix)s)) AND " + _IN_SCOPE,
        {"prefix": None if root is None else directory_prefix(root), **_scope(scope)})
    return {path: (size, mtime) for path, size, mtime in rows}


def check_shard(shard: tuple[int, int]) -> None:
    k, n = shard
    if not 1 <= k <= n:
        raise InvalidInput(f"--shard {k}/{n}: K must be from 1 to N (the loaders are 1/{n} to {n}/{n})")


def in_share(path: str, shard: tuple[int, int]) -> bool:
    """Whether `path` (absolute) belongs to share K of N: the first 8 bytes of its SHA-256, mod N.
    The same on every machine, Python and run; a file keeps its share while its path stays."""
    k, n = shard
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n == k - 1


def _prune(conn: psycopg.Connection, root: str, found: Found, report: Progress,
           shard: tuple[int, int] | None = None, scope: list[str] | None = None) -> int:
    """Delete the rows under `root` (of this share; at or under `scope`'s paths when given)
    whose files are known to be gone.

    Known gone: not found by the walk, not under a folder the walk could not list, and stat says
    the path does not exist (ENOENT or ENOTDIR). Any other answer (permission denied, I/O error,
    a share that timed out) keeps the row: a prune must never delete the row of a living file.
    """
    discovered = {c.path for c in found.files}
    unlisted = tuple(directory_prefix(d) for d in found.unlisted)
    gone, kept = [], 0
    for id_, path in conn.execute("SELECT id, path FROM images WHERE starts_with(path, %(root)s) AND "
                                  + _IN_SCOPE, {"root": directory_prefix(root), **_scope(scope)}):
        if path in discovered or (shard is not None and not in_share(path, shard)):
            continue
        if path.startswith(unlisted) or not _known_gone(path):
            kept += 1
        else:
            gone.append(id_)
    if kept:
        report.message(f"kept {kept} row{'' if kept == 1 else 's'} whose files could not be checked "
                       "(a folder that could not be listed, or a stat error): not pruned")
    if gone:
        conn.execute("DELETE FROM images WHERE id = ANY(%s)", [gone])
        report.message(f"pruned {len(gone)} rows whose files are gone")
    return len(gone)


def _known_gone(path: str) -> bool:
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False  # it exists (a hidden folder's file, say, which the walk skips)


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
