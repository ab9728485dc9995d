"""Crash safety of `vecsearch load`: SIGKILLed at several points, its server SIGKILLed, Ctrl-C'd.

The interrupted loads are real CLI subprocesses (`--weights random`) on their own embedded server;
their final table is compared with an uninterrupted in-process load of the same files. The kill
points that matter are made deterministic with table locks held by the test: a write transaction
and the HNSW rebuild are each caught waiting on a lock, then the load is killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg
import psycopg.sql
import pytest
from conftest import cli_command, make_image
from PIL import Image

from vecsearch import db, hnsw, server
from vecsearch.config import Settings
from vecsearch.load import load

pytestmark = pytest.mark.slow

FOLDERS, PER_FOLDER = 4, 12  # 48 small images: about 10-20 s of the random model on 2 cores
BATCH = "8"


@pytest.fixture(autouse=True)
def no_load_left_running():
    yield
    while Run.started:
        run = Run.started.pop()
        if run.proc.poll() is None:
            run.kill()
            run.proc.wait()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash_photos")
    for i in range(FOLDERS * PER_FOLDER):
        make_image(root / f"album{i % FOLDERS}" / f"{i:03d}.png", 1000 + i, (64, 64))
    return root


def wait_for(condition: Callable[[], object], timeout: float, what: str, proc=None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the load exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Run:
    """`vecsearch load` in its own session (its decode workers die with it on killpg)."""

    started: list[Run] = []

    def __init__(self, tmp_path: Path, env: dict, *args: str) -> None:
        self.out, self.err = (tmp_path / f"load_{time.monotonic_ns()}.{s}" for s in ("out", "err"))
        with open(self.out, "w") as out, open(self.err, "w") as err:
            # SIGINT as a terminal's foreground job has it: a runner started in the background
            # (`cmd &` in a script) ignores SIGINT, and its children would inherit that.
            self.proc = subprocess.Popen(cli_command("load", *args), stdout=out, stderr=err,
                                         env={**os.environ, **env}, start_new_session=True,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        Run.started.append(self)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 300) -> tuple[int, str, str]:
        code = self.proc.wait(timeout)
        return code, self.out.read_text(), self.err.read_text()


def connect(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    db.register_vector(conn)
    return conn


def table(conn: psycopg.Connection) -> dict[str, tuple]:
    """{path: (id, sha256, embedding)} of every row."""
    rows = conn.execute("SELECT path, id, sha256, embedding FROM images")
    return {path: (image_id, sha, vector.to_numpy()) for path, image_id, sha, vector in rows}


def count(url: str) -> int:
    with psycopg.connect(url) as c:
        return c.execute("SELECT count(*) FROM images").fetchone()[0]


def waiting_on_lock(conn: psycopg.Connection, statement: str) -> bool:
    return conn.execute(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND strpos(query, %s) > 0)", [statement]).fetchone()[0]


def other_sessions(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchone()[0]


def assert_same_rows(before: dict[str, tuple], after: dict[str, tuple]) -> None:
    """Every row of `before` is in `after` with the same id, content and vector."""
    missing = sorted(set(before) - set(after))
    assert not missing, missing[:3]
    for path, (image_id, sha, vector) in before.items():
        assert after[path][:2] == (image_id, sha), path
        assert np.array_equal(after[path][2], vector), path


def assert_dropped_for_rebuild(conn: psycopg.Connection) -> None:
    """No HNSW index, and the table comment holds the definition the next load rebuilds."""
    assert hnsw.hnsw_index(conn) is None
    assert hnsw.dropped_definition(conn) is not None


def assert_index_complete(conn: psycopg.Connection, n: int) -> None:
    """The HNSW index is the one the plan uses, and a scan of it yields every row exactly once."""
    conn.execute("SET enable_seqscan = off")
    conn.execute("SET hnsw.ef_search = 1000")
    ann = f"SELECT id FROM images ORDER BY {db.ANN_EXPR} <=> (SELECT embedding FROM images WHERE id = %s)" \
          f"::halfvec({db.DIM}) LIMIT %s"
    ids = [r[0] for r in conn.execute("SELECT id FROM images ORDER BY id")]
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + ann, [ids[0], n]))
    assert "Index Scan using images_embedding_hnsw" in plan, plan
    for probe in ids[:: max(1, len(ids) // 5)]:
        found = [r[0] for r in conn.execute(ann, [probe, n])]
        assert found[0] == probe and sorted(found) == ids
    conn.execute("RESET enable_seqscan")
    conn.execute("RESET hnsw.ef_search")


def test_sigkilled_loads_and_server_end_like_an_uninterrupted_load(settings, embedder, photos, tmp_path):
    # The reference: one uninterrupted load of the same files.
    reference_summary = load(settings, photos, embedder, workers=0)
    assert reference_summary.new == FOLDERS * PER_FOLDER
    with db.connect(settings) as conn:
        reference = table(conn)
        original_index = hnsw.hnsw_index(conn)[1]

    home = tmp_path / "home"
    env = {"VECSEARCH_HOME": str(home), "VECSEARCH_DATABASE_URL": ""}
    db.connect(Settings(database_url=None, home=home)).close()  # started and migrated
    try:
        _crash_and_recover(home, env, photos, reference, original_index, tmp_path)
    finally:
        server.stop(home)


def _crash_and_recover(home: Path, env: dict, photos: Path, reference: dict, original_index: str,
                       tmp_path: Path) -> None:
    # fp32: the vectors are compared with the in-process reference load's
    args = (str(photos), "--weights", "random", "--precision", "fp32", "--batch-size", BATCH,
            "--workers", "1")
    url = server.running(home).url()
    snapshots = []

    # 1. Killed in the middle of a write transaction: the writer's INSERT waits on our SHARE lock.
    run = Run(tmp_path, env, *args)
    wait_for(lambda: count(url) >= int(BATCH), 180, "the first batch", run.proc)
    with connect(url) as lock, connect(url) as conn:
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE images IN SHARE MODE")
        wait_for(lambda: waiting_on_lock(conn, "INSERT INTO images"), 180, "a blocked INSERT", run.proc)
        committed = table(conn)
        run.kill()
        assert run.wait()[0] == -signal.SIGKILL
        lock.execute("ROLLBACK")
        wait_for(lambda: other_sessions(conn) == 1, 60, "the killed load's sessions to end")  # 1: `lock`
        after = table(conn)
        assert sorted(after) == sorted(committed)  # its open transaction left nothing behind
        assert_same_rows(committed, after)
        assert 0 < len(committed) < len(reference)
        assert_dropped_for_rebuild(conn)
        snapshots.append(committed)

    # 2. The server itself SIGKILLed while the load runs: the load stops with one line (exit 3),
    #    crash recovery keeps every committed row.
    run = Run(tmp_path, env, *args)
    seen = len(snapshots[-1])
    wait_for(lambda: count(url) >= seen + 2 * int(BATCH), 180, "two more batches", run.proc)
    with connect(url) as conn:
        committed = table(conn)
    os.kill(server.running(home).pid, signal.SIGKILL)
    code, _, err = run.wait()
    assert code == 3, err
    assert err.strip().splitlines()[-1].startswith("error: database connection lost"), err
    assert "Traceback" not in err
    url = server.ensure_running(home).url()  # restarted: crash recovery
    with connect(url) as conn:
        assert_same_rows(committed, table(conn))
        assert_dropped_for_rebuild(conn)
        snapshots.append(table(conn))

    # 3. Killed during the HNSW rebuild: its CREATE INDEX waits on our ROW EXCLUSIVE lock (which
    #    does not block inserts). The orphaned backend must notice the dead client and give up
    #    while we still hold the lock, or a long build would run on, holding the index lock.
    with connect(url) as lock, connect(url) as conn:
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE images IN ROW EXCLUSIVE MODE")
        run = Run(tmp_path, env, *args)
        wait_for(lambda: waiting_on_lock(conn, "CREATE INDEX"), 240, "the index rebuild", run.proc)
        committed = table(conn)
        assert len(committed) == len(reference)
        run.kill()
        assert run.wait()[0] == -signal.SIGKILL
        wait_for(lambda: other_sessions(conn) == 1, 30, "the killed rebuild's backend to end")
        lock.execute("ROLLBACK")
        assert_dropped_for_rebuild(conn)
        snapshots.append(committed)

    # 4. The next load finds every file unchanged and rebuilds the index from the stored definition.
    code, out, err = Run(tmp_path, env, *args).wait()
    assert code == 0, err
    assert f"found {len(reference)}, new 0, updated 0, unchanged {len(reference)}" in out
    assert "an earlier load was interrupted" in err

    with connect(url) as conn:
        final = table(conn)
        assert sorted(final) == sorted(reference)  # same paths, none missing, none twice
        assert conn.execute("SELECT count(*) = count(DISTINCT path) FROM images").fetchone()[0]
        for snapshot in snapshots:
            assert_same_rows(snapshot, final)  # rows that existed before a crash kept their ids
        for path, (_, sha, vector) in final.items():
            assert sha == reference[path][1]
            np.testing.assert_allclose(vector, reference[path][2], atol=2e-4)
        assert hnsw.hnsw_index(conn)[1] == original_index
        assert conn.execute("SELECT obj_description('images'::regclass, 'pg_class')").fetchone()[0] is None
        assert_index_complete(conn, len(final))


def test_ctrl_c_stops_cleanly_with_a_summary_and_a_rerun_finishes(settings, photos, tmp_path):
    # All 48 photos, fp32, small batches: the load must still be running when Ctrl-C comes.
    folder, total = photos, FOLDERS * PER_FOLDER
    run = Run(tmp_path, {}, str(folder), "--weights", "random", "--precision", "fp32", "--batch-size", "2",
              "--workers", "1")
    wait_for(lambda: count(settings.database_url) >= 4, 180, "the first batch", run.proc)
    run.kill(signal.SIGINT)  # to the whole process group, as Ctrl-C in a terminal
    code, out, err = run.wait(120)
    assert code == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    summary = (out + err).strip().splitlines()
    assert any(line.startswith("interrupted") for line in summary), out + err
    with connect(settings.database_url) as conn:
        kept = table(conn)
        assert 0 < len(kept) < total
        assert f"new {len(kept)}, " in out  # the summary counts what was committed
        assert hnsw.hnsw_index(conn) is not None  # a clean stop leaves a usable index
        assert_index_complete(conn, len(kept))

    code, out, err = Run(tmp_path, {}, str(folder), "--weights", "random", "--workers", "1").wait()
    assert code == 0, err
    assert f"new {total - len(kept)}, updated 0, unchanged {len(kept)}" in out
    with connect(settings.database_url) as conn:
        assert_same_rows(kept, table(conn))
        assert count(settings.database_url) == total


def test_sigkill_of_the_load_alone_leaves_no_worker_and_the_next_load_repairs_the_index(
        settings, photos, tmp_path):
    """`kill -9 PID` of the load only (not its process group), while its decode workers run."""
    import psutil

    big = tmp_path / "big"
    rng = np.random.default_rng(5)
    for i in range(40):  # noisy pixels: slow to decode, so the workers are busy at the kill
        big.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)).save(big / f"{i:02d}.png")
    url = settings.database_url
    run = Run(tmp_path, {}, str(big), "--weights", "random", "--precision", "fp32", "--batch-size", "4",
              "--workers", "2")
    wait_for(lambda: count(url) >= 4, 180, "the first batch", run.proc)
    workers = psutil.Process(run.proc.pid).children(recursive=True)
    assert len(workers) == 2, workers
    with connect(url) as conn:
        assert_dropped_for_rebuild(conn)
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.wait()[0] == -signal.SIGKILL
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, [(p.pid, p.status()) for p in alive]
        wait_for(lambda: other_sessions(conn) == 0, 30, "the killed load's sessions to end")
        kept = count(url)

    code, out, err = Run(tmp_path, {}, str(big), "--weights", "random", "--workers", "1").wait()
    assert code == 0, err
    assert "an earlier load was interrupted" in err
    assert f"new {40 - kept}, updated 0, unchanged {kept}" in out
    with connect(url) as conn:
        assert hnsw.hnsw_index(conn) is not None
        assert_index_complete(conn, 40)


def test_a_load_ends_a_session_left_holding_the_index_lock_by_a_dead_load(settings, tmp_path):
    """Whatever kept a dead load's session open (here: the test holds it), the next load ends it."""
    folder = tmp_path / "few"
    for i in range(3):
        make_image(folder / f"{i}.png", 70 + i, (48, 48))
    dead = subprocess.Popen(["true"])
    dead.wait()
    with connect(settings.database_url) as orphan:
        orphan.execute("SELECT set_config('application_name', %s, false)",
                       [f"vecsearch load {socket.gethostname()[:30]}:{dead.pid}"])
        orphan.execute(f"SELECT pg_advisory_lock({hnsw.LOCK_KEY})")
        definition = orphan.execute("SELECT pg_get_indexdef('images_embedding_hnsw'::regclass)").fetchone()[0]
        mark = hnsw.DROPPED_MARK + json.dumps({"index": definition, "previous_comment": None})
        orphan.execute(psycopg.sql.SQL("COMMENT ON TABLE images IS {}").format(psycopg.sql.Literal(mark)))
        orphan.execute("DROP INDEX images_embedding_hnsw")
        code, out, err = Run(tmp_path, {}, str(folder), "--weights", "random", "--workers", "0").wait()
        assert code == 0, err
        assert "an earlier load was interrupted" in err
        with connect(settings.database_url) as conn:
            assert hnsw.hnsw_index(conn) is not None
        assert _is_dead(orphan)


def _is_dead(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False
