"""`vecsearch load DIR --watch` against a real PostgreSQL and real (Pillow-made) images.

In-process: creates, edits, renames (of a file and of a folder), deletes and a slowly written
file, the table checked against the folder after each. As the CLI: Ctrl-C stops with one summary
line; a SIGKILLed watcher loses nothing the next run does not finish (rows and the HNSW index).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from conftest import cli_command, make_image

from vecsearch.hnsw import dropped_definition, hnsw_index
from vecsearch.images import find_images
from vecsearch.progress import Progress
from vecsearch.watch import watch

SETTLE = 0.4


class Failures(Progress):
    def __init__(self) -> None:
        self.failures: list[tuple[str, str]] = []

    def failed(self, path: str, reason: str) -> None:
        self.failures.append((path, reason))


def folder_state(folder: Path) -> dict[str, str]:
    """{path: sha256} of every image file load would find under `folder`."""
    return {c.path: hashlib.sha256(Path(c.path).read_bytes()).hexdigest()
            for c in find_images(folder).files}


def table(url: str) -> dict[str, tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return {p: (i, s) for p, i, s in conn.execute("SELECT path, id, sha256 FROM images")}


def wait_until_equal(url: str, folder: Path, timeout: float = 120, proc=None,
                     unreadable: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """Waits for the table to hold exactly the folder's images (path and content), less the
    `unreadable` ones."""
    deadline = time.monotonic() + timeout
    while True:
        rows, want = table(url), folder_state(folder)
        for path in unreadable:
            want.pop(path, None)
        if {p: s for p, (_, s) in rows.items()} == want:
            return rows
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the watcher exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"table {sorted(rows)} != folder {sorted(want)}")
        time.sleep(0.1)


def test_watch_follows_creates_edits_renames_deletes_and_slow_writes(settings, embedder, tmp_path):
    folder = tmp_path / "photos"
    make_image(folder / "a.png", 1)
    make_image(folder / "b.png", 2)
    make_image(folder / "sub" / "c.png", 3)
    stop, report, syncs = threading.Event(), Failures(), []
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", watch(
        settings, folder, embedder, progress=report, settle=SETTLE, stop=stop, workers=0,
        on_sync=syncs.append)))
    thread.start()
    try:
        url = settings.database_url
        first = wait_until_equal(url, folder)
        assert len(first) == 3

        make_image(folder / "new.png", 4)  # create
        assert len(wait_until_equal(url, folder)) == 4

        a = str(folder / "a.png")
        make_image(folder / "a.png", 5)  # edit: re-embedded in place, same id
        rows = wait_until_equal(url, folder)
        assert rows[a][0] == first[a][0] and rows[a][1] != first[a][1]

        b, b2 = str(folder / "b.png"), str(folder / "renamed.png")
        os.rename(b, b2)  # rename: the new path, the same content, the old row gone
        rows = wait_until_equal(url, folder)
        assert b not in rows and rows[b2][1] == first[b][1]
        embedded = sum(s.embedded for s in syncs)

        os.rename(folder / "sub", folder / "album")  # a folder renamed: its rows move
        rows = wait_until_equal(url, folder)
        assert str(folder / "album" / "c.png") in rows and str(folder / "sub" / "c.png") not in rows
        assert sum(s.embedded for s in syncs) == embedded  # moved content reuses its vectors

        os.remove(folder / "new.png")  # delete
        assert len(wait_until_equal(url, folder)) == 3

        # A file copied in slowly (a chunk every SETTLE/4 s) is read once, whole, never half-done.
        data = make_image(tmp_path / "src" / "slow.png", 6, (640, 480)).read_bytes()
        with open(folder / "slow.png", "wb") as f:
            for start in range(0, len(data), len(data) // 8 + 1):
                f.write(data[start:start + len(data) // 8 + 1])
                f.flush()
                time.sleep(SETTLE / 4)
        rows = wait_until_equal(url, folder)
        assert str(folder / "slow.png") in rows
        assert report.failures == []

        (folder / "broken.jpg").write_text("not a picture")  # load's per-file reason, and no row
        deadline = time.monotonic() + 60
        while not report.failures and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p, _ in report.failures] == [str(folder / "broken.jpg")]
        assert len(wait_until_equal(url, folder, unreadable=(str(folder / "broken.jpg"),))) == 4
    finally:
        stop.set()
        thread.join(60)
    summary = result["summary"]
    assert not summary.interrupted and list(summary.failing) == [str(folder / "broken.jpg")]
    assert summary.exit_code == 2 and summary.pruned >= 3 and summary.new >= 6, summary.describe()


class Watcher:
    """`vecsearch load DIR --watch` in its own process group, as a terminal runs it."""

    def __init__(self, tmp_path: Path, folder: Path, *args: str) -> None:
        self.out, self.err = (tmp_path / f"watch_{time.monotonic_ns()}.{s}" for s in ("out", "err"))
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                cli_command("load", str(folder), "--watch", "--weights", "random", "--precision", "fp32",
                            *args), stdout=out, stderr=err, start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 120) -> tuple[int, str, str]:
        code = self.proc.wait(timeout)
        return code, self.out.read_text(), self.err.read_text()

    def watching(self) -> bool:
        return "watching " in self.err.read_text()


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_a_killed_watcher_loses_nothing(settings, tmp_path):
    url, folder = settings.database_url, tmp_path / "photos"
    for i in range(3):
        make_image(folder / f"{i}.png", 100 + i, (96, 96))
    watcher = Watcher(tmp_path, folder, "--workers", "0")
    try:
        wait_until_equal(url, folder, 180, watcher.proc)
        make_image(folder / "later.png", 200, (96, 96))
        wait_until_equal(url, folder, 60, watcher.proc)
        watcher.signal(signal.SIGINT)
        code, out, err = watcher.wait()
    finally:
        if watcher.proc.poll() is None:
            watcher.signal(signal.SIGKILL)
    assert code == 0, err
    assert "Traceback" not in out + err
    assert out.strip().splitlines() == [f"stopped watching {folder} after 2 syncs: new 4, updated 0, "
                                        "duplicate content 0, pruned 0, failing now 0"]

    # SIGKILL in the middle of a sync of 40 new files, with one deleted: the next run finishes it.
    watcher = Watcher(tmp_path, folder, "--batch-size", "2", "--workers", "0")
    try:
        deadline = time.monotonic() + 180
        while not watcher.watching():
            assert time.monotonic() < deadline and watcher.proc.poll() is None, watcher.err.read_text()
            time.sleep(0.1)
        for i in range(40):
            make_image(folder / "burst" / f"{i:02d}.png", 300 + i, (96, 96))
        os.remove(folder / "0.png")
        deadline = time.monotonic() + 180
        while len(table(url)) < 8:
            assert time.monotonic() < deadline and watcher.proc.poll() is None, watcher.err.read_text()
            time.sleep(0.05)
        watcher.signal(signal.SIGKILL)
        assert watcher.wait()[0] == -signal.SIGKILL
    finally:
        if watcher.proc.poll() is None:
            watcher.signal(signal.SIGKILL)
    assert len(table(url)) < 43  # the kill came inside the sync
    os.remove(folder / "1.png")  # and a file vanished while no watcher ran
    watcher = Watcher(tmp_path, folder, "--workers", "0")
    try:
        rows = wait_until_equal(url, folder, 180, watcher.proc)
        assert len(rows) == 42 and len(set(i for i, _ in rows.values())) == 42
        # Its first sync also rebuilds the HNSW index the kill left dropped: Ctrl-C only after it
        # (a Ctrl-C during the build stops with 130 and leaves the build to the next load).
        deadline = time.monotonic() + 180
        while not watcher.watching():
            assert time.monotonic() < deadline and watcher.proc.poll() is None, watcher.err.read_text()
            time.sleep(0.1)
        with psycopg.connect(url) as conn:
            assert hnsw_index(conn) is not None and dropped_definition(conn) is None
        watcher.signal(signal.SIGINT)
        code, out, err = watcher.wait()
    finally:
        if watcher.proc.poll() is None:
            watcher.signal(signal.SIGKILL)
    assert code == 0 and "stopped watching" in out, err
