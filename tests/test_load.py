"""`vecsearch load`: the ingestion pipeline against a real PostgreSQL, with --weights random."""

from __future__ import annotations

import csv
import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import psycopg
import pytest
from conftest import counting, invoke_cli, make_image, run_cli
from PIL import Image

from vecsearch import hnsw
from vecsearch import load as load_mod
from vecsearch.errors import SchemaMismatch
from vecsearch.load import load
from vecsearch.progress import Progress


class Recorder(Progress):
    """Keeps what load reports."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.total = self.done = self.images = 0

    def message(self, text: str) -> None:
        self.messages.append(text)

    def start(self, total: int) -> None:
        self.total = total

    def advance(self, files: int, images: int = 0) -> None:
        self.done += files
        self.images += images

    def failed(self, path: str, reason: str) -> None:
        self.failures.append((path, reason))


def rows(conn: psycopg.Connection) -> dict[str, tuple]:
    """{path: (id, sha256, width, height, format, embedding)}."""
    return {r[0]: (*r[1:6], r[6].to_numpy()) for r in conn.execute(
        "SELECT path, id, sha256, width, height, format, embedding FROM images")}


def hnsw_definition(conn: psycopg.Connection) -> str | None:
    found = hnsw.hnsw_index(conn)
    return found[1] if found else None


def mixed_folder(root: Path) -> list[Path]:
    """One image per format (some named by content only), plus files that are not images."""
    images = [
        make_image(root / "a.jpg", 1, (320, 240)),
        make_image(root / "b.png", 2, (200, 300)),
        make_image(root / "sub" / "c.webp", 3, (250, 250)),
        make_image(root / "sub" / "d.bmp", 4, (64, 48)),
        make_image(root / "sub" / "deeper" / "e.gif", 5, (120, 90)),
        make_image(root / "f.tiff", 6, (100, 140)),
        make_image(root / "no_extension", 7, (90, 90), fmt="PNG"),  # recognised by content
    ]
    (root / "notes.txt").write_text("not an image")
    (root / "data.bin").write_bytes(os.urandom(256))
    make_image(root / ".hidden" / "skipped.jpg", 8)  # hidden folders are skipped
    make_image(root / ".also_hidden.png", 9)
    return images


def test_mixed_folder_loads_and_rerun_does_no_model_work(settings, conn, embedder, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    images = mixed_folder(folder)
    forwards = counting(monkeypatch, embedder, "embed_arrays")
    summary = load(settings, folder, embedder, workers=1)
    assert (summary.found, summary.new, summary.updated, summary.unchanged) == (7, 7, 0, 0)
    assert summary.failed == [] and summary.embedded == 7 and summary.exit_code == 0
    assert forwards.items == 7
    loaded = rows(conn)
    assert sorted(loaded) == sorted(str(p.absolute()) for p in images)  # absolute paths
    formats = {Path(p).name: r[4] for p, r in loaded.items()}
    assert formats == {"a.jpg": "JPEG", "b.png": "PNG", "c.webp": "WEBP", "d.bmp": "BMP", "e.gif": "GIF",
                       "f.tiff": "TIFF", "no_extension": "PNG"}
    assert {Path(p).name: r[2:4] for p, r in loaded.items()}["b.png"] == (200, 300)
    vectors = np.stack([r[5] for r in loaded.values()])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert conn.execute("SELECT weights FROM embedding_model").fetchone()[0] == "random(seed=0)"

    before = forwards.items
    again = load(settings, folder, embedder, workers=1)
    assert (again.found, again.new, again.updated, again.unchanged, again.embedded) == (7, 0, 0, 7, 0)
    assert forwards.items == before  # no model forward at all
    now = rows(conn)
    assert {p: r[:5] for p, r in now.items()} == {p: r[:5] for p, r in loaded.items()}
    assert all(np.array_equal(now[p][5], loaded[p][5]) for p in loaded)


def test_modified_file_keeps_its_id_and_gets_a_new_embedding(settings, conn, embedder, tmp_path):
    folder = tmp_path / "photos"
    a = make_image(folder / "a.png", 1)
    make_image(folder / "b.png", 2)
    load(settings, folder, embedder, workers=0)
    first = rows(conn)[str(a)]
    make_image(a, 99)  # new content
    os.utime(a, ns=(1_000_000_000_000_000_000, 1_000_000_000_123_456_789))
    summary = load(settings, folder, embedder, workers=0)
    assert (summary.new, summary.updated, summary.unchanged, summary.embedded) == (0, 1, 1, 1)
    second = rows(conn)[str(a)]
    assert second[0] == first[0]  # same id
    assert second[1] != first[1]  # new sha256
    assert float(np.dot(first[5], second[5])) < 0.9999
    # The stored mtime keeps microseconds: the next run sees the file unchanged.
    assert load(settings, folder, embedder, workers=0).unchanged == 2


def test_moved_duplicate_is_not_reembedded_and_prune_removes_the_old_path(settings, conn, embedder,
                                                                         tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    a = make_image(folder / "a.png", 1)
    make_image(folder / "b.png", 2)
    load(settings, folder, embedder, workers=0)
    old = rows(conn)[str(a)]
    moved = folder / "moved" / "a-renamed.png"
    moved.parent.mkdir()
    a.rename(moved)
    forwards = counting(monkeypatch, embedder, "embed_arrays")
    summary = load(settings, folder, embedder, prune=True, workers=1)
    assert forwards.items == 0  # the content was embedded already
    assert (summary.new, summary.duplicate, summary.pruned, summary.embedded) == (1, 1, 1, 0)
    after = rows(conn)
    assert str(a) not in after
    assert np.array_equal(after[str(moved)][5], old[5])
    assert after[str(moved)][2:5] == old[2:5]  # width, height, format copied with the vector


def test_identical_content_under_two_paths_is_embedded_once(settings, conn, embedder, tmp_path):
    folder = tmp_path / "photos"
    a = make_image(folder / "a.png", 1)
    shutil.copy(a, folder / "a-copy.png")
    (folder / "link.png").symlink_to(a)
    make_image(folder / "b.png", 2)
    summary = load(settings, folder, embedder, workers=0)
    assert (summary.new, summary.duplicate, summary.embedded) == (4, 2, 2)
    loaded = rows(conn)
    assert np.array_equal(loaded[str(a)][5], loaded[str(folder / "a-copy.png")][5])
    assert str(folder / "link.png") in loaded  # the link's own path, not its target's


def test_prune_deletes_only_rows_of_this_folder_whose_files_are_gone(settings, conn, embedder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    gone = make_image(one / "gone.png", 1)
    make_image(one / "kept.png", 2)
    other = make_image(two / "other.png", 3)
    load(settings, one, embedder, workers=0)
    load(settings, two, embedder, workers=0)
    gone.unlink()
    other.unlink()
    assert load(settings, one, embedder, workers=0).pruned == 0  # only with prune=True
    summary = load(settings, one, embedder, prune=True, workers=0)
    assert summary.pruned == 1
    assert sorted(rows(conn)) == [str(one / "kept.png"), str(other)]  # another folder: untouched


def _png_bomb(path: Path, side: int = 9500) -> Path:
    """A real PNG whose 9500 x 9500 pixels (270 MB decoded) compress to under 1 MB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(1)
    row = b"\x00" * (side * 3 + 1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def bad_file_set(folder: Path) -> tuple[dict[str, str], list[str]]:
    """({name: expected reason fragment} that must fail, [names] that must load)."""
    folder.mkdir(parents=True)
    (folder / "zero.jpg").write_bytes(b"")
    full = io.BytesIO()
    Image.open(make_image(folder / "tmp.jpg", 1, (400, 300))).save(full, "JPEG", quality=90)
    (folder / "tmp.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (folder / "text.jpg").write_text("this is not a jpeg\n" * 20)
    _png_bomb(folder / "bomb.png")
    make_image(folder / "png_named.jpg", 2, fmt="PNG")
    make_image(folder / "cmyk.jpg", 3, mode="CMYK")
    grey16 = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20  # up to 61420
    Image.fromarray(grey16).save(folder / "grey16.png")
    palette = Image.open(make_image(folder / "p.png", 4)).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette_alpha.png", transparency=0)
    (folder / "p.png").unlink()
    frames = [Image.open(make_image(folder / f"f{i}.png", 10 + i)).convert("P") for i in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    for i in range(3):
        (folder / f"f{i}.png").unlink()
    rotated = Image.open(make_image(folder / "r.png", 5, (300, 200)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise when displayed
    rotated.save(folder / "exif_rotated.jpg", exif=exif)
    (folder / "r.png").unlink()
    make_image(folder / "one_pixel.png", 6, (1, 1))
    make_image(folder / "wide_20000x1.png", 7, (20000, 1))
    failing = {"zero.jpg": "empty file", "truncated.jpg": "truncated", "text.jpg": "not an image",
               "bomb.png": "decompression bomb"}
    loading = ["png_named.jpg", "cmyk.jpg", "grey16.png", "palette_alpha.png", "animated.gif",
               "exif_rotated.jpg", "one_pixel.png", "wide_20000x1.png"]
    return failing, loading


def test_bad_file_set_gives_exact_successes_and_failures_with_reasons(settings, conn, embedder, tmp_path):
    folder = tmp_path / "bad"
    failing, loading = bad_file_set(folder)
    report = Recorder()
    errors = tmp_path / "errors.csv"
    summary = load(settings, folder, embedder, progress=report, errors_csv=errors, workers=1)
    assert summary.found == len(failing) + len(loading)
    assert sorted(Path(p).name for p in rows(conn)) == sorted(loading)
    reasons = {Path(p).name: reason for p, reason in summary.failed}
    assert sorted(reasons) == sorted(failing)
    for name, fragment in failing.items():
        assert fragment in reasons[name], (name, reasons[name])
        assert "\n" not in reasons[name]
    assert report.failures == summary.failed  # reported as they happened
    assert summary.exit_code == 2
    with open(errors, newline="") as f:
        assert list(csv.reader(f)) == [["path", "reason"], *map(list, summary.failed)]
    loaded = {Path(p).name: r for p, r in rows(conn).items()}
    assert loaded["exif_rotated.jpg"][2:4] == (200, 300)  # displayed size, orientation applied
    assert loaded["wide_20000x1.png"][2:4] == (20000, 1)
    assert loaded["png_named.jpg"][4] == "PNG"


def test_model_mismatch_is_refused_and_reembed_switches_everything(settings, conn, embedder, tmp_path,
                                                                   monkeypatch):
    from vecsearch.embed import Embedder

    one, two = tmp_path / "one", tmp_path / "two"
    make_image(one / "a.png", 1)
    make_image(one / "b.png", 2)
    outside = make_image(two / "c.png", 3)
    gone = make_image(two / "gone.png", 4)
    load(settings, one, embedder, workers=0)
    load(settings, two, embedder, workers=0)
    gone.unlink()
    ids = {p: r[0] for p, r in rows(conn).items()}
    weights = tmp_path / "resnet50.pth"
    import torch

    torch.save(embedder.state_dict(), weights)
    other = Embedder(weights=str(weights), batch_size=4)
    other_forwards = counting(monkeypatch, other, "embed_arrays")
    assert other.record.weights.startswith("file:sha256=")
    with pytest.raises(SchemaMismatch, match="--reembed"):
        load(settings, one, other, workers=0)
    assert other_forwards.items == 0

    summary = load(settings, one, other, reembed=True, workers=0)
    # Every row is re-embedded, also outside the folder; the row whose file is gone is removed.
    assert (summary.updated, summary.embedded, summary.pruned) == (3, 3, 1)
    after = rows(conn)
    assert sorted(after) == sorted([str(one / "a.png"), str(one / "b.png"), str(outside)])
    assert all(after[p][0] == ids[p] for p in after)  # same ids
    assert conn.execute("SELECT weights FROM embedding_model").fetchone()[0] == other.record.weights
    # Same numbers in the file as in the random network: the vectors agree.
    assert float(np.dot(after[str(outside)][5], embedder.embed_file(outside))) > 0.9999


def test_bulk_first_load_rebuilds_the_index_and_a_killed_one_is_repaired(settings, conn, embedder,
                                                                         tmp_path):
    original = hnsw_definition(conn)
    assert original is not None
    folder = tmp_path / "photos"
    for i in range(3):
        make_image(folder / f"{i}.png", i)
    report = Recorder()
    summary = load(settings, folder, embedder, progress=report, workers=0)
    assert summary.index_rebuilt
    assert any("HNSW index dropped" in m for m in report.messages)
    assert any("building the HNSW index" in m for m in report.messages)
    assert hnsw_definition(conn) == original
    assert conn.execute("SELECT obj_description('images'::regclass, 'pg_class')").fetchone()[0] is None
    # Fewer new rows than the table holds (even if the folder is new): inserted into the live index.
    make_image(tmp_path / "more" / "x.png", 10)
    report = Recorder()
    assert not load(settings, tmp_path / "more", embedder, progress=report, workers=0).index_rebuilt
    assert not any("HNSW" in m for m in report.messages)

    # A load killed while the index was dropped: its session (and lock) is gone, the mark remains.
    conn.execute("COMMENT ON TABLE images IS 'analysts wrote this'")
    killed = load_mod.connect(settings)
    index = hnsw.BulkLoadIndex(killed, Recorder())
    index.begin(bulk=True, additions=1)
    assert hnsw_definition(conn) is None
    killed.close()
    # The next load, even with nothing to load, puts the same index back and the comment too.
    again = load(settings, folder, embedder, progress=Recorder(), workers=0)
    assert again.unchanged == 3 and again.index_rebuilt and again.embedded == 0
    assert hnsw_definition(conn) == original
    assert conn.execute("SELECT obj_description('images'::regclass, 'pg_class')").fetchone()[0] == \
        "analysts wrote this"


def test_a_running_bulk_load_keeps_its_index_from_being_restored_by_another(settings, conn, tmp_path,
                                                                           embedder):
    holder = load_mod.connect(settings)
    index = hnsw.BulkLoadIndex(holder, Recorder())
    index.begin(bulk=True, additions=1)  # a live bulk load: dropped, lock held
    try:
        make_image(tmp_path / "p" / "a.png", 1)
        summary = load(settings, tmp_path / "p", embedder, progress=Recorder(), workers=0)
        assert not summary.index_rebuilt and hnsw_definition(conn) is None
        assert index.end()  # the bulk load finishes: its index is back
        assert hnsw_definition(conn) is not None
    finally:
        holder.close()


def test_load_into_another_schema_leaves_public_alone(settings, conn, embedder, tmp_path):
    conn.execute("CREATE SCHEMA scratch")
    conn.execute("CREATE TABLE scratch.images (LIKE public.images INCLUDING ALL)")
    conn.execute("CREATE TABLE scratch.embedding_model (LIKE public.embedding_model INCLUDING ALL)")
    make_image(tmp_path / "p" / "a.png", 1)
    make_image(tmp_path / "p" / "b.png", 2)
    summary = load(settings, tmp_path / "p", embedder, schema="scratch", workers=0)
    assert summary.new == 2 and summary.index_rebuilt
    assert conn.execute("SELECT count(*) FROM scratch.images").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM public.images").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM scratch.embedding_model").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM public.embedding_model").fetchone()[0] == 0
    assert conn.execute(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = 'scratch' AND indexdef LIKE '%hnsw%'"
    ).fetchone()[0] == 1


def test_cli_load_exit_codes_summary_errors_csv_and_no_torch_on_rerun(settings, tmp_path):
    folder = tmp_path / "photos"
    make_image(folder / "a.png", 1)
    make_image(folder / "b.jpg", 2)
    (folder / "broken.jpg").write_text("nope")
    errors = tmp_path / "errors.csv"
    result = invoke_cli("load", str(folder), "--weights", "random", "--errors", str(errors), "--workers", "1")
    assert result.returncode == 2, result.stderr
    assert "found 3, new 2, updated 0, unchanged 0, duplicate content 0, failed 1" in result.stdout
    assert f"skipped {folder / 'broken.jpg'}: not an image" in result.stderr
    assert "warning: --weights random" in result.stderr
    assert "Traceback" not in result.stderr
    with open(errors, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", "reason"] and table[1][0] == str(folder / "broken.jpg")
    assert table[1][1].startswith("not an image") and len(table) == 2
    (folder / "broken.jpg").unlink()
    # Re-run: nothing to read, so torch is never imported (a stub `torch` package that fails
    # on import is first on the path); --quiet prints nothing.
    stub = tmp_path / "stub"
    (stub / "torch").mkdir(parents=True)
    (stub / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    quiet = run_cli("load", str(folder), "--weights", "random", "--quiet", env={"PYTHONPATH": str(stub)})
    assert quiet.returncode == 0 and quiet.stdout == "" and "warning" not in quiet.stderr


def test_split_loads_equal_one_load_and_prune_stays_in_its_share(settings, conn, embedder, tmp_path):
    """`--shard K/N`: N loaders take disjoint shares (by a hash of the path) that together are the
    folder; a share's --prune never deletes another share's rows, even when their files are gone
    from where this loader looks (another machine)."""
    folder = tmp_path / "photos"
    files = [make_image(folder / f"{i:02d}.png", 500 + i, (64, 48)) for i in range(12)]
    shares = {k: {str(f) for f in files if load_mod.in_share(str(f), (k, 3))} for k in (1, 2, 3)}
    assert sum(map(len, shares.values())) == 12 and set.union(*shares.values()) == {str(f) for f in files}
    assert all(shares.values()), shares  # 12 files: every share has some
    for k in (1, 2, 3):
        summary = load(settings, folder, embedder, workers=0, shard=(k, 3))
        assert summary.new == len(shares[k]) and summary.found == len(shares[k])
        assert set(rows(conn)) == set.union(*(shares[j] for j in range(1, k + 1)))
    assert load(settings, folder, embedder, workers=0).unchanged == 12  # the same as one load
    lost = sorted(shares[1])[0]
    Path(lost).unlink()
    assert load(settings, folder, embedder, workers=0, shard=(2, 3), prune=True).pruned == 0
    assert lost in rows(conn)
    assert load(settings, folder, embedder, workers=0, shard=(1, 3), prune=True).pruned == 1
    assert lost not in rows(conn) and len(rows(conn)) == 11


@pytest.mark.parametrize("value, message", [
    ("3/2", "K must be from 1 to N"), ("0/4", "K must be from 1 to N"), ("2", "give K/N"),
    ("a/b", "give K/N"), ("1/0", "give K/N")])
def test_bad_shard_is_one_line(settings, tmp_path, value, message):
    result = invoke_cli("load", str(tmp_path), "--shard", value,
                     env={"VECSEARCH_DATABASE_URL": settings.database_url})
    assert result.returncode == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _without_permission_override(args: list[str]) -> list[str]:
    """`args` run so that a folder's permission bits hold (root ignores them otherwise)."""
    if os.geteuid() != 0:
        return args
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a folder unlistable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *args]


def test_prune_keeps_rows_under_a_folder_it_could_not_list(settings, conn, embedder, tmp_path):
    """A folder that cannot be listed (permissions, an unmounted share) protects every row under
    it; a file that is really gone next to it is still pruned."""
    import subprocess

    from conftest import cli_command

    top = tmp_path / "P"
    make_image(top / "a.png", 1)
    gone = make_image(top / "b.png", 2)
    hidden = [make_image(top / "sub" / f"{i}.png", 10 + i) for i in range(3)]
    load(settings, top, embedder, workers=0)
    gone.unlink()
    (top / "sub").chmod(0)
    try:
        result = subprocess.run(_without_permission_override(
            cli_command("load", str(top), "--prune", "--weights", "random", "--workers", "0")),
            capture_output=True, text=True, timeout=300)
    finally:
        (top / "sub").chmod(0o755)
    assert "cannot list folder" in result.stderr, result.stderr
    assert "kept 3 rows whose files could not be checked" in result.stderr, result.stderr
    assert "pruned 1 rows" in result.stderr, result.stderr
    assert sorted(rows(conn)) == sorted([str(top / "a.png"), *map(str, hidden)])
