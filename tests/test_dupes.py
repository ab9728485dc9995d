"""`vecsearch dupes`: near-duplicate groups from the HNSW index, union-find, keeper first."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from conftest import invoke_cli, make_image, nested_plans
from PIL import Image

from vecsearch import db, dupes, sheet

MTIME = datetime(2026, 1, 1, tzinfo=UTC)


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def cnn_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """Non-negative, about a third zeros, unrelated pairs at cosine distance ~0.4-0.6."""
    return unit(np.maximum(rng.normal(0, 1, (n, db.DIM)), 0))


def near(rng: np.random.Generator, v: np.ndarray, eps: float) -> np.ndarray:
    """A copy of `v` at cosine distance ~eps^2/2."""
    return unit(np.maximum(v + rng.normal(0, eps / np.sqrt(db.DIM), db.DIM), 0))


def insert(conn, rows: list[dict]) -> dict[str, int]:
    """Rows of path, vector and optional sha256/width/height/bytes; returns {path: id}."""
    with conn.cursor().copy("COPY images (path, sha256, bytes, width, height, format, mtime, embedding) "
                            "FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["text", "text", "int8", "int4", "int4", "text", "timestamptz", "vector"])
        for r in rows:
            copy.write_row([r["path"], r.get("sha256", hashlib.sha256(r["path"].encode()).hexdigest()),
                            r.get("bytes", 1000), r.get("width", 100), r.get("height", 100), "PNG", MTIME,
                            r["vector"]])
    return dict(conn.execute("SELECT path, id FROM images").fetchall())


def test_union_find_joins_chains_and_keeps_singletons_out():
    sets = dupes.UnionFind()
    for a, b in [(1, 2), (3, 4), (2, 3), (10, 11), (5, 5)]:
        sets.union(a, b)
    assert sorted(sets.groups()) == [[1, 2, 3, 4], [10, 11]]


@pytest.fixture
def planted(conn):
    """30 unrelated images, two planted groups, a 'sibling' too far to be a duplicate."""
    rng = np.random.default_rng(7)
    base = cnn_like(rng, 32)
    rows = [{"path": f"/photos/other/{i:02d}.jpg", "vector": base[i]} for i in range(2, 32)]
    rows += [
        # group a: original, an exact copy (same bytes), a re-encode, a resize (the keeper is the
        # largest resolution; between equal resolutions, the larger file)
        {"path": "/photos/a/original.jpg", "vector": base[0], "sha256": "a" * 64, "width": 800,
         "height": 600, "bytes": 90_000},
        {"path": "/photos/a/copy-of-original.jpg", "vector": base[0], "sha256": "a" * 64, "width": 800,
         "height": 600, "bytes": 90_000},
        {"path": "/photos/a/reencoded.jpg", "vector": near(rng, base[0], 0.06), "width": 800,
         "height": 600, "bytes": 120_000},
        {"path": "/photos/a/small.jpg", "vector": near(rng, base[0], 0.15), "width": 400, "height": 300},
        # group b: two near copies in another folder
        {"path": "/photos/b/one.png", "vector": base[1], "width": 640, "height": 480},
        {"path": "/photos/b/two.png", "vector": near(rng, base[1], 0.25), "width": 1280, "height": 960},
        # similar but a different picture: cosine distance ~0.1, twice the default threshold
        {"path": "/photos/b/sibling.png", "vector": near(rng, base[1], 0.6)},
    ]
    return insert(conn, rows)


def test_finds_every_planted_group_and_nothing_else(conn, planted):
    result = dupes.find_duplicates(conn)
    groups = [[m.path for m in g.members] for g in result.groups]
    assert groups == [
        # keeper, then by distance to it (the two identical files tie: by id)
        ["/photos/a/reencoded.jpg", "/photos/a/original.jpg", "/photos/a/copy-of-original.jpg",
         "/photos/a/small.jpg"],
        ["/photos/b/two.png", "/photos/b/one.png"],
    ]
    a, b = result.groups
    assert a.keeper.path == "/photos/a/reencoded.jpg"  # 800x600 like the original, larger file
    assert a.keeper.distance == 0
    exact_copies = [m for m in a.members if m.path.endswith("original.jpg")]
    assert exact_copies[0].distance == pytest.approx(exact_copies[1].distance, abs=1e-6)
    assert all(0 < m.distance < dupes.DEFAULT_THRESHOLD for m in a.members[1:])
    assert b.keeper.path == "/photos/b/two.png"  # largest resolution
    assert result.images == 37 and result.exact_copy_sets == 1
    rows = result.rows()
    assert [(r["group"], r["role"]) for r in rows] == [
        (1, "keep"), (1, "dupe"), (1, "dupe"), (1, "dupe"), (2, "keep"), (2, "dupe")]


def test_threshold_decides_and_exact_copies_always_group(conn, planted):
    loose = dupes.find_duplicates(conn, threshold=0.2)
    assert "/photos/b/sibling.png" in [m.path for m in loose.groups[0].members + loose.groups[1].members]
    zero = dupes.find_duplicates(conn, threshold=0)
    assert [sorted(m.path for m in g.members) for g in zero.groups] == [
        ["/photos/a/copy-of-original.jpg", "/photos/a/original.jpg"]]


def test_under_only_searches_that_folder(conn, planted):
    result = dupes.find_duplicates(conn, under="/photos/b")
    assert result.images == 3
    assert [sorted(m.path for m in g.members) for g in result.groups] == [["/photos/b/one.png",
                                                                             "/photos/b/two.png"]]
    assert dupes.find_duplicates(conn, under="/photos/b/one").groups == []  # a prefix is a folder


def test_a_group_larger_than_k_is_found_whole(conn):
    rng = np.random.default_rng(3)
    base = cnn_like(rng, 20)
    rows = [{"path": f"/burst/{i:02d}.jpg", "vector": near(rng, base[0], 0.05)} for i in range(25)]
    rows += [{"path": f"/other/{i:02d}.jpg", "vector": base[i]} for i in range(1, 20)]
    insert(conn, rows)
    result = dupes.find_duplicates(conn, k=3, jobs=3, chunk=4)  # many chunks in flight
    assert [len(g.members) for g in result.groups] == [25]
    assert result.truncated == []


def test_neighbour_query_uses_the_hnsw_index(indexed_conn, hnsw_rows):
    # The planner prefers exact scans below ~2000 rows; at 2500 rows the plan must use the index.
    # The plans of the statements the SQL function runs for the batch (auto_explain).
    plan = nested_plans(indexed_conn, dupes.NEIGHBOURS_SQL, {
        "ids": hnsw_rows.ids[:256], "k": 10, "threshold": 0.05, "prefix": None, "ef_search": 100,
        "exact": False})
    assert "Index Scan using images_embedding_hnsw" in plan, plan
    assert "Seq Scan on images i" not in plan


def test_cli_formats_and_contact_sheet(settings, conn, tmp_path):
    rng = np.random.default_rng(11)
    base = cnn_like(rng, 6)
    tricky = tmp_path / 'we<b>ird & "quoted"'
    paths = [make_image(tricky / "keep.png", seed=1, size=(200, 150)),
             make_image(tmp_path / "copy.png", seed=1, size=(100, 75))]
    real = [{"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size} for p in paths]
    insert(conn, [
        {"path": str(paths[0]), "vector": base[0], "width": 200, "height": 150, **real[0]},
        {"path": str(paths[1]), "vector": near(rng, base[0], 0.1), "width": 100, "height": 75, **real[1]},
        {"path": str(tmp_path / "gone.png"), "vector": near(rng, base[0], 0.1), "width": 50, "height": 50},
        *({"path": f"/else/{i}.png", "vector": base[i]} for i in range(1, 6)),
    ])
    table = invoke_cli("dupes", check=True, env={"COLUMNS": "250"})
    assert "keep" in table.stdout and "copy.png" in table.stdout
    assert "1 group (3 images, 2 removable) among 8 images" in table.stderr
    rows = json.loads(invoke_cli("dupes", "--format", "json", check=True).stdout)
    assert [(r["group"], r["role"], r["path"]) for r in rows][0] == (1, "keep", str(paths[0]))
    assert {r["path"] for r in rows} == {str(paths[0]), str(paths[1]), str(tmp_path / "gone.png")}
    parsed = list(csv.DictReader(io.StringIO(invoke_cli("dupes", "-f", "csv", check=True).stdout)))
    assert list(parsed[0]) == dupes.COLUMNS and parsed[0]["resolution"] == "200x150"
    page = tmp_path / "sheet.html"
    invoke_cli("dupes", "--html", str(page), "-f", "paths", check=True)
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 2
    assert "cannot read" in html  # the vanished file gets a placeholder, not a crash
    assert "we&lt;b&gt;ird &amp; &quot;quoted&quot;" in html and "we<b>ird" not in html
    bad = invoke_cli("dupes", "--threshold", "3")
    assert bad.returncode == 1 and bad.stderr.startswith("error: threshold 3")


def test_contact_sheet_of_no_groups(conn, settings, tmp_path):
    result = dupes.find_duplicates(conn)
    assert result.groups == [] and result.images == 0
    assert sheet.write_contact_sheet(result, tmp_path / "empty.html", settings.home) == 0
    assert "0 groups among 0 images" in (tmp_path / "empty.html").read_text()


def test_real_images_every_planted_group_and_no_false_one(settings, conn, embedder, tmp_path):
    """Files through `load` and the random-weights model: copies, re-encodes and resizes group.

    With this untrained model near-copies of these pictures sit at cosine distance <= 0.0003 and
    the closest two different pictures at >= 0.003 (measured on make_image's pictures), so the
    test uses a threshold of 0.001 instead of the default meant for the pretrained model.
    """
    from vecsearch.load import load

    folder = tmp_path / "library"
    planted = {}
    for seed in range(100, 120):
        original = make_image(folder / "originals" / f"{seed}.png", seed=seed, size=(320, 240))
        if seed % 5:
            continue
        img = Image.open(original)
        copies = [folder / "backup" / f"{seed}.png", folder / "web" / f"{seed}.jpg",
                  folder / "thumbs" / f"{seed}.png", folder / "print" / f"{seed}.jpg"]
        for path in copies:
            path.parent.mkdir(parents=True, exist_ok=True)
        copies[0].write_bytes(original.read_bytes())  # exact copy: same sha256
        img.save(copies[1], quality=75)  # re-encoded
        img.resize((160, 120)).save(copies[2])  # downscaled
        img.resize((640, 480)).save(copies[3], quality=92)  # upscaled: the keeper
        planted[str(copies[3])] = {str(original), *map(str, copies)}
    summary = load(settings, folder, embedder)
    assert summary.failed == [] and summary.found == 36
    result = dupes.find_duplicates(conn, threshold=0.001)
    assert {g.keeper.path: {m.path for m in g.members} for g in result.groups} == planted
    assert all(m.distance < 0.001 for g in result.groups for m in g.members)
    assert result.images == 36 and result.exact_copy_sets == 4


def test_images_the_graph_search_does_not_reach_are_compared_exactly(conn, planted, monkeypatch):
    # HNSW can leave nodes without incoming links (bench/dupes.py met a few at 100k): a search
    # from such an image does not even find the image itself. Simulate that for group b's two
    # images: the index returns nothing for them, so only the exact pass can find their pair.
    ids = dict(conn.execute("SELECT path, id FROM images").fetchall())
    astray = {ids["/photos/b/one.png"], ids["/photos/b/two.png"]}
    search = dupes._Searcher._one

    def lost_in_the_graph(self, batch, k):
        return [(q, n) for q, n in search(self, batch, k) if q not in astray]

    monkeypatch.setattr(dupes._Searcher, "_one", lost_in_the_graph)
    result = dupes.find_duplicates(conn)
    assert result.unreached == 2
    assert [sorted(m.path for m in g.members) for g in result.groups][1] == ["/photos/b/one.png",
                                                                            "/photos/b/two.png"]
    assert len(result.groups) == 2  # and the exact pass adds no false pair (the sibling stays out)
