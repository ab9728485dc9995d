"""Hardening, round 2: each case a hostile or careless user found, as a test of the fix."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from conftest import cli_command, clustered, fresh_database, insert_vectors, invoke_cli, make_image, run_cli
from fastapi.testclient import TestClient
from PIL import Image

from vecsearch import db, logins, server, web
from vecsearch.load import load


def _plant_like(path: Path, private: Path) -> None:
    """Pad the image at `path` to the private file's size and give it its mtime (both from stat)."""
    st = private.stat()
    data = path.read_bytes()
    assert len(data) < st.st_size
    path.write_bytes(data + b"\0" * (st.st_size - len(data)))  # decoders ignore bytes after IEND
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_gallery_never_serves_a_symlink_swapped_in_with_the_private_files_size_and_mtime(
        settings, embedder, tmp_path):
    folder = tmp_path / "shared"
    private = tmp_path / "private" / "shadow"
    private.parent.mkdir()
    private.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n" * 400)
    photo = make_image(folder / "holiday.png", 3, (48, 48))
    _plant_like(photo, private)
    summary = load(settings, folder, embedder, workers=0)
    assert summary.new == 1 and not summary.failed
    with db.connect(settings) as conn:
        image_id, size = conn.execute("SELECT id, bytes FROM images").fetchone()
    assert size == private.stat().st_size

    app = web.create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        assert client.get(f"/media/{image_id}/original").content == photo.read_bytes()
        assert client.get(f"/media/{image_id}/thumb").status_code == 200  # cached from now on
        photo.unlink()
        photo.symlink_to(private)
        assert (os.stat(photo).st_size, os.stat(photo).st_mtime_ns) == (size, private.stat().st_mtime_ns)
        for rendition in ("original", "preview", "thumb"):
            for method in (client.get, client.head):
                response = method(f"/media/{image_id}/{rendition}")
                assert response.status_code == 404, (rendition, method)
                assert b"secret-hash" not in response.content
        # The same bytes behind a link are the indexed content, and are served.
        (tmp_path / "copy.png").write_bytes(private.read_bytes())
        private.unlink()
        private.symlink_to(tmp_path / "copy.png")
        assert client.get(f"/media/{image_id}/original").status_code == 404  # NUL-padded secret
        photo.unlink()
        _restore = tmp_path / "restored.png"
        make_image(_restore, 3, (48, 48))
        _plant_like(_restore, tmp_path / "copy.png")
        photo.symlink_to(_restore)
        response = client.get(f"/media/{image_id}/original")
        assert response.status_code == 200 and response.content == _restore.read_bytes()
        assert client.head(f"/media/{image_id}/original").status_code == 200


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_gallery_refuses_a_fifo_or_directory_in_the_files_place(settings, embedder, tmp_path, kind):
    folder = tmp_path / "shared"
    photo = make_image(folder / "a.png", 4, (40, 40))
    load(settings, folder, embedder, workers=0)
    with db.connect(settings) as conn:
        image_id = conn.execute("SELECT id FROM images").fetchone()[0]
    photo.unlink()
    os.mkfifo(photo) if kind == "fifo" else photo.mkdir()
    app = web.create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for rendition in ("original", "thumb"):
            assert client.get(f"/media/{image_id}/{rendition}").status_code == 404


# -- 3. restore runs nothing from the file; 7. it waits for readers with a message and a limit ----


def test_restore_of_a_crafted_dump_runs_none_of_its_sql(settings, conn, pg_home, tmp_path):
    """A dump that passes the "is a vecsearch backup" check and carries a CHECK constraint calling
    a function that runs `COPY ... TO PROGRAM`: restored, the data arrives, the code does not."""
    insert_vectors(conn, clustered(4, seed=3))
    marker = tmp_path / "pwned"
    with fresh_database(pg_home) as url, psycopg.connect(url, autocommit=True) as evil:
        db.register_vector(evil)
        insert_vectors(evil, clustered(2, seed=4), ["/evil/1.jpg", "/evil/2.jpg"])
        source = evil.execute("SELECT current_database()").fetchone()[0]
        evil.execute(f"""
            CREATE FUNCTION evil() RETURNS boolean LANGUAGE plpgsql AS $$
            BEGIN
                IF current_database() <> '{source}' THEN
                    COPY (SELECT 1) TO PROGRAM 'touch {marker}';
                END IF;
                RETURN true;
            END $$""")
        evil.execute("ALTER TABLE images ADD CONSTRAINT sneaky CHECK (evil())")
        crafted = tmp_path / "crafted.dump"
        server.run_binary("pg_dump", ["--format=custom", f"--file={crafted}", url], check=True)
    result = invoke_cli("db", "restore", str(crafted))
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert conn.execute("SELECT array_agg(path ORDER BY path) FROM images").fetchone()[0] == \
        ["/evil/1.jpg", "/evil/2.jpg"]
    assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname = 'evil'").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'sneaky'").fetchone() == (0,)


def test_restore_of_bad_data_is_refused_whole(settings, conn, pg_home, tmp_path):
    insert_vectors(conn, clustered(3, seed=5))
    with fresh_database(pg_home) as url, psycopg.connect(url, autocommit=True) as other:
        db.register_vector(other)
        insert_vectors(other, clustered(2, seed=6))
        other.execute("ALTER TABLE images ADD COLUMN extra text")  # not a column vecsearch has
        dump = tmp_path / "extra.dump"
        server.run_binary("pg_dump", ["--format=custom", f"--file={dump}", url], check=True)
    result = invoke_cli("db", "restore", str(dump))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "the images data has columns extra" in result.stderr
    assert conn.execute("SELECT count(*) FROM images").fetchone() == (3,)


def test_restore_waits_for_a_readers_open_transaction_with_a_message_and_a_limit(settings, conn, tmp_path):
    insert_vectors(conn, clustered(3, seed=7))
    dump = tmp_path / "vs.dump"
    invoke_cli("db", "backup", str(dump), check=True)
    with psycopg.connect(settings.database_url) as reader:  # not autocommit: the transaction stays open
        reader.execute("SELECT count(*) FROM images").fetchone()
        started = time.monotonic()
        result = invoke_cli("db", "restore", str(dump), "--wait", "3")
        assert 2.5 < time.monotonic() - started < 30
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("waiting for sessions using the tables to finish: pid ")
        assert lines[-1].startswith("error: restore gave up after waiting 3 s for sessions using the tables")
        reader.rollback()
    assert invoke_cli("db", "restore", str(dump), "--wait", "3").returncode == 0


def test_reader_logins_get_no_temporary_objects_no_other_database_and_timeouts(settings, conn):
    insert_vectors(conn, clustered(3, seed=8))
    name = f"hostile_{os.getpid()}"
    password = logins.create(conn, name)
    try:
        url = logins.url(settings, conn, name, password)
        with psycopg.connect(url, autocommit=True) as analyst:
            assert analyst.execute("SELECT count(*) FROM vecsearch_similar(1, 2)").fetchone() == (2,)
            for statement in ("CREATE TEMP TABLE t (x int)",
                              "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                              "CREATE TABLE public.t (x int)"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    analyst.execute(statement)
            assert analyst.execute("SHOW statement_timeout").fetchone() == ("1min",)
            assert analyst.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("1min",)
        for other in ("postgres", "template1"):  # the embedded server is vecsearch's own cluster
            with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
                psycopg.connect(url.replace(f"/{conn.info.dbname}?", f"/{other}?"))
    finally:
        logins.drop(conn, name)
    # vecsearch itself (the role that ran the migrations) still makes its load's temporary table.
    conn.execute("CREATE TEMP TABLE still_allowed (x int)")


def test_reader_url_works_from_a_home_with_spaces_and_non_ascii(tmp_path):
    home = tmp_path / "my photos é"
    env = {"VECSEARCH_HOME": str(home), "VECSEARCH_DATABASE_URL": ""}
    try:
        url = run_cli("db", "reader", "notebook", env=env, check=True).stdout.strip()
        assert "+" not in url.split("?", 1)[1] and "%20" in url
        with psycopg.connect(url) as analyst:
            assert analyst.execute("SELECT count(*) FROM images").fetchone() == (0,)
        assert run_cli("db", "url", env=env, check=True).stdout.strip().split("?")[1].startswith("host=")
    finally:
        server.stop(home)


def test_two_first_db_starts_at_once_both_succeed(tmp_path):
    for attempt in range(3):
        env = {**os.environ, "VECSEARCH_HOME": str(tmp_path / f"home{attempt}"), "VECSEARCH_DATABASE_URL": ""}
        try:
            procs = [subprocess.Popen(cli_command("db", "start"), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
            results = [(p.wait(120), p.stderr.read()) for p in procs]
            assert [code for code, _ in results] == [0, 0], results
        finally:
            server.stop(tmp_path / f"home{attempt}")


# -- 5. the gallery survives `db start --tcp` and fails fast while the server is down ---------------


def test_gallery_follows_a_server_restart_on_another_port_and_fails_fast_while_it_is_down(
        embedder, tmp_path):
    from vecsearch.config import Settings

    home = tmp_path / "home"
    env = {"VECSEARCH_HOME": str(home), "VECSEARCH_DATABASE_URL": ""}
    settings = Settings(database_url=None, home=home)
    make_image(tmp_path / "pics" / "a.png", 1, (40, 40))
    try:
        load(settings, tmp_path / "pics", embedder, workers=0)
        app = web.create_app(settings)
        with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
            assert client.get("/api/images").json()["total"] == 1
            run_cli("db", "start", "--tcp", "--port", "54377", env=env, check=True)  # a restart
            assert server.running(home).port == 54377
            assert client.get("/api/images").json()["total"] == 1
            run_cli("db", "stop", env=env, check=True)
            started = time.monotonic()
            down = client.get("/api/images")
            assert down.status_code == 503 and time.monotonic() - started < 3
            assert "not running" in down.json()["error"]
            run_cli("db", "start", "--no-tcp", env=env, check=True)
            assert client.get("/api/images").json()["total"] == 1
    finally:
        server.stop(home)


def test_commands_work_at_once_after_the_server_is_sigkilled(tmp_path):
    """Its pid may linger as a zombie until reaped: it must not count as a running server."""
    home = tmp_path / "home"
    env = {"VECSEARCH_HOME": str(home), "VECSEARCH_DATABASE_URL": ""}
    # The server's parent stays alive and never reaps it, as a shell or supervisor may.
    parent = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from vecsearch import server; "
                               "print(server.ensure_running(Path(sys.argv[1])).pid, flush=True); "
                               "time.sleep(120)", str(home)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        assert open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        started = time.monotonic()
        assert "stopped" in run_cli("db", "status", env=env, check=True).stdout
        result = run_cli("similar", "1", env=env)  # starts the server on demand, as every command
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: the database has no images"), result.stderr
        assert time.monotonic() - started < 15
    finally:
        parent.kill()
        parent.wait()
        server.stop(home)


# -- 6. memory bounded by what decoding allocates, for tiny files that claim huge images ----------

_PEAK = """
import io, resource, sys
from vecsearch.errors import UnreadableImage
from vecsearch.images import model_input, open_decoded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    model_input(open_decoded(sys.argv[1]).image)
    outcome = "decoded"
except UnreadableImage as e:
    outcome = str(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, outcome)
"""


def _peak_mb(path: Path) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True,
                         check=True).stdout.split(" ", 1)
    return int(out[0]), out[1].strip()


def _progressive_jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A small progressive JPEG whose frame header is patched to claim width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG", progressive=True, quality=50)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc2")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


def test_a_small_16_bit_png_of_a_huge_size_decodes_in_bounded_memory(tmp_path):
    path = tmp_path / "grey16.png"
    Image.new("I;16", (9400, 9400), 40000).save(path)
    assert path.stat().st_size < 1_000_000
    peak, outcome = _peak_mb(path)
    assert outcome == "decoded"
    assert peak < 800, peak  # 2.4 GB before: float64 conversion of the whole raster


def test_a_tiny_progressive_jpeg_claiming_13000_squared_is_refused_without_the_memory(tmp_path):
    path = _progressive_jpeg_claiming(tmp_path / "claims.jpg", 13000, 13000)
    assert path.stat().st_size < 1000
    peak, outcome = _peak_mb(path)
    assert "decompression bomb? decoding this 13000x13000 JPEG" in outcome, outcome
    assert peak < 100, peak


def test_a_truncated_jpeg_is_reported_as_truncated(tmp_path):
    path = tmp_path / "cut.jpg"
    make_image(tmp_path / "whole.jpg", 9, (400, 300))
    Image.open(tmp_path / "whole.jpg").save(tmp_path / "prog.jpg", progressive=True)
    data = (tmp_path / "prog.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    peak, outcome = _peak_mb(path)
    assert "truncated" in outcome, outcome
    assert _peak_mb(tmp_path / "prog.jpg")[1] == "decoded"


def test_a_small_jpeg_claiming_more_pixels_than_its_bytes_can_hold_is_reported_as_truncated(tmp_path):
    peak, outcome = _peak_mb(_progressive_jpeg_claiming(tmp_path / "claims.jpg", 3000, 2000))
    assert "truncated file (" in outcome and "bytes cannot hold a 3000x2000 JPEG)" in outcome, outcome


# -- 8. one `error:` line, never a traceback, and checked before the long work -------------------


def _one_error_line(result, code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_non_utf8_paths_in_arguments_are_one_line(settings, conn, tmp_path):
    insert_vectors(conn, clustered(3, seed=1))
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    os.makedirs(bad)
    for args in (("similar", "1", "--under", bad), ("search", bad + "/x.jpg"),
                 ("load", bad, "--weights", "random")):
        assert "is not valid UTF-8" in _one_error_line(invoke_cli(*args)), args


def test_errors_file_is_checked_before_the_load_and_a_full_disk_keeps_the_summary(settings, tmp_path):
    folder = tmp_path / "pics"
    make_image(folder / "a.png", 1, (32, 32))
    (folder / "bad.jpg").write_text("not an image")
    for target in (tmp_path / "missing" / "e.csv", tmp_path):
        line = _one_error_line(invoke_cli("load", str(folder), "--weights", "random", "--errors",
                                          str(target)))
        assert line.startswith(f"error: cannot write --errors file {target}")
    with psycopg.connect(settings.database_url) as c:
        assert c.execute("SELECT count(*) FROM images").fetchone() == (0,)  # nothing was loaded
    full = invoke_cli("load", str(folder), "--weights", "random", "--errors", "/dev/full")
    assert full.returncode == 1 and "found 2, new 1" in full.stdout, full.stdout + full.stderr
    assert full.stderr.strip().splitlines()[-1] == \
        "error: cannot write --errors file /dev/full: No space left on device"


def test_bad_settings_and_options_are_one_line_before_any_work(settings, conn, tmp_path):
    insert_vectors(conn, clustered(3, seed=2))
    folder = tmp_path / "pics"
    make_image(folder / "a.png", 1, (32, 32))
    assert "VECSEARCH_HNSW_M must be an integer" in _one_error_line(
        invoke_cli("db", "status", env={"VECSEARCH_HNSW_M": "abc"}))
    for args in (("dupes", "--ef-search", "5000"),
                 ("eval", "perturb", str(folder), "--weights", "random", "--ef-search", "5000"),
                 ("eval", "labels", str(folder), "--weights", "random", "--ef-search", "0")):
        assert "ef-search must be between 1 and 1000" in _one_error_line(invoke_cli(*args)), args
    assert "does not exist" in _one_error_line(invoke_cli("dupes", "--html", str(tmp_path / "no" / "x.html")))
    assert "--revision 9999: " in _one_error_line(invoke_cli("db", "migrate", "--revision", "9999"))
    line = _one_error_line(invoke_cli("db", "migrate", "--revision", "0001"))
    assert f"the schema is at {db.SCHEMA_REVISION}, newer than 0001" in line
    assert db.schema_revision(conn) == db.SCHEMA_REVISION
    for args in (("similar",), ("similar", "1", "-k", "x"), ("load",), ("nosuchcommand",),
                 ("similar", "1", "--nosuchoption")):
        line = _one_error_line(invoke_cli(*args))  # not click's Usage/Try/Error block
        assert "--help" in line, args


# -- 9. nothing a file name holds reaches the terminal as a control sequence ----------------------


def test_control_characters_in_names_are_escaped_and_paths0_keeps_them(settings, conn, tmp_path):
    evil = "/pics/\x1b]0;owned\x07\x1b[2Jname\nsecond line.jpg"
    insert_vectors(conn, clustered(3, seed=3), [evil, "/pics/b.jpg", "/pics/c.jpg"])
    table = invoke_cli("similar", "2", env={"COLUMNS": "200"}, check=True).stdout
    assert "\x1b" not in table and "\x07" not in table and "\\x1b]0;owned\\x07" in table
    found = invoke_cli("similar", "2", "-f", "paths0", check=True).stdout
    assert found.endswith("\0") and evil in found.split("\0")
    folder = tmp_path / "load"
    (folder).mkdir()
    (folder / "\x1b[2Jbad.jpg").write_text("not an image")
    result = invoke_cli("load", str(folder), "--weights", "random")
    assert result.returncode == 2 and "\x1b" not in result.stderr and "\\x1b[2Jbad.jpg" in result.stderr


# -- 11. arithmetic judged against the terms' own scale; 13. the SQL function's silent cases -------


def test_arithmetic_scale_and_non_finite_weights(settings, conn):
    ids = insert_vectors(conn, clustered(5, seed=4))
    tiny = invoke_cli("similar", f"{ids[0]}*1e-7", "-f", "json", check=True)
    assert len(json.loads(tiny.stdout)) == 4
    caret = invoke_cli("similar", f"{ids[0]}*1e400")  # a caret under the weight, as for any bad expression
    assert caret.returncode == 1 and "weight 1e400 is not a finite number" in caret.stderr.splitlines()[0]
    assert "cancels out" in _one_error_line(invoke_cli("similar", f"{ids[0]} - {ids[0]}"))


def test_similar_to_ignores_null_excluded_ids_and_refuses_a_zero_vector(settings, conn):
    ids = insert_vectors(conn, clustered(5, seed=5))
    rows = conn.execute("SELECT id FROM vecsearch_similar_to((SELECT embedding FROM images WHERE id = %s), "
                        "3, exclude => ARRAY[NULL, %s]::bigint[])", [ids[0], ids[0]]).fetchall()
    assert len(rows) == 3 and ids[0] not in [r[0] for r in rows]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="zero vector"):
        conn.execute("SELECT * FROM vecsearch_similar_to(array_fill(0, ARRAY[2048])::vector, 3)")


# -- 12. the web app's error cases -----------------------------------------------------------------


def test_web_nul_in_query_file_terms_and_bad_host_are_clean_errors(settings, conn):
    ids = insert_vectors(conn, clustered(3, seed=6))
    app = web.create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        response = client.get("/api/images", params={"q": "\x00"})
        assert response.status_code == 400 and response.json()["status"] == 400
        response = client.get("/api/arithmetic", params={"expr": f"{ids[0]} + x.jpg"})
        assert response.status_code == 400
        message = response.json()["error"]
        assert "'x.jpg'" in message and "PosixPath" not in message and os.getcwd() not in message
        response = client.get("/api/images", headers={"host": "evil.example"})
        assert response.status_code == 400 and "invalid Host header" in response.json()["error"]
        page = client.get("/", headers={"host": "evil.example"})
        assert page.status_code == 400 and "text/html" in page.headers["content-type"]
        assert "invalid Host header" in page.text


def test_usage_errors_are_one_line_and_exit_1():
    """An unknown option, a bad option value or a missing argument is bad input: one `error:` line
    naming it and the command's --help, exit 1 (load's 2 means "finished, some files skipped").
    No command at all shows the help."""
    for args, said in ((["similar", "--bogus"], "No such option: --bogus (see `vecsearch similar --help`)"),
                       (["similar", "1", "--ef-search", "x"], "'--ef-search': 'x' is not a valid"),
                       (["load"], "Missing argument 'folder'. (see `vecsearch load --help`)"),
                       (["db", "recall", "--bogus"], "(see `vecsearch db recall --help`)")):
        result = invoke_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("error: ") and said in lines[0], (args, lines)
    result = invoke_cli()
    assert result.returncode == 1 and "Usage: vecsearch [OPTIONS] COMMAND" in result.stderr
