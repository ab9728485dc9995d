"""Hostile inputs to `vecsearch load`: odd names, unreadable and special files, files that change
or vanish while the load runs. Each one is loaded or reported with a reason; nothing crashes or hangs.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import string
import subprocess
import threading
from pathlib import Path

from conftest import cli_command, make_image
from test_load import Recorder, rows

from vecsearch import pipeline as pipeline_mod
from vecsearch.load import load

# Names that must load as they are (each a copy of a.png's bytes: embedded once, stored per path).
ODD_NAMES = [
    "quote's \"double\".png",
    "semi;colon.png",
    "'); DROP TABLE images;--.png",
    "$(touch pwned) `id` %s%n {0} \\back.png",
    "new\nline\ttab.png",
    "ünïcödé 日本 🐈.png",
    "-k 5 --help.png",
    "   spaces   .png",
    "x" * 251 + ".png",  # 255 bytes: the longest name Linux allows
]


def without_dac_override() -> list[str]:
    """Command prefix under which file permissions apply: as root, drop the capabilities that
    bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a chmod 000 file really is unreadable."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def hostile_folder(root: Path) -> tuple[list[str], dict[str, str]]:
    """(relative paths that must load, {display path relative to root: reason fragment} that must fail)."""
    a = make_image(root / "a.png", 1, (64, 64))
    make_image(root / "b.png", 2, (64, 48))
    for name in ODD_NAMES:
        shutil.copy(a, root / name)
    # A path longer than the path index can hold (PostgreSQL btree rows stop at 2704 bytes),
    # yet well within Linux's 4096.
    letters = random.Random(0)  # incompressible: PostgreSQL compresses long index rows
    deep = root / "/".join("".join(letters.choices(string.ascii_letters, k=200)) for _ in range(14))
    deep.mkdir(parents=True)
    shutil.copy(a, deep / "deep.png")
    (root / "album.jpg").mkdir()  # a directory with an image name: searched like any folder
    shutil.copy(root / "b.png", root / "album.jpg" / "inside.png")
    (root / "self_link.png").symlink_to(root / "b.png")  # a good link loads under its own path
    (root / "cycle").mkdir()
    (root / "cycle" / "up").symlink_to("..")  # a directory loop: each folder is visited once
    os.mkfifo(root / "pipe")  # no image extension: ignored, never opened
    (root / "notes.txt").write_text("not an image")

    os.close(os.open(os.fsencode(root) + b"/bad\xff\xfe name.png", os.O_CREAT | os.O_WRONLY, 0o644))
    shutil.copy(a, root / "locked.png")
    (root / "locked.png").chmod(0)
    make_image(root / "locked_dir" / "hidden.png", 3, (64, 64))
    (root / "locked_dir").chmod(0)
    (root / "broken.jpg").symlink_to(root / "does-not-exist.jpg")
    (root / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    loading = ["a.png", "b.png", *ODD_NAMES, "album.jpg/inside.png", "self_link.png"]
    failing = {
        "bad\\xff\\xfe name.png": "file name is not valid UTF-8",
        "locked.png": "Permission denied",
        "locked_dir": "cannot list folder: Permission denied",
        "broken.jpg": "broken symbolic link",
        "loop.jpg": "symbolic link",
        "pipe.jpg": "not a regular file",
        "zero.jpg": "not a regular file",
        str(deep.relative_to(root) / "deep.png"): "bytes long",
    }
    return loading, failing


def test_hostile_folder_loads_what_it_can_and_reports_the_rest(settings, conn, tmp_path):
    root = tmp_path / "hostile"
    loading, failing = hostile_folder(root)
    errors = tmp_path / "errors.csv"
    try:
        result = subprocess.run(
            [*without_dac_override(), *cli_command("load", str(root), "--weights", "random",
                                                   "--workers", "1", "--errors", str(errors))],
            capture_output=True, text=True, timeout=600)
    finally:
        (root / "locked_dir").chmod(0o755)
    assert result.returncode == 2, result.stderr  # finished, some files skipped
    assert "Traceback" not in result.stderr
    assert f"new {len(loading)}, " in result.stdout and f"failed {len(failing)}, " in result.stdout

    loaded = sorted(os.path.relpath(p, root) for p in rows(conn))
    assert loaded == sorted(loading)
    assert conn.execute("SELECT count(DISTINCT sha256) FROM images").fetchone()[0] == 2  # a and b
    with open(errors, newline="", encoding="utf-8") as f:
        reported = {os.path.relpath(path, root): reason for path, reason in list(csv.reader(f))[1:]}
    assert sorted(reported) == sorted(failing)
    for name, fragment in failing.items():
        assert fragment in reported[name], (name, reported[name])
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()

    # The odd names come back exactly, through JSON, from a neighbour query.
    image_id = conn.execute("SELECT id FROM images WHERE path = %s", [str(root / "b.png")]).fetchone()[0]
    out = subprocess.run(cli_command("similar", str(image_id), "-k", "20", "-f", "json"),
                         capture_output=True, text=True, check=True)
    assert {os.path.relpath(r["path"], root) for r in json.loads(out.stdout)} == set(loading) - {"b.png"}


def test_files_that_vanish_change_or_turn_into_a_fifo_during_the_load(settings, conn, embedder, tmp_path,
                                                                     monkeypatch):
    root = tmp_path / "moving"
    for i, name in enumerate(["steady.png", "vanish.png", "changing.png", "fifo_later.png"]):
        make_image(root / name, 10 + i, (64, 64))

    class Saboteur(Recorder):
        def start(self, total: int) -> None:  # after discovery, before any file is read
            super().start(total)
            (root / "vanish.png").unlink()
            (root / "fifo_later.png").unlink()
            os.mkfifo(root / "fifo_later.png")  # opening it for reading would block forever

    hash_file = pipeline_mod.sha256_of

    def rewritten_while_read(f):  # another program saves changing.png while it is being read
        digest = hash_file(f)
        if f.name.endswith("changing.png"):
            make_image(root / "changing.png", 99, (80, 80))
        return digest

    monkeypatch.setattr(pipeline_mod, "sha256_of", rewritten_while_read)
    report = Saboteur()
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(summary=load(settings, root, embedder,
                                                                      progress=report, workers=0)),
                              daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the load hung (on the FIFO?)"
    summary = done["summary"]
    reasons = {Path(p).name: r for p, r in summary.failed}
    assert reasons == {"vanish.png": "the file vanished during the load",
                       "changing.png": "the file changed while it was being read: load again",
                       "fifo_later.png": "not a regular file"}
    assert sorted(Path(p).name for p in rows(conn)) == ["steady.png"]

    monkeypatch.setattr(pipeline_mod, "sha256_of", hash_file)
    (root / "fifo_later.png").unlink()
    again = load(settings, root, embedder, workers=0)
    assert (again.new, again.unchanged, again.failed) == (1, 1, [])  # the changed file, now still
    assert sorted(Path(p).name for p in rows(conn)) == ["changing.png", "steady.png"]

