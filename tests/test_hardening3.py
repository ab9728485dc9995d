"""Hardening, round 3 (issue 18): killed lock holders, the reindex swap, readers that write or
squat on locks, values a restore must refuse, restore against a load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import psycopg
import pytest
from conftest import cli_command, clustered, fresh_database, insert_vectors, invoke_cli, make_image
from test_web_api import live_server

from vecsearch import db, hnsw, logins, server, sessions
from vecsearch.errors import DatabaseBusy


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def one_error_line(result, code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


# --- 2: killed lock holders -------------------------------------------------------------------

def test_a_killed_reindex_ends_its_server_session_within_seconds_even_in_a_lock_wait(settings, conn):
    """kill -9 of `db reindex` while its CREATE INDEX waits: the server ends that session by itself
    (client_connection_check_interval) while the blocker still holds the table, instead of building
    the index for nobody once the lock comes."""
    insert_vectors(conn, clustered(100, seed=31))
    with psycopg.connect(settings.database_url, autocommit=True) as lock:
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE images IN ROW EXCLUSIVE MODE")  # CREATE INDEX waits for it
        proc = subprocess.Popen(cli_command("db", "reindex", "--m", "20", "--ef-construction", "60"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            backend = wait_for(lambda: conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND application_name LIKE 'vecsearch reindex %%'"
            ).fetchone(), 60, "the named rebuild to wait on the lock")[0]
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            wait_for(lambda: conn.execute("SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)",
                                          [backend]).fetchone()[0], 10, "the killed reindex's session to end")
        finally:
            if proc.poll() is None:
                proc.kill()
        lock.execute("ROLLBACK")
    assert hnsw.index_options(conn) == {"m": 32, "ef_construction": 128}


@pytest.mark.parametrize("command", ["reindex", "restore"])
def test_a_session_left_holding_the_index_lock_by_a_dead_command_is_ended_by_the_next(
        settings, conn, command):
    """Whatever kept a dead reindex's or restore's session open, `db reindex` ends it and runs."""
    insert_vectors(conn, clustered(30, seed=32))
    with psycopg.connect(settings.database_url, autocommit=True) as orphan:
        orphan.execute("SELECT set_config('application_name', %s, false)",
                       [f"vecsearch {command} {socket.gethostname()[:30]}:{dead_pid()}"])
        orphan.execute(f"SELECT pg_advisory_lock({hnsw.LOCK_KEY})")
        result = invoke_cli("db", "reindex", "--m", "20", "--ef-construction", "60")
        assert result.returncode == 0, result.stderr
        assert hnsw.index_options(conn) == {"m": 20, "ef_construction": 60}
        with pytest.raises(psycopg.OperationalError):
            orphan.execute("SELECT 1")


def test_restore_names_its_session_and_a_busy_index_lock_names_its_holder(settings, conn, tmp_path):
    insert_vectors(conn, clustered(3, seed=33))
    dump = tmp_path / "vs.dump"
    invoke_cli("db", "backup", str(dump), check=True)
    with psycopg.connect(settings.database_url) as blocker:  # an open transaction on the table
        blocker.execute("SELECT count(*) FROM images").fetchone()
        proc = subprocess.Popen(cli_command("db", "restore", str(dump), "--wait", "30"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: conn.execute("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE "
                                          "application_name = %s)", [f"vecsearch restore "
                                          f"{socket.gethostname()[:30]}:{proc.pid}"]).fetchone()[0],
                     30, "the restore's named session")
        finally:
            proc.kill()
            proc.wait()
        blocker.rollback()
    # A live session that is no vecsearch command holding the index lock is named, not guessed at.
    with psycopg.connect(settings.database_url, autocommit=True) as squatter:
        squatter.execute(f"SELECT pg_advisory_lock({hnsw.LOCK_KEY})")
        line = one_error_line(invoke_cli("db", "reindex"))
        assert f"pid {squatter.info.backend_pid}, role " in line


# --- 3: the swap never queues ahead of queries --------------------------------------------------

def test_the_reindex_swap_never_stalls_queries_and_gives_up_keeping_the_old_index(settings, conn):
    insert_vectors(conn, clustered(60, seed=34))
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            with db.connect(settings) as c:
                hnsw.reindex(c, m=20, ef_construction=60, swap_wait=3)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    with psycopg.connect(settings.database_url) as long_reader:  # an open read transaction
        long_reader.execute("SELECT count(*) FROM images").fetchone()
        worker = threading.Thread(target=run)
        worker.start()
        try:
            wait_for(lambda: conn.execute(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE query LIKE 'DROP INDEX%%' "
                "OR query LIKE '%%SAVEPOINT swap%%')"
            ).fetchone()[0], 60, "the swap to start")
            with psycopg.connect(settings.database_url, autocommit=True) as query:
                query.execute("SET statement_timeout = '1s'")
                for _ in range(4):  # new queries keep running while the swap waits
                    assert query.execute("SELECT count(*) FROM vecsearch_similar(1, 3)").fetchone() == (3,)
                    time.sleep(0.2)
        finally:
            worker.join(15)  # gave up by itself (today); the old code waited for the reader
            long_reader.rollback()
            worker.join(60)
    assert isinstance(outcome[0], DatabaseBusy), outcome
    assert "the old index stays" in str(outcome[0])
    assert hnsw.index_options(conn) == {"m": 32, "ef_construction": 128}
    assert conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'images_embedding_hnsw%'"
                        ).fetchone() == (1,)


# --- 4: readers -----------------------------------------------------------------------------------

def test_reader_logins_cannot_store_large_objects_or_take_the_index_lock(settings, conn):
    insert_vectors(conn, clustered(3, seed=35))
    name = f"squatter_{os.getpid()}"
    password = logins.create(conn, name)
    try:
        with psycopg.connect(logins.url(settings, conn, name, password), autocommit=True) as analyst:
            for statement in ("SELECT lo_from_bytea(0, 'x')", "SELECT lo_create(0)", "SELECT lo_creat(-1)",
                              f"SELECT pg_advisory_lock({hnsw.LOCK_KEY})",
                              f"SELECT pg_try_advisory_lock_shared({sessions.LOAD_LOCK})",
                              "SELECT pg_advisory_xact_lock(1)", "SELECT pg_try_advisory_lock(1, 2)"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    analyst.execute(statement)
            # What PostgreSQL cannot deny, and docs/security.md says so: a login may lift its own
            # timeouts (SET, or ALTER ROLE itself); the swap and restore still never wait on it.
            analyst.execute(psycopg.sql.SQL("ALTER ROLE {} SET statement_timeout = 0").format(
                psycopg.sql.Identifier(name)))
    finally:
        logins.drop(conn, name)
    assert conn.execute("SELECT lo_unlink(lo_from_bytea(0, 'x'))").fetchone() == (1,)  # vecsearch itself


def test_a_load_says_who_holds_the_lock_instead_of_silently_skipping_the_repair(settings, conn, tmp_path):
    folder = tmp_path / "few"
    make_image(folder / "a.png", 40, (48, 48))
    assert invoke_cli("load", str(folder), "--weights", "random", "--workers", "0").returncode == 0
    definition = conn.execute("SELECT pg_get_indexdef('images_embedding_hnsw'::regclass)").fetchone()[0]
    with psycopg.connect(settings.database_url, autocommit=True) as squatter:
        squatter.execute(f"SELECT pg_advisory_lock({hnsw.LOCK_KEY})")
        import json
        mark = hnsw.DROPPED_MARK + json.dumps({"index": definition, "previous_comment": None})
        squatter.execute(psycopg.sql.SQL("COMMENT ON TABLE images IS {}").format(psycopg.sql.Literal(mark)))
        squatter.execute("DROP INDEX images_embedding_hnsw")
        result = invoke_cli("load", str(folder), "--weights", "random", "--workers", "0")
        assert result.returncode == 0, result.stderr
        assert f"its lock is held by session pid {squatter.info.backend_pid}, role " in result.stderr


# --- 7, 9: values a restore refuses ---------------------------------------------------------------

def test_the_schema_refuses_values_the_loader_never_writes(settings, conn):
    insert_vectors(conn, clustered(1, seed=36))
    for change in ("bytes = -1", "width = -5", "height = 0", "mtime = 'infinity'", "mtime = '-infinity'"):
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(f"UPDATE images SET {change}")


DROP_TRIGGERS = """DO $$ DECLARE t text; BEGIN
    FOR t IN SELECT tgname FROM pg_trigger WHERE tgrelid = 'images'::regclass AND NOT tgisinternal LOOP
        EXECUTE format('DROP TRIGGER %I ON images', t);
    END LOOP; END $$"""
CRAFTED = {
    "infinite mtime": ["ALTER TABLE images DROP CONSTRAINT images_mtime_check",
                       "UPDATE images SET mtime = 'infinity'"],
    "negative sizes": ["ALTER TABLE images DROP CONSTRAINT images_bytes_check",
                       "ALTER TABLE images DROP CONSTRAINT images_size_check",
                       "UPDATE images SET bytes = -1, width = -5"],
    "NaN vector": ["DROP INDEX images_embedding_hnsw", DROP_TRIGGERS,
                   "ALTER TABLE images ALTER COLUMN embedding TYPE text",
                   "UPDATE images SET embedding = '[' || array_to_string(array_fill('NaN'::text, "
                   "ARRAY[2048]), ',') || ']'"],
    "largest id": ["INSERT INTO images OVERRIDING SYSTEM VALUE SELECT 9223372036854775807, path || '.x', "
                   "sha256, bytes, width, height, format, mtime, loaded_at, embedding FROM images LIMIT 1"],
    "duplicate paths": ["ALTER TABLE images DROP CONSTRAINT images_pkey",
                        "INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
                        "SELECT path, sha256, bytes, width, height, format, mtime, embedding FROM images"],
    "two model rows": ["ALTER TABLE embedding_model DROP CONSTRAINT embedding_model_pkey",
                       "INSERT INTO embedding_model VALUES (true, 'a', 'b', '{}', 2048), "
                       "(true, 'c', 'd', '{}', 2048)"],
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_restore_refuses_values_the_schema_refuses_with_one_line(settings, conn, pg_home, tmp_path, case):
    insert_vectors(conn, clustered(3, seed=37))
    with fresh_database(pg_home) as url, psycopg.connect(url, autocommit=True) as other:
        db.register_vector(other)
        insert_vectors(other, clustered(2, seed=38))
        for statement in CRAFTED[case]:
            other.execute(statement)
        dump = tmp_path / "crafted.dump"
        server.run_binary("pg_dump", ["--format=custom", f"--file={dump}", url], check=True)
    line = one_error_line(invoke_cli("db", "restore", str(dump)))
    assert "holds rows this vecsearch's schema refuses" in line and "nothing was restored" in line
    assert conn.execute("SELECT count(*) FROM images").fetchone() == (3,)


# --- 8: restore against a load --------------------------------------------------------------------

def test_a_restore_is_refused_while_a_load_runs_and_a_load_while_a_restore_runs(settings, conn, tmp_path):
    insert_vectors(conn, clustered(3, seed=39))
    dump = tmp_path / "vs.dump"
    invoke_cli("db", "backup", str(dump), check=True)
    with psycopg.connect(settings.database_url, autocommit=True) as loading:  # as a running load holds it
        sessions.watch(loading, "load")
        assert loading.execute(f"SELECT pg_try_advisory_lock_shared({sessions.LOAD_LOCK})").fetchone()[0]
        line = one_error_line(invoke_cli("db", "restore", str(dump)))
        assert "a `vecsearch load` is running (session pid " in line
    with psycopg.connect(settings.database_url, autocommit=True) as restoring:  # as a restore holds it
        restoring.execute("BEGIN")
        restoring.execute(f"SELECT pg_advisory_xact_lock({sessions.LOAD_LOCK})")
        folder = tmp_path / "one"
        make_image(folder / "a.png", 41, (48, 48))
        line = one_error_line(invoke_cli("load", str(folder), "--weights", "random", "--workers", "0"))
        assert "a `vecsearch db restore` is running" in line
        restoring.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) FROM images").fetchone() == (3,)
    # A dead load's session left holding it (its socket kept open) does not block a restore.
    with psycopg.connect(settings.database_url, autocommit=True) as orphan:
        orphan.execute("SELECT set_config('application_name', %s, false)",
                       [f"vecsearch load {socket.gethostname()[:30]}:{dead_pid()}"])
        orphan.execute(f"SELECT pg_advisory_lock_shared({sessions.LOAD_LOCK})")
        assert invoke_cli("db", "restore", str(dump)).returncode == 0


# --- 5: decode memory bounded by a budget computed before decoding --------------------------------

_PEAK = """
import resource, sys
from vecsearch.errors import UnreadableImage
from vecsearch.images import model_input, open_decoded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decoded = open_decoded(sys.argv[1])
    model_input(decoded.image)
    outcome = f"decoded {decoded.width}x{decoded.height}"
except UnreadableImage as e:
    outcome = str(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, outcome)
"""


def _png(path, side: int, color_type: int, depth: int) -> None:
    """A flat PNG of side x side written row by row (small file, no big buffer here)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row = b"\0" + bytes([7]) * (side * channels * depth // 8)
    packer = zlib.compressobj(1)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    extra = chunk(b"PLTE", bytes(range(24))) + chunk(b"tRNS", b"\0") if color_type == 3 else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, depth,
                     color_type, 0, 0, 0)) + extra + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _claiming(path, side: int):
    """A 64 x 64 AVIF whose `ispe` header claims side x side."""
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(path, speed=10)
    data = bytearray(path.read_bytes())
    at = data.find(b"ispe")
    data[at + 8:at + 16] = side.to_bytes(4, "big") * 2
    path.write_bytes(bytes(data))


def _make(kind: str, path) -> None:
    from PIL import Image

    if kind.endswith("png"):
        color_type, depth = {"grey16.png": (0, 16), "palette_alpha.png": (3, 8), "la.png": (4, 8),
                             "rgba.png": (6, 8)}[kind]
        _png(path, 9400 if kind in ("grey16.png", "palette_alpha.png") else 9000, color_type, depth)
    elif kind == "float.tif":
        Image.new("F", (9000, 9000), 0.5).save(path, compression="tiff_deflate")
    elif kind == "lossless.webp":
        Image.new("RGBA", (9400, 9400), (120, 30, 20, 200)).save(path, lossless=True, quality=0, method=0)
    else:
        _claiming(path, 30000 if kind == "claims_30000.avif" else 9000)


# Peak RSS of decoding one file before this round (baseline subtracted): 763, 848, 1009, 1009,
# 1242, 1775 and 741 MB; the 30000-squared AVIF was "a AVIF file of a kind Pillow cannot decode".
@pytest.mark.parametrize("kind", ["grey16.png", "palette_alpha.png", "rgba.png", "float.tif",
                                  "lossless.webp", "claims_9000.avif", "claims_30000.avif"])
def test_decoding_any_format_stays_within_the_stated_memory_limit(tmp_path, kind):
    import sys

    from vecsearch.images import MAX_DECODED_BYTES

    path = tmp_path / kind
    _make(kind, path)
    assert path.stat().st_size < 2_000_000
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True,
                         check=True).stdout.split(" ", 1)
    peak, outcome = int(out[0]), out[1].strip()
    assert peak < MAX_DECODED_BYTES / 2**20 + 32, (peak, outcome)
    if kind.endswith(("png", ".tif")):
        assert outcome.startswith("decoded 9"), outcome
    else:
        assert "decompression bomb?" in outcome and "over the limit of" in outcome, outcome


# --- 6, 11: originals streamed; names escaped in pages, downloads and contact sheets -------------

def _index_file(conn, path) -> int:
    """A row for `path` as `vecsearch load` writes it (its real sha256 and size)."""
    import hashlib

    data = path.read_bytes()
    return conn.execute(
        "INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
        "VALUES (%s, %s, %s, 16, 16, 'JPEG', now(), %s) RETURNING id",
        [str(path), hashlib.sha256(data).hexdigest(), len(data), clustered(1, seed=40)[0]]).fetchone()[0]


def _get(address, target: str, read: bool = True):
    import http.client

    conn = http.client.HTTPConnection(*address, timeout=30)
    conn.request("GET", target)
    response = conn.getresponse()
    if not read:
        return conn, response
    body, total = b"", 0
    while chunk := response.read(1 << 16):
        body += chunk if len(body) < 1 << 20 else b""  # the test keeps only the start
        total += len(chunk)
    conn.close()
    declared = response.getheader("content-length")
    return response, None if declared and total < int(declared) else body  # None: ended short


def test_originals_stream_in_bounded_memory_a_few_at_once_and_never_finish_if_changed(
        settings, conn, tmp_path):
    import tracemalloc

    from PIL import Image

    from vecsearch import web
    from vecsearch.web.state import ORIGINALS_AT_ONCE

    photo = tmp_path / "trailing.jpg"
    Image.new("RGB", (16, 16), (9, 99, 199)).save(photo, quality=90)
    with open(photo, "ab") as f:  # 48 MB of trailing bytes: still the same JPEG to a decoder
        f.write(b"\0" * (48 << 20))
    image_id = _index_file(conn, photo)
    with live_server(web.create_app(settings)) as address:
        tracemalloc.start()
        try:
            results = []
            target = f"/media/{image_id}/original"
            threads = [threading.Thread(target=lambda: results.append(_get(address, target)))
                       for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [r[0].status for r in results] == [200] * 4
        assert all(body is not None and body.startswith(b"\xff\xd8") for _, body in results)
        assert peak < 24 << 20, peak  # 4 x 48 MB and more before: each request read the whole file
        # At most ORIGINALS_AT_ONCE at a time: the next one is told to retry; leaving frees them.
        held = [_get(address, f"/media/{image_id}/original", read=False) for _ in range(ORIGINALS_AT_ONCE)]
        assert all(r.status == 200 for _, r in held)
        busy, _ = _get(address, f"/media/{image_id}/original")
        assert busy.status == 503 and busy.getheader("retry-after")
        for c, _ in held:
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
        wait_for(lambda: _get(address, f"/media/{image_id}/thumb")[0].status == 200 and
                 _get(address, f"/media/{image_id}/original")[0].status == 200, 30, "the slots back")
        # The same size, another last byte: the response never completes.
        data = bytearray(photo.read_bytes())
        data[-1] ^= 1
        photo.write_bytes(bytes(data))
        response, body = _get(address, f"/media/{image_id}/original")
        assert response.status == 404 or body is None, (response.status, body and len(body))


ODD = "odd\x1b[2J\x07\u009b\u202eevil\u202dgpj.exe.jpg"


def test_control_and_bidi_characters_are_escaped_in_pages_downloads_and_contact_sheets(
        settings, conn, tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    from vecsearch import dupes, sheet, web

    photo = tmp_path / ODD
    Image.new("RGB", (16, 16), (9, 99, 199)).save(photo, "JPEG")
    image_id = _index_file(conn, photo)
    raw = ("\x1b", "\x07", "\u009b", "\u202e", "\u202d")
    with TestClient(web.create_app(settings), base_url="http://127.0.0.1:8000") as client:
        for page in (f"/images/{image_id}", "/"):
            html = client.get(page).text
            assert not any(c in html for c in raw), page
            assert "\\u202eevil" in html
        download = client.get(f"/media/{image_id}/original")
        assert download.status_code == 200
        assert "%E2%80%AE" not in download.headers["content-disposition"].upper()
    member = dupes.Member(image_id, str(photo), 16, 16, photo.stat().st_size, "JPEG", "0" * 64, 0.0)
    out = tmp_path / "sheet.html"
    sheet.write_contact_sheet(dupes.DupesResult([dupes.Group([member, member])], 0.05, 2), out, settings.home)
    text = out.read_text()
    assert not any(c in text for c in raw) and "\\u202eevil" in text


def test_an_original_edited_in_place_while_it_is_sent_never_reaches_its_end(tmp_path):
    import hashlib

    from vecsearch.errors import NotFound
    from vecsearch.verified_files import CHUNK, Verified

    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * CHUNK + 5))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stream = iter(Verified().stream(1, str(path), digest, path.stat().st_size))
    sent = [next(stream)]
    with open(path, "r+b") as f:  # the same inode: the open descriptor sees the edit
        f.seek(-1, os.SEEK_END)
        f.write(b"\0" if path.read_bytes()[-1] else b"\1")
    with pytest.raises(NotFound, match="changed since it was loaded"):
        sent.extend(stream)
    assert sum(map(len, sent)) < path.stat().st_size


# --- 9, 10, 12: the minors, each one line ----------------------------------------------------------

def test_shard_digits_and_negative_workers_are_one_line_before_any_work(settings, tmp_path):
    folder = tmp_path / "one"
    make_image(folder / "a.png", 42, (48, 48))
    for args, message in ((["--shard", "²/3"], "--shard '²/3': give K/N"),
                          (["--shard", "1/٣"], "give K/N"), (["--workers", "-5"], "-5")):
        line = one_error_line(invoke_cli("load", str(folder), "--weights", "random", *args))
        assert message in line, line


def test_arithmetic_extremes_are_queries_not_nan_or_a_wrong_reason(settings, conn):
    import numpy as np

    from vecsearch import expr
    from vecsearch.errors import InvalidInput

    ids = insert_vectors(conn, clustered(5, seed=43))
    a, b = (np.asarray(conn.execute("SELECT embedding FROM images WHERE id = %s", [i]).fetchone()[0]
                       .to_numpy(), dtype=np.float64) for i in ids[:2])
    for text, expected in ((f"{ids[0]}*5e-324", a), (f"{ids[0]}*1e-300", a),
                           (f"{ids[0]}*1e308 + {ids[1]}*1e308", a + b),
                           (f"{ids[0]}*1e308 + {ids[1]}*1.5e308", a + 1.5 * b)):
        vector, _ = expr.evaluate(conn, expr.parse(text), embed_file=None)
        assert np.all(np.isfinite(vector)), text
        assert float(vector @ (expected / np.linalg.norm(expected))) > 0.9999, text
    with pytest.raises(InvalidInput, match="cancels out"):
        expr.evaluate(conn, expr.parse(f"{ids[0]}*1e-300 - {ids[0]}*1e-300"), embed_file=None)
    result = invoke_cli("similar", f"{ids[0]}*5e-324", "-k", "2")
    assert result.returncode == 0, result.stderr


def test_decode_warnings_name_the_file_they_are_about(settings, tmp_path):
    import io
    import struct

    from PIL import Image

    folder = tmp_path / "exif"
    # An EXIF block whose one tag claims data past the end of the block: Pillow warns while reading it.
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010E, 2, 200, 1000) + b"\0" * 4
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "JPEG", exif=b"Exif\x00\x00" + tiff)
    folder.mkdir()
    (folder / "bad_exif.jpg").write_bytes(buf.getvalue())
    result = invoke_cli("load", str(folder), "--weights", "random", "--workers", "0")
    assert result.returncode == 0, result.stderr
    warned = [x for x in result.stderr.splitlines()
              if x.startswith("warning: ") and "--weights random" not in x]
    assert warned and all("bad_exif.jpg: " in x for x in warned), result.stderr


def test_a_killed_migration_ends_its_server_session_within_seconds_even_in_a_lock_wait(pg_home):
    running = server.ensure_running(pg_home)
    name = f"migrate_kill_{os.getpid()}"
    with server.psql_connection(running) as c:
        c.execute(f"CREATE DATABASE {name}")
    url = running.url(name)
    env = {**os.environ, "VECSEARCH_DATABASE_URL": url}
    waiting = ("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
               "AND application_name LIKE 'vecsearch migrate %%'")
    gone = "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)"
    try:
        with psycopg.connect(url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(727112001)")  # migrations/env.py's MIGRATION_LOCK
            proc = subprocess.Popen(cli_command("db", "migrate"), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env)
            try:
                backend = wait_for(lambda: holder.execute(waiting).fetchone(), 60, "the migration's wait")[0]
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                wait_for(lambda: holder.execute(gone, [backend]).fetchone()[0], 10,
                         "the killed migration's session to end")
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        with server.psql_connection(running) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_malformed_cuda_device_is_one_line():
    from vecsearch.engine import check_choice
    from vecsearch.errors import InvalidInput

    check_choice("cuda:1", "auto")
    for bad in ("cuda:abc", "cuda:", "cuda:²"):
        with pytest.raises(InvalidInput, match="--device must be one of"):
            check_choice(bad, "auto")
