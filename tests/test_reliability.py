"""Reliability: bad queries and broken configurations, concurrent use, least privilege, restore.

Every failure a user can cause is one `error: ...` line on stderr with the exit code of its
category (README "Errors and exit codes"), never a traceback unless --debug asks for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import stat
import subprocess
import time
import urllib.request
from datetime import timedelta

import psycopg
import pytest
from conftest import cli_command, clustered, fresh_database, insert_vectors, invoke_cli, make_image, run_cli

from vecsearch import db, hnsw, query, server
from vecsearch.limits import EPOCH

# -- bad queries and broken configurations --------------------------------------------------


@pytest.fixture
def few(conn, settings):
    """Five synthetic rows recorded as made by the random-weights test model; their ids."""
    conn.execute("INSERT INTO embedding_model (name, weights, preprocessing, dim) "
                 "SELECT 'torchvision.models.resnet50', 'random(seed=0)', '{}', 2048")
    return insert_vectors(conn, clustered(5, seed=3))


def assert_one_line(result: subprocess.CompletedProcess, code: int, start: str) -> None:
    """Exit `code` and one `error:` line starting with `start` (after any `warning:` lines)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith(start), result.stderr


def test_bad_queries_are_one_line_with_exit_code_1(few, tmp_path):
    missing, huge = str(max(few) + 1000), "99999999999999999999"
    for args, start in [
        (["similar", missing], f"error: no image with id {missing}"),
        (["similar", str(few[0]), "-k", "1000000"], "error: k must be between 1 and 1000"),
        (["similar", str(few[0]), "-k", "-5"], "error: k must be between 1 and 1000"),
        (["similar", f"{few[0]} + {missing}*0.5"], f"error: no image with id {missing}"),
        (["search", str(tmp_path / "nothing.jpg")], "error: no such image file"),
    ]:
        assert_one_line(invoke_cli(*args), 1, start)
    # Malformed arithmetic: the message, then the expression with a caret under the bad token.
    for text in (f"{few[0]} + * 3", f"{few[0]} {few[1]}", huge, f"{few[0]} - {few[0]}", "'unterminated"):
        result = invoke_cli("similar", text)
        assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr


def test_usage_errors_exit_1_not_2(few):
    """Exit code 2 means "load finished, some files skipped": a bad option is bad input (1)."""
    for args in (["similar", str(few[0]), "-k", "many"], ["similar", str(few[0]), "-f", "xml"],
                 ["similar", "--no-such-option", "1"], ["load"]):
        result = invoke_cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert_one_line(result, 1, "error: ")  # one line, not click's Usage/Try/Error block
        assert "Traceback" not in result.stderr and "(see `vecsearch " in result.stderr


def test_database_from_a_newer_vecsearch_is_refused_before_anything_runs(conn, few, tmp_path):
    conn.execute("UPDATE alembic_version SET version_num = '0099'")
    make_image(tmp_path / "photos" / "a.png", 1, (64, 64))
    for args in (["similar", str(few[0])], ["db", "status"],
                 ["load", str(tmp_path / "photos"), "--weights", "random"]):
        assert_one_line(invoke_cli(*args), 5, "error: the database schema is at revision 0099, newer than")
    assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 5  # nothing loaded


def test_database_of_another_application_is_refused_not_migrated(pg_home, tmp_path):
    running = server.ensure_running(pg_home)
    for name, setup in [("foreign_images", "CREATE TABLE images (id int, title text)"),
                        ("foreign_alembic", "CREATE TABLE alembic_version (version_num varchar(32)); "
                                            "INSERT INTO alembic_version VALUES ('ae1027a6acf')")]:
        with server.psql_connection(running) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name}")
            admin.execute(f"CREATE DATABASE {name}")
        with server.psql_connection(running, name) as conn:
            conn.execute(setup)
        result = invoke_cli("similar", "1", env={"VECSEARCH_DATABASE_URL": running.url(name)})
        assert_one_line(result, 5, "error: the database")
        assert "point vecsearch at its own database" in result.stderr
        with server.psql_connection(running, name) as conn:  # left as it was
            assert conn.execute("SELECT to_regclass('embedding_model')").fetchone()[0] is None
        with server.psql_connection(running) as admin:
            admin.execute(f"DROP DATABASE {name}")


def test_database_embedded_by_another_model(conn, few, tmp_path):
    conn.execute("UPDATE embedding_model SET name = 'open_clip.ViT-B-32', weights = 'laion2b_s34b_b79k'")
    photo = make_image(tmp_path / "photos" / "a.png", 1, (64, 64))
    # Neighbours of a stored image need no model: they still work.
    assert invoke_cli("similar", str(few[0]), "-f", "paths").returncode == 0
    # Embedding a file, or loading more, would mix two vector spaces: refused.
    assert_one_line(invoke_cli("search", str(photo)), 5, "error: the database's vectors were made by "
                    "open_clip.ViT-B-32")
    result = invoke_cli("load", str(photo.parent), "--weights", "random")
    assert result.returncode == 5 and "--reembed" in result.stderr and "Traceback" not in result.stderr
    assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 5


@pytest.mark.parametrize("url, start", [
    ("notaurl", "error: notaurl is not a PostgreSQL URL"),
    ("http://example.org/", "error: http://example.org/ is not a PostgreSQL URL"),
    ("postgresql://postgres:secret@127.0.0.1:1/vecsearch", "error: cannot connect to "
     "postgresql://postgres:***@127.0.0.1:1/vecsearch"),
])
def test_wrong_database_url_is_exit_3_and_never_shows_the_password(url, start, tmp_path):
    result = invoke_cli("similar", "1", env={"VECSEARCH_DATABASE_URL": url, "VECSEARCH_HOME": str(tmp_path)})
    assert_one_line(result, 3, start)
    assert "secret" not in result.stderr


def test_wrong_database_name_or_user_is_exit_3(pg_home, tmp_path):
    running = server.ensure_running(pg_home)
    for url in (running.url("no_such_database"), running.url().replace("postgres@", "nobody@")):
        result = invoke_cli("db", "status", env={"VECSEARCH_DATABASE_URL": url})
        assert_one_line(result, 3, "error: cannot connect to ")
        assert "does not exist" in result.stderr


def test_debug_shows_the_traceback(few):
    missing = str(max(few) + 1000)
    result = invoke_cli("--debug", "similar", missing)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "NotFound: no image with id" in result.stderr
    result = invoke_cli("similar", missing, env={"VECSEARCH_DEBUG": "1"})
    assert "Traceback" in result.stderr


# -- concurrency ----------------------------------------------------------------------------


class Served:
    """`vecsearch serve --port 0` in a subprocess; its URL read from the line it announces."""

    def __init__(self, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(cli_command("serve", "--port", "0"), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        line = self.proc.stdout.readline() if ready else ""
        match = re.search(r"http://[\d.]+:\d+/", line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()}")
        self.url = match.group()

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=30) as response:
            assert response.status == 200
            return json.load(response)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=30)


def test_overlapping_loads_at_once_store_each_file_once_while_queries_keep_answering(settings, conn,
                                                                                     tmp_path):
    from test_crash import assert_index_complete

    library = tmp_path / "library"
    files = [make_image(library / "top" / f"{i}.png", 500 + i, (64, 64)) for i in range(2)]
    files += [make_image(library / sub / f"{i}.png", 600 + 20 * n + i, (64, 64))
              for n, sub in enumerate(("a", "b")) for i in range(6)]
    ids = insert_vectors(conn, clustered(8, seed=11))  # rows to query while the loads run
    served = Served()
    loads = [subprocess.Popen(cli_command("load", str(folder), "--weights", "random", "--workers", "1",
                                          "--batch-size", "4"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for folder in (library, library / "b")]  # library/b is in both
    answered = {"sql": 0, "http": 0, "cli": 0}
    last_cli = 0.0
    try:
        while any(p.poll() is None for p in loads):
            probe = ids[answered["sql"] % len(ids)]
            assert len(query.similar(conn, probe, 5)) == 5
            answered["sql"] += 1
            assert len(served.get_json(f"/api/images/{probe}/similar?k=5")["results"]) == 5
            assert served.get_json("/api/images?per_page=1")["total"] >= len(ids)
            answered["http"] += 1
            if time.monotonic() - last_cli > 8:
                result = invoke_cli("similar", str(probe), "-k", "5", "-f", "paths")
                assert result.returncode == 0 and len(result.stdout.splitlines()) == 5, result.stderr
                answered["cli"] += 1
                last_cli = time.monotonic()
            time.sleep(0.1)
        outputs = [p.communicate() for p in loads]
    finally:
        for p in loads:
            if p.poll() is None:
                p.kill()
        served.stop()
    assert [p.returncode for p in loads] == [0, 0], [err for _, err in outputs]
    assert answered["sql"] >= 10 and answered["http"] >= 10 and answered["cli"] >= 1, answered

    paths = [r[0] for r in conn.execute("SELECT path FROM images WHERE path NOT LIKE '/synthetic/%'")]
    assert sorted(paths) == sorted(str(f) for f in files)  # each file exactly once
    news = [int(re.search(r"new (\d+),", out).group(1)) for out, _ in outputs]
    assert sum(news) == len(files)  # each row inserted by one load (the other may update it)
    assert hnsw.hnsw_index(conn) is not None
    assert_index_complete(conn, len(files) + len(ids))


# -- durability: restore anywhere, never half, never over someone else's tables ---------------


def _neighbour_table(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT i.id, n.id, round(n.distance::numeric, 6) FROM images i, "
                            "LATERAL vecsearch_similar(i.id, 3, exact => true) n ORDER BY 1, 2").fetchall()


def test_restore_into_a_new_home_recreates_the_reader_role_and_its_grants(settings, conn, few, tmp_path):
    dump = tmp_path / "vs.dump"
    run_cli("db", "backup", str(dump), check=True)
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600  # every path of the library is in it
    before = _neighbour_table(settings.database_url)
    home = tmp_path / "fresh"  # a new cluster: role vecsearch_reader does not exist there yet
    env = {"VECSEARCH_HOME": str(home), "VECSEARCH_DATABASE_URL": ""}
    try:
        result = run_cli("db", "restore", str(dump), env=env)
        assert result.returncode == 0, result.stderr
        url = server.running(home).url()
        assert _neighbour_table(url) == before
        with psycopg.connect(url) as restored:
            assert restored.execute(
                "SELECT has_table_privilege('vecsearch_reader', 'images', 'SELECT'), "
                "has_table_privilege('vecsearch_reader', 'images', 'INSERT'), "
                "has_function_privilege('vecsearch_reader', "
                "(SELECT oid FROM pg_proc WHERE proname = 'vecsearch_similar'), 'EXECUTE')").fetchone() \
                == (True, False, True)
        login = run_cli("db", "reader", "restored_reader", env=env, check=True).stdout.strip()
        with psycopg.connect(login) as analyst:
            found = analyst.execute("SELECT count(*) FROM vecsearch_similar(%s, 2)", [few[0]]).fetchone()
            assert found == (2,)
    finally:
        server.stop(home)


def test_backup_and_restore_refuse_bad_paths_non_backups_and_newer_backups(settings, conn, few, tmp_path):
    assert_one_line(invoke_cli("db", "backup", str(tmp_path / "no" / "such" / "dir.dump")), 1,
                    f"error: cannot write the backup to {tmp_path / 'no' / 'such' / 'dir.dump'}")
    junk = tmp_path / "photo.jpg"
    make_image(junk, 1, (32, 32))
    assert_one_line(invoke_cli("db", "restore", str(junk)), 1,
                    f"error: {junk} is not a `vecsearch db backup` file")
    conn.execute("UPDATE alembic_version SET version_num = '0099'")
    newer = tmp_path / "newer.dump"
    server.run_binary("pg_dump", ["--format=custom", f"--file={newer}", settings.database_url], check=True)
    conn.execute("UPDATE alembic_version SET version_num = %s", [db.SCHEMA_REVISION])
    assert_one_line(invoke_cli("db", "restore", str(newer)), 5,
                    f"error: {newer} was made by a newer vecsearch")
    assert conn.execute("SELECT count(*) FROM images").fetchone() == (5,)


def test_restore_never_drops_another_applications_tables(settings, conn, few, pg_home, tmp_path):
    dump = tmp_path / "vs.dump"
    invoke_cli("db", "backup", str(dump), check=True)
    with fresh_database(pg_home) as url, psycopg.connect(url, autocommit=True) as other:
        other.execute("DROP TABLE images CASCADE; DROP TABLE alembic_version")
        other.execute("CREATE TABLE images (id int, title text); INSERT INTO images VALUES (1, 'theirs')")
        result = invoke_cli("db", "restore", str(dump), env={"VECSEARCH_DATABASE_URL": url})
        assert_one_line(result, 5, "error: the database has an `images` or `embedding_model` table")
        assert other.execute("SELECT * FROM images").fetchall() == [(1, "theirs")]


def test_backup_of_an_older_schema_restores_over_a_current_database_and_into_an_empty_one(
        settings, conn, few, pg_home, tmp_path):
    for (signature,) in conn.execute("SELECT oid::regprocedure::text FROM pg_proc WHERE proname IN "
                                     "('vecsearch_similar', 'vecsearch_similar_to')").fetchall():
        conn.execute(f"DROP FUNCTION {signature}")
    conn.execute("UPDATE alembic_version SET version_num = '0001'")  # as vecsearch 0001 left it
    old = tmp_path / "old.dump"
    server.run_binary("pg_dump", ["--format=custom", f"--file={old}", settings.database_url], check=True)
    with fresh_database(pg_home) as url:
        with psycopg.connect(url, autocommit=True) as target:
            db.register_vector(target)
            insert_vectors(target, clustered(3, seed=9), ["/kept/1.jpg", "/kept/2.jpg", "/kept/3.jpg"])
        # Only the data comes from the file: the schema stays this vecsearch's, at its revision.
        result = invoke_cli("db", "restore", str(old), env={"VECSEARCH_DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        with psycopg.connect(url) as target:
            assert target.execute("SELECT count(*) FROM images").fetchone() == (5,)
            assert db.schema_revision(target) == db.SCHEMA_REVISION
            found = target.execute("SELECT count(*) FROM vecsearch_similar(%s, 2)", [few[0]]).fetchone()
            assert found == (2,)
    running = server.ensure_running(pg_home)
    with server.psql_connection(running) as admin:
        admin.execute("DROP DATABASE IF EXISTS restore_empty")
        admin.execute("CREATE DATABASE restore_empty")
    url = running.url("restore_empty")
    invoke_cli("db", "restore", str(old), env={"VECSEARCH_DATABASE_URL": url}, check=True)
    with psycopg.connect(url) as restored:
        assert db.schema_revision(restored) == db.SCHEMA_REVISION  # migrated after the restore
        assert restored.execute("SELECT count(*) FROM vecsearch_similar(%s, 4)", [few[0]]).fetchone() == (4,)
    with server.psql_connection(running) as admin:
        admin.execute("DROP DATABASE restore_empty")


# -- least privilege ----------------------------------------------------------------------------


def test_everything_a_fresh_home_holds_is_private_to_its_owner(tmp_path):
    """Data dir, socket, log, lock, TCP password and thumbnail cache: no group or other access,
    whatever the umask (here the usual 022)."""
    from vecsearch import thumbs

    home = tmp_path / "home"
    env = {"VECSEARCH_HOME": str(home), "VECSEARCH_DATABASE_URL": ""}
    photo = make_image(tmp_path / "photo.png", 1, (64, 64))
    old = os.umask(0o022)
    try:
        run_cli("db", "start", "--tcp", "--port", "54341", env=env, check=True)
        from vecsearch.verified_files import Verified

        row = {"id": 1, "path": str(photo), "bytes": photo.stat().st_size,
               "sha256": hashlib.sha256(photo.read_bytes()).hexdigest()}
        thumbs.thumbnail(home, row, 256, Verified())
        socket_dir = server.running(home).socket_dir  # in the data dir, or /tmp when that path is long
        kinds = []
        for path in {home, *home.rglob("*"), socket_dir, *socket_dir.iterdir()}:
            mode = path.lstat().st_mode
            assert stat.S_IMODE(mode) & 0o077 == 0 or stat.S_ISLNK(mode), (path, oct(mode))
            kinds.append("socket" if stat.S_ISSOCK(mode) else path.suffix)
        assert kinds.count("socket") == 1 and kinds.count(".jpg") == 1
        assert {p.name for p in home.iterdir()} >= {"pg", "tcp-password", "postgres.log", "server.lock",
                                                     "thumbs"}
    finally:
        os.umask(old)
        server.stop(home)


def test_web_serves_a_file_only_as_it_was_indexed(conn, settings, tmp_path):
    """A file swapped after the load (here for a symlink to a private file) is not served."""
    from fastapi.testclient import TestClient

    from vecsearch import web
    from vecsearch.images import sha256_of

    photo = make_image(tmp_path / "indexed" / "photo.png", 1, (64, 64))
    secret = tmp_path / "private" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- not for the gallery\n")
    private_photo = make_image(tmp_path / "private" / "holiday.png", 2, (64, 64))
    st = photo.stat()
    with open(photo, "rb") as f:
        digest = sha256_of(f)
    image_id = conn.execute(
        "INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
        "VALUES (%s, %s, %s, 64, 64, 'PNG', %s, %s) RETURNING id",  # as `vecsearch load` writes it
        [str(photo), digest, st.st_size, EPOCH + timedelta(microseconds=st.st_mtime_ns // 1000),
         clustered(1, seed=1)[0]]).fetchone()[0]
    app = web.create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        assert client.get(f"/media/{image_id}/original").content == photo.read_bytes()
        assert client.get(f"/media/{image_id}/thumb").status_code == 200
        for target in (secret, private_photo):
            photo.unlink()
            photo.symlink_to(target)
            for rendition in ("original", "preview"):
                response = client.get(f"/media/{image_id}/{rendition}")
                assert response.status_code == 404, (target, rendition)
                assert "changed since it was loaded" in response.text
                assert b"PRIVATE KEY" not in response.content and "Traceback" not in response.text
