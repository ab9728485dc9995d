"""`vecsearch load DIR --watch`: keep the database equal to a folder as files come, change and go.

One implementation of loading: every sync is a `load.load(..., prune=True)`, first of the whole
folder (which also finishes whatever a killed watcher or load left), then of the paths the
file-system events named, once they have settled: no event for `settle` seconds and the same size
and mtime on two looks that far apart, so a file still being copied in is not read half-done.
Crash safety and per-file reasons are load's; a vanished file is pruned only when stat says it
is gone. Events come from watchdog (inotify on Linux, FSEvents, ReadDirectoryChangesW), or from
its polling observer where the kernel refuses more watches.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Settings
from .images import find_images
from .load import load, write_errors
from .pipeline import LoadSummary
from .progress import Progress

SETTLE = 1.0  # seconds without events, and with the same size and mtime, before a path is read
# An event kind that says nothing changed (our own reads open and close files too).
_IGNORED = frozenset({"opened", "closed_no_write"})


@dataclass
class WatchSummary:
    """What a watch did, all syncs together (the one line printed when it stops)."""

    folder: str
    syncs: int = 0
    new: int = 0
    updated: int = 0
    duplicate: int = 0
    pruned: int = 0
    failing: dict[str, str] = field(default_factory=dict)  # path -> reason, as of the last sync
    interrupted: bool = False  # stopped inside a sync: a re-run finishes it
    observer: str = ""

    def add(self, s: LoadSummary, scope: list[str] | None) -> None:
        self.syncs += 1
        self.new, self.updated = self.new + s.new, self.updated + s.updated
        self.duplicate, self.pruned = self.duplicate + s.duplicate, self.pruned + s.pruned
        self.interrupted = s.interrupted
        if scope is None:
            self.failing.clear()
        else:  # paths of this sync that no longer fail
            dirs = tuple(p.rstrip(os.sep) + os.sep for p in scope)
            for path in [p for p in self.failing if p in scope or p.startswith(dirs)]:
                del self.failing[path]
        self.failing.update(s.failed)

    @property
    def exit_code(self) -> int:
        """130 stopped inside a sync, 2 some files are failing, else 0 (Ctrl-C is how a watch ends)."""
        return 130 if self.interrupted else 2 if self.failing else 0

    def describe(self) -> str:
        head = "interrupted inside a sync (run again to finish): " if self.interrupted else ""
        return (f"{head}stopped watching {self.folder} after {self.syncs} sync"
                f"{'' if self.syncs == 1 else 's'}: new {self.new}, updated {self.updated}, duplicate "
                f"content {self.duplicate}, pruned {self.pruned}, failing now {len(self.failing)}")


def watch(settings: Settings, folder: str | os.PathLike, embedder, *, progress: Progress | None = None,
          workers: int | None = None, errors_csv: str | os.PathLike | None = None, settle: float = SETTLE,
          stop: threading.Event | None = None,
          on_sync: Callable[[LoadSummary], None] | None = None) -> WatchSummary:
    """Sync `folder` into the database, then follow its changes until Ctrl-C, SIGTERM or `stop`.

    workers: decode processes of each sync (default: none for a few files, whose start would cost
    more than the decoding; load's default for the first sync). errors_csv: rewritten after each
    sync with the files failing now. on_sync: called with each sync's LoadSummary (tests, logs).
    """
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    root = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(root):
        find_images(root)  # raises its own error: no such folder, or not a folder
    summary, events = WatchSummary(root), queue.SimpleQueue()
    report = progress or Progress()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            if event.event_type in _IGNORED or (event.is_directory and event.event_type in
                                                ("modified", "closed")):
                return  # a folder's own mtime: its entries have events of their own
            for path in (event.src_path, getattr(event, "dest_path", "")):
                if path:
                    events.put(os.fsdecode(path))

    syncing = False

    def sync(scope: list[str] | None) -> None:
        nonlocal syncing
        syncing = True
        quiet_workers = workers if workers is not None or scope is None else (
            0 if len(scope) <= 2 * getattr(embedder, "batch_size", 16) else None)
        result = load(settings, root, embedder, prune=True, progress=report, workers=quiet_workers,
                      paths=scope)
        summary.add(result, scope)
        syncing = False
        if errors_csv is not None:
            write_errors(open(errors_csv, "w", newline="", encoding="utf-8"), summary.failing.items())
        if on_sync is not None:
            on_sync(result)

    observer = Observer()
    observer.schedule(Handler(), root, recursive=True)
    try:  # watching starts before the first sync, so nothing changed during it is missed
        observer.start()
        summary.observer = "events"
    except OSError as e:  # inotify's limit on watches (ENOSPC), say
        report.message(f"file-system events unavailable ({e.strerror or e}): polling {root} every second")
        observer = PollingObserver(timeout=1)
        observer.schedule(Handler(), root, recursive=True)
        observer.start()
        summary.observer = "polling"
    previous_term = _stop_on_sigterm()
    pending: dict[str, tuple[float, tuple | None]] = {}  # path -> (due, signature when last seen)
    try:
        sync(None)
        report.message(f"watching {root} for changes (Ctrl-C stops)")
        while not summary.interrupted and not (stop is not None and stop.is_set()):
            try:
                path = events.get(timeout=0.1)
                pending[path] = (time.monotonic() + settle, _signature(path))
                for _ in range(10_000):  # then look at what is due, even under a flood of events
                    path = events.get_nowait()
                    pending[path] = (time.monotonic() + settle, _signature(path))
            except queue.Empty:
                pass
            ready, now = [], time.monotonic()
            for path, (due, seen) in list(pending.items()):
                if now >= due:
                    current = _signature(path)
                    if current == seen:
                        ready.append(path)
                        del pending[path]
                    else:  # still being written
                        pending[path] = (now + settle, current)
            if ready:
                sync(ready)
    except KeyboardInterrupt:
        summary.interrupted = summary.interrupted or syncing or bool(pending)
    finally:
        observer.stop()
        observer.join(5)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return summary


def _signature(path: str) -> tuple | None:
    """Size and mtime of a file (a folder: its kind only; gone: None): equal on two looks = settled."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return ("folder",) if os.path.isdir(path) else (st.st_size, st.st_mtime_ns)


def _stop_on_sigterm():
    """SIGTERM (a service manager's stop) ends the watch as Ctrl-C does; returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)
