"""What a long job (load, dupes, eval) reports while it runs: one protocol, `Progress`.

A job goes through stages ("load", "dupes", "prepare", "query"...), each started with its
total and advanced as items are done; a load also reports messages and skipped files. The CLI
shows a rich bar on a terminal and plain lines otherwise; a library caller may pass a plain
`fn(done, total)` instead (`as_progress`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from .output import printable


class Progress:
    """The hooks a long job calls; this base class says nothing at all."""

    def message(self, text: str) -> None:
        """A phase worth telling (files found, index dropped or rebuilt)."""

    def start(self, total: int, stage: str = "load") -> None:
        """A stage begins: `total` items (files, images, queries) to do."""

    def advance(self, files: int, images: int = 0) -> None:
        """`files` more items done (for a load, `images` of them embedded by the model)."""

    def failed(self, path: str, reason: str) -> None:
        """A file was skipped."""

    def warned(self, path: str, reason: str) -> None:
        """A file was loaded, but some of what it holds was not (bad EXIF values, say)."""

    def stop(self) -> None:
        """The reading is over (also after an interruption)."""


class Callback(Progress):
    """Adapts a plain `fn(done, total)` callback (what library callers usually want)."""

    def __init__(self, fn: Callable[[int, int], None]) -> None:
        self.fn, self.done, self.total = fn, 0, 0

    def start(self, total: int, stage: str = "load") -> None:
        self.total, self.done = total, 0
        self.fn(0, total)

    def advance(self, files: int, images: int = 0) -> None:
        self.done += files
        self.fn(self.done, self.total)


def as_progress(progress: Progress | Callable[[int, int], None] | None) -> Progress:
    if progress is None:
        return Progress()
    if isinstance(progress, Progress):
        return progress
    return Callback(progress)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _Counting(Progress):
    def __init__(self) -> None:
        self.total = self.done = self.images = 0
        self.started = time.monotonic()

    def start(self, total: int, stage: str = "load") -> None:
        self.total, self.done, self.images, self.started = total, 0, 0, time.monotonic()

    def advance(self, files: int, images: int = 0) -> None:
        self.done += files
        self.images += images

    def rates(self) -> tuple[float, str]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        left = self.total - self.done
        eta = _duration(left * elapsed / self.done) if self.done and left else "-"
        return self.images / elapsed, eta


class Lines(_Counting):
    """Plain lines for logs and pipes: phases, failures, and a status line every `interval` s."""

    def __init__(self, file: TextIO | None = None, interval: float = 10.0, quiet: bool = False) -> None:
        super().__init__()
        self.file, self.interval, self.quiet = file or sys.stderr, interval, quiet
        self.last = 0.0

    def _print(self, text: str) -> None:
        print(printable(text), file=self.file, flush=True)

    def message(self, text: str) -> None:
        if not self.quiet:
            self._print(text)

    def advance(self, files: int, images: int = 0) -> None:
        super().advance(files, images)
        now = time.monotonic()
        if not self.quiet and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            rate, eta = self.rates()
            self._print(f"{self.done}/{self.total} files, {rate:.1f} images/s, ETA {eta}")

    def failed(self, path: str, reason: str) -> None:
        self._print(f"skipped {path}: {reason}")

    def warned(self, path: str, reason: str) -> None:
        self._print(f"warning: {path}: {reason}")


class Bar(_Counting):
    """A rich progress bar per stage (files, images/s while embedding, ETA), transient; messages,
    skipped files and warnings print above it. Loads, dupes and eval show this one."""

    def __init__(self, console) -> None:
        super().__init__()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                            console=console, transient=True)
        self.task = None

    def message(self, text: str) -> None:
        self.console.print(printable(text), markup=False, highlight=False)

    def start(self, total: int, stage: str = "load") -> None:
        super().start(total)
        self.task = self.bar.add_task("loading" if stage == "load" else stage, total=total, rate="")
        self.bar.start()

    def advance(self, files: int, images: int = 0) -> None:
        super().advance(files, images)
        rate, _ = self.rates()
        self.bar.update(self.task, advance=files, rate=f"files  {rate:.1f} images/s" if self.images else "")

    def failed(self, path: str, reason: str) -> None:
        self.console.print(printable(f"skipped {path}: {reason}"), markup=False, highlight=False)

    def warned(self, path: str, reason: str) -> None:
        self.console.print(printable(f"warning: {path}: {reason}"), markup=False, highlight=False)

    def stop(self) -> None:
        self.bar.stop()


def for_terminal(console, quiet: bool = False) -> Progress:
    """A bar on a terminal, plain lines otherwise; with `quiet` only the skipped files."""
    if console.is_terminal and not quiet:
        return Bar(console)
    return Lines(console.file, quiet=quiet)
