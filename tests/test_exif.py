"""Photo metadata (migration 0009, vecsearch/exif.py): EXIF read by the decode worker into columns,
hostile EXIF as NULL and a counted warning, the re-read of unchanged rows, and the taken_after /
taken_before / camera filters of the neighbour query, which keep returning k rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest
from conftest import (
    clustered,
    exact_neighbours,
    fresh_database,
    insert_vectors,
    make_dng,
    make_image,
    nested_plans,
    run_cli,
)
from PIL import Image

from vecsearch import db, exif, query
from vecsearch.config import Settings
from vecsearch.images import open_decoded
from vecsearch.load import load
from vecsearch.progress import Progress

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def exif_block(make: object = "Canon", model: object = "Canon EOS R5", taken: object = "2024:05:01 10:11:12",
               offset: object = "+02:00", lens: object = "RF24-105mm F4 L IS USM",
               gps: tuple | None = ("N", (48.0, 51.0, 30.5), "W", (2.0, 17.0, 40.0)),
               orientation: object = 1) -> Image.Exif:
    """An EXIF block with these values (None leaves a tag out), any type the caller gives."""
    block = Image.Exif()
    for tag, value in ((exif.MAKE, make), (exif.MODEL, model), (exif.ORIENTATION, orientation)):
        if value is not None:
            block[tag] = value
    main = block.get_ifd(exif.EXIF_IFD)
    for tag, value in ((exif.DATETIME_ORIGINAL, taken), (exif.OFFSET_TIME_ORIGINAL, offset),
                       (exif.LENS_MODEL, lens)):
        if value is not None:
            main[tag] = value
    if gps is not None:
        where = block.get_ifd(exif.GPS_IFD)
        where[exif.GPS_LAT_REF], where[exif.GPS_LAT], where[exif.GPS_LON_REF], where[exif.GPS_LON] = gps
    return block


def photo(path: Path, seed: int, block: Image.Exif | bytes | None, fmt: str | None = None) -> Path:
    """A real picture (conftest.make_image) saved with this EXIF block."""
    img = Image.open(make_image(path.with_suffix(".src.png"), seed=seed)).convert("RGB")
    path.with_suffix(".src.png").unlink()
    if block is None:
        img.save(path, format=fmt)
    else:
        img.save(path, format=fmt, exif=block)
    return path


class Warnings(Progress):
    def __init__(self) -> None:
        self.notes: dict[str, str] = {}
        self.failures: list[tuple[str, str]] = []

    def warned_about(self) -> set[str]:
        return {Path(p).name for p in self.notes}

    def warned(self, path: str, reason: str) -> None:
        self.notes[path] = reason

    def failed(self, path: str, reason: str) -> None:
        self.failures.append((path, reason))


# -- reading ---------------------------------------------------------------------------------


def test_a_jpegs_exif_becomes_the_fields(tmp_path):
    found = open_decoded(photo(tmp_path / "a.jpg", 1, exif_block(orientation=6))).metadata
    assert found == exif.PhotoMetadata(
        taken_at=datetime(2024, 5, 1, 10, 11, 12), taken_offset=timedelta(hours=2), camera_make="Canon",
        camera_model="Canon EOS R5", lens="RF24-105mm F4 L IS USM",
        gps_latitude=pytest.approx(48 + 51 / 60 + 30.5 / 3600),
        gps_longitude=pytest.approx(-(2 + 17 / 60 + 40 / 3600)),
        orientation=6)
    # No EXIF at all: every field NULL, and nothing to warn about.
    assert open_decoded(photo(tmp_path / "b.jpg", 2, None)).metadata == exif.NONE


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "AVIF", "HEIF"])
def test_other_formats_carry_the_same_fields(tmp_path, fmt):
    if fmt == "HEIF":
        from vecsearch import formats

        assert formats.register_heif()
    path = photo(tmp_path / f"a.{fmt.lower()}", 3, exif_block(gps=None, lens=None), fmt=fmt)
    found = open_decoded(path).metadata
    assert (found.taken_at, found.taken_offset, found.camera_make, found.camera_model, found.warnings) == \
        (datetime(2024, 5, 1, 10, 11, 12), timedelta(hours=2), "Canon", "Canon EOS R5", ())


def test_a_raw_files_tiff_tags(tmp_path):
    rgb = np.asarray(Image.open(make_image(tmp_path / "s.png", seed=4, size=(96, 64))).convert("RGB"))
    found = open_decoded(make_dng(tmp_path / "a.dng", rgb, orientation=6)).metadata
    assert (found.camera_make, found.camera_model, found.orientation, found.taken_at) == \
        ("vecsearch", "test camera", 6, None)


@pytest.mark.parametrize("block, field, warning", [
    (exif_block(taken=12345), "taken_at", "DateTimeOriginal is a int"),
    (exif_block(taken="9999:01:01 00:00:00"), "taken_at", "outside 1826..now"),
    (exif_block(taken="1700:01:01 00:00:00"), "taken_at", "outside 1826..now"),
    (exif_block(taken="2024:13:45 99:00:00"), "taken_at", "is not a date"),
    (exif_block(taken="2026:12:04 23:00:00", offset="-11:00"), "taken_at", "in the future"),
    (exif_block(offset="+99:00"), "taken_offset", "is not a UTC offset"),
    (exif_block(offset="two hours"), "taken_offset", "is not +HH:MM"),
    (exif_block(model="A" * 60_000), "camera_model", "60000 characters long"),
    (exif_block(make="Can\x1bon"), "camera_make", "control characters"),
    (exif_block(make=b"\xff\xfe\x00"), "camera_make", "not UTF-8 text"),
    (exif_block(lens=7), "lens", "LensModel is a int"),
    (exif_block(gps=("N", (500.0, 0.0, 0.0), "E", (2.0, 0.0, 0.0))), "gps_latitude", "not a position"),
    (exif_block(gps=("Q", (40.0, 0.0, 0.0), "E", (2.0, 0.0, 0.0))), "gps_latitude", "not a position"),
    (exif_block(gps=("N", (40.0, 75.0, 0.0), "E", (2.0, 0.0, 0.0))), "gps_latitude", "not a position"),
    (exif_block(orientation=99), "orientation", "Orientation 99 is not 1..8"),
])
def test_hostile_values_are_null_and_a_warning(tmp_path, block, field, warning):
    found = exif.read(Image.open(photo(tmp_path / "h.jpg", 5, block)), now=NOW)
    assert getattr(found, field) is None
    assert any(warning in w for w in found.warnings), found.warnings
    if field.startswith("gps"):
        assert found.gps_longitude is None  # a position is both or neither
    # The rest of the block still counts.
    others = {"camera_make": "Canon", "lens": "RF24-105mm F4 L IS USM"}
    assert all(getattr(found, k) == v for k, v in others.items() if k != field)


def test_blank_dates_and_huge_blocks(tmp_path):
    # What a camera with an unset clock writes: absent, not a warning.
    blank = exif.read(Image.open(photo(tmp_path / "z.jpg", 6, exif_block(taken="0000:00:00 00:00:00"))))
    assert blank.taken_at is None and blank.warnings == ()
    # Tomorrow evening local time without an offset may still be today somewhere: kept.
    ahead = exif.read(Image.open(photo(tmp_path / "y.jpg", 6, exif_block(taken="2026:12:04 23:00:00",
                                                                        offset=None))), now=NOW)
    assert ahead.taken_at == datetime(2026, 12, 4, 23) and ahead.warnings == ()
    # A PNG's eXIf chunk can be any size: over MAX_BLOCK_BYTES it is ignored whole.
    huge = exif_block(lens="L" * 100).tobytes() + b"\0" * (exif.MAX_BLOCK_BYTES + 1)
    found = open_decoded(photo(tmp_path / "big.png", 7, huge, fmt="PNG")).metadata
    assert found.camera_make is None and "over the limit" in found.warnings[0]
    # Garbage where the block should be.
    junk = b"Exif\0\0" + bytes(range(256)) * 4
    found = exif.read(Image.open(photo(tmp_path / "junk.png", 8, junk, fmt="PNG")))
    assert found.camera_make is None


# -- loading ---------------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path) -> Path:
    from vecsearch import formats

    assert formats.register_heif()  # pillow-heif writes the HEIC too
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "canon.jpg", 11, exif_block())
    photo(folder / "iphone.heic", 12, exif_block(make="Apple", model="iPhone 15 Pro", offset=None, gps=None,
                                                 lens=None), fmt="HEIF")
    photo(folder / "bare.png", 13, None)
    photo(folder / "year9999.jpg", 14, exif_block(taken="9999:12:31 23:59:59", model="B" * 60_000))
    photo(folder / "lat500.jpg", 15, exif_block(gps=("N", (500.0, 0.0, 0.0), "E", (1.0, 0.0, 0.0))))
    return folder


METADATA = ", ".join(exif.COLUMNS)


def metadata_rows(conn: psycopg.Connection) -> dict[str, tuple]:
    return {Path(r[0]).name: r[1:] for r in conn.execute(
        f"SELECT path, {METADATA}, metadata_version FROM images ORDER BY path")}


def test_load_writes_the_metadata_and_counts_bad_exif(settings, embedder, photos):
    report = Warnings()
    summary = load(settings, photos, embedder, workers=0, progress=report)
    assert summary.failed == [] and summary.new == 5, summary.describe()
    assert summary.metadata_warnings == 2 and report.warned_about() == {"year9999.jpg", "lat500.jpg"}
    assert "outside 1826..now" in report.notes[str(photos / "year9999.jpg")]
    assert "metadata warnings 2" in summary.describe()
    with db.connect(settings) as conn:
        got = metadata_rows(conn)
    lat, lon = 48 + 51 / 60 + 30.5 / 3600, -(2 + 17 / 60 + 40 / 3600)
    assert got["canon.jpg"] == (datetime(2024, 5, 1, 10, 11, 12), timedelta(hours=2), "Canon",
                                "Canon EOS R5", "RF24-105mm F4 L IS USM", pytest.approx(lat),
                                pytest.approx(lon), 1, exif.VERSION)
    assert got["iphone.heic"][:4] == (datetime(2024, 5, 1, 10, 11, 12), None, "Apple", "iPhone 15 Pro")
    assert got["bare.png"] == (None,) * 8 + (exif.VERSION,)
    bad = got["year9999.jpg"]
    assert bad[0] is None and bad[3] is None and bad[2] == "Canon"
    assert got["lat500.jpg"][5:7] == (None, None) and got["lat500.jpg"][0] is not None


def test_migrated_rows_are_filled_by_the_next_load_without_re_embedding(settings, embedder, photos):
    load(settings, photos, embedder, workers=0)
    with db.connect(settings) as conn:
        before = metadata_rows(conn)
        vectors = dict(conn.execute("SELECT path, embedding::text FROM images").fetchall())
        # What rows of revision 0008 look like after migration 0009: columns NULL, never read.
        conn.execute(f"UPDATE images SET ({METADATA}, metadata_version) = "
                     f"({', '.join(['NULL'] * (len(exif.COLUMNS) + 1))})")
    summary = load(settings, photos, embedder, workers=0)
    assert (summary.embedded, summary.unchanged, summary.metadata_reread) == (0, 5, 5), summary.describe()
    assert summary.metadata_warnings == 2  # the bad values are bad again, and said so again
    with db.connect(settings) as conn:
        assert metadata_rows(conn) == before
        assert dict(conn.execute("SELECT path, embedding::text FROM images").fetchall()) == vectors
        # Current rows are not read again by a plain load...
        conn.execute("UPDATE images SET camera_make = 'edited by hand' WHERE path LIKE '%canon.jpg'")
    assert load(settings, photos, embedder, workers=0).metadata_reread == 0
    with db.connect(settings) as conn:
        assert metadata_rows(conn)["canon.jpg"][2] == "edited by hand"
    # ...but are with reread_metadata (`vecsearch load --reread-metadata`).
    summary = load(settings, photos, embedder, workers=0, reread_metadata=True)
    assert (summary.embedded, summary.metadata_reread) == (0, 5)
    with db.connect(settings) as conn:
        assert metadata_rows(conn) == before


def test_same_content_under_another_path_gets_the_same_metadata(settings, embedder, photos):
    load(settings, photos, embedder, workers=0)
    (photos / "copy.jpg").write_bytes((photos / "canon.jpg").read_bytes())
    summary = load(settings, photos, embedder, workers=0)
    assert (summary.new, summary.duplicate, summary.embedded) == (1, 1, 0)
    with db.connect(settings) as conn:
        got = metadata_rows(conn)
    assert got["copy.jpg"] == got["canon.jpg"] and got["copy.jpg"][2] == "Canon"


# -- the filters in the neighbour query ------------------------------------------------------

ROWS, NEWER, RARE = 5000, 2100, 15  # most rows older than 2024; 2100: enough for the index path


class Library:
    """5000 rows, 2900 of them taken 2010-2019 and 2100 in 2024-2025 (interleaved at random);
    15 of them by a 'Leica' camera, the others 'Canon' or NULL."""

    def __init__(self, url: str, home) -> None:
        self.url, self.settings = url, Settings(database_url=url, home=home)
        self.env = {"VECSEARCH_DATABASE_URL": url, "VECSEARCH_HOME": str(home)}
        self.vectors = clustered(ROWS, seed=21)
        rng = np.random.default_rng(3)
        newer = np.zeros(ROWS, bool)
        newer[rng.choice(ROWS, NEWER, replace=False)] = True
        self.taken = [datetime(2024, 1, 1) + timedelta(hours=int(rng.integers(0, 17000))) if n
                      else datetime(2010, 1, 1) + timedelta(hours=int(rng.integers(0, 87000))) for n in newer]
        self.newer = newer
        self.camera = [None if i % 7 == 0 else "Canon" for i in range(ROWS)]
        for i in rng.choice(ROWS, RARE, replace=False):
            self.camera[i] = "Leica"
        with db.connect(self.settings) as conn:
            self.ids = insert_vectors(conn, self.vectors, [f"/lib/{i}.jpg" for i in range(ROWS)])
            with conn.cursor() as cur:
                cur.executemany("UPDATE images SET taken_at = %s, camera_make = %s, camera_model = %s, "
                                "metadata_version = 1 WHERE id = %s",
                                [(t, c, None if c is None else f"{c} model", i)
                                 for t, c, i in zip(self.taken, self.camera, self.ids, strict=True)])
            conn.execute("ANALYZE images")
        self.old_query = int(np.flatnonzero(~newer)[0])  # an older image asking for newer ones


@pytest.fixture(scope="module")
def library(pg_home):
    with fresh_database(pg_home) as url:
        yield Library(url, pg_home)


@pytest.fixture
def lconn(library):
    with psycopg.connect(library.url, autocommit=True) as conn:
        yield conn


def test_taken_after_keeps_returning_k_rows_through_the_index(library, lconn):
    image_id = library.ids[library.old_query]
    sql = "SELECT id FROM vecsearch_similar(%s, 10, taken_after => '2024-01-01')"
    rows = [r[0] for r in lconn.execute(sql, [image_id]).fetchall()]
    assert len(rows) == 10 and image_id not in rows
    taken = dict(zip(library.ids, library.taken, strict=True))
    assert all(taken[i] >= datetime(2024, 1, 1) for i in rows)
    # 2100 rows pass, more than EXACT_BELOW: the HNSW index answers, walking past the older rows.
    plans = nested_plans(lconn, sql, [image_id])
    assert "Index Scan using images_embedding_hnsw" in plans, plans[-3000:]
    reference = exact_neighbours(library.vectors, library.ids, library.vectors[library.old_query], 10,
                                 exclude=[image_id], mask=library.newer)
    assert len(set(rows) & {i for i, _ in reference}) >= 8
    # From Python too (query.similar), with k up to 100.
    with db.connect(library.settings) as conn:
        found = query.similar(conn, image_id, 100, taken_after=datetime(2024, 1, 1))
    assert len(found) == 100 and all(taken[n.id] >= datetime(2024, 1, 1) for n in found)


def test_taken_before_camera_and_a_range(library, lconn):
    image_id = library.ids[5]
    taken = dict(zip(library.ids, library.taken, strict=True))
    camera = dict(zip(library.ids, library.camera, strict=True))
    rows = lconn.execute("SELECT id FROM vecsearch_similar(%s, 20, taken_before => '2015-01-01')",
                         [image_id]).fetchall()
    assert len(rows) == 20 and all(taken[r[0]] < datetime(2015, 1, 1) for r in rows)
    # 15 'Leica' rows (case-insensitive substring of make and model): fewer than 2000, so the
    # exact scan of exactly those rows answers; k = 10 of them, the 10 nearest.
    rows = lconn.execute("SELECT id, distance FROM vecsearch_similar(%s, 10, camera => 'LEICA MOD')",
                         [image_id]).fetchall()
    leica = np.array([c == "Leica" for c in library.camera])
    reference = exact_neighbours(library.vectors, library.ids, library.vectors[5], 10, exclude=[image_id],
                                 mask=leica)
    assert [r[0] for r in rows] == [i for i, _ in reference]
    assert lconn.execute("SELECT count(*) FROM vecsearch_similar(%s, 50, camera => 'leica')",
                         [image_id]).fetchone()[0] == RARE - (camera[image_id] == "Leica")
    # A half-open range, with the vector form.
    rows = lconn.execute(
        "SELECT id FROM vecsearch_similar_to((SELECT embedding FROM images WHERE id = %s), 10, "
        "taken_after => '2024-03-01', taken_before => '2024-04-01 12:00', camera => 'canon')",
        [image_id]).fetchall()
    assert len(rows) == 10
    assert all(datetime(2024, 3, 1) <= taken[r[0]] < datetime(2024, 4, 1, 12) and camera[r[0]] == "Canon"
               for r in rows)
    # Rows without a camera never pass a camera filter; the old calls mean what they meant.
    assert lconn.execute("SELECT count(*) FROM vecsearch_similar(%s, 1000, NULL, NULL, false)",
                         [image_id]).fetchone()[0] == 1000
    assert lconn.execute("SELECT count(*) FROM vecsearch_similar(%s, 5, exact => true, camera => '')",
                         [image_id]).fetchone()[0] == 5


def metadata_examples() -> list[str]:
    """The SQL statements of docs/sql.md's "Photo metadata" section."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "sql.md").read_text()
    section = text.split("## Photo metadata", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.S)
    return [c.strip() for block in blocks for c in block.split(";") if c.strip()]


def test_the_docs_joins_on_the_metadata_columns(library, lconn):
    examples = metadata_examples()
    assert len(examples) == 3
    neighbours = lconn.execute(examples[0].replace("(42,", f"({library.ids[0]},")).fetchall()
    assert len(neighbours) == 10
    assert all(datetime(2024, 1, 1) <= r[2] < datetime(2025, 1, 1) and r[3] == "Canon model"
               for r in neighbours)
    per_camera = lconn.execute(examples[1]).fetchall()
    assert sum(r[3] for r in per_camera) == ROWS and {r[0] for r in per_camera} == {"Canon", "Leica", None}
    assert lconn.execute(examples[2]).fetchall() == []  # the library has no GPS positions


def test_similar_taken_after_from_the_command_line(library):
    import json

    image_id = library.ids[library.old_query]
    result = run_cli("similar", str(image_id), "--taken-after", "2024-01-01", "-f", "json", env=library.env)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    taken = dict(zip(library.ids, library.taken, strict=True))
    assert len(found) == 10 and all(taken[r["id"]] >= datetime(2024, 1, 1) for r in found)
    result = run_cli("similar", str(image_id), "-k", "3", "--camera", "leica", "--taken-before",
                     "2030-01-01T00:00", "-f", "paths", env=library.env)
    camera = dict(zip([f"/lib/{i}.jpg" for i in range(ROWS)], library.camera, strict=True))
    assert result.returncode == 0 and [camera[p] for p in result.stdout.split()] == ["Leica"] * 3
    # Bad input: one line naming the option, exit 1, before anything runs.
    for args, says in ((["--taken-after", "2024-13-01"], "--taken-after '2024-13-01' is not a date"),
                       (["--taken-before", "yesterday"], "--taken-before 'yesterday' is not a date"),
                       (["--taken-after", "2024-01-01T00:00+02:00"], "has a UTC offset"),
                       (["--taken-after", "2025-01-01", "--taken-before", "2024-01-01"], "is not before"),
                       (["--camera", " "], "--camera must be 1 to 128 characters")):
        result = run_cli("similar", str(image_id), *args, env=library.env)
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and says in result.stderr, \
            result.stderr
    # Nothing passes: said so.
    result = run_cli("similar", str(image_id), "--taken-after", "2030-01-01", env=library.env)
    assert result.returncode == 1 and "no other images taken after 2030-01-01 00:00:00" in result.stderr


def test_the_gallery_shows_and_filters_by_the_metadata(settings, embedder, photos):
    from fastapi.testclient import TestClient

    from vecsearch import web

    load(settings, photos, embedder, workers=0)
    # One more photo, taken later, by another camera.
    photo(photos / "later.jpg", 16, exif_block(make="FUJIFILM", model="X-T5", taken="2025:07:14 09:30:00",
                                               offset="-04:00", gps=None))
    load(settings, photos, embedder, workers=0)
    with db.connect(settings) as conn:
        ids = {Path(p).name: i for p, i in conn.execute("SELECT path, id FROM images")}
    with TestClient(web.create_app(settings), base_url="http://127.0.0.1:8000") as client:
        info = client.get(f"/api/images/{ids['canon.jpg']}").json()
        assert (info["taken_at"], info["taken_offset"], info["camera_make"], info["lens"]) == \
            ("2024-05-01T10:11:12", "+02:00", "Canon", "RF24-105mm F4 L IS USM")
        assert info["gps_latitude"] == pytest.approx(48.858472) and info["orientation"] == 1
        assert client.get(f"/api/images/{ids['bare.png']}").json()["taken_at"] is None
        html = client.get(f"/images/{ids['canon.jpg']}").text
        assert "2024-05-01 10:11:12 +02:00" in html and "Canon Canon EOS R5" in html
        assert "48.85847, -2.29444" in html
        # The filters, in the API and on the page.
        url = f"/api/images/{ids['canon.jpg']}/similar"
        got = client.get(url, params={"taken_after": "2025-01-01"}).json()
        assert [r["id"] for r in got["results"]] == [ids["later.jpg"]]
        assert got["query"]["taken_after"] == "2025-01-01T00:00:00"
        got = client.get(url, params={"camera": "canon", "k": 10}).json()
        assert {r["id"] for r in got["results"]} == {ids["year9999.jpg"], ids["lat500.jpg"]}
        got = client.get(url, params={"taken_before": "2025-01-01", "k": 10}).json()
        assert ids["later.jpg"] not in {r["id"] for r in got["results"]} and len(got["results"]) == 2
        assert client.get(url, params={"taken_after": "2030-01-01"}).json()["results"] == []
        bad = client.get(url, params={"taken_after": "soon"})
        assert bad.status_code == 400 and "taken_after 'soon' is not a date" in bad.json()["error"]
        page = client.get(f"/images/{ids['canon.jpg']}", params={"taken_after": "2025-01-01", "camera": ""})
        assert page.status_code == 200 and f'href="/images/{ids["later.jpg"]}"' in page.text
        assert f'href="/images/{ids["lat500.jpg"]}"' not in page.text
        assert 'value="2025-01-01"' in page.text
        page = client.get(f"/images/{ids['canon.jpg']}", params={"taken_before": "13/01/2024"})
        assert page.status_code == 400 and "is not a date" in page.text
