"""Duplicate decisions (migration 0008, vecsearch/decisions.py): stored by content and path, kept
across a re-load, never proposed again, exported as CSV/JSON and a move script."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
from datetime import UTC, datetime

import numpy as np
from conftest import invoke_cli
from test_dupes import cnn_like, insert, near

from vecsearch import decisions, dupes


def three_groups(conn, rng=None):
    rng = rng or np.random.default_rng(5)
    base = cnn_like(rng, 20)
    rows = [{"path": f"/p/other/{i}.jpg", "vector": base[i]} for i in range(3, 20)]
    for g in range(3):
        rows += [{"path": f"/p/g{g}/big.jpg", "vector": base[g], "width": 800, "height": 600},
                 {"path": f"/p/g{g}/small.jpg", "vector": near(rng, base[g], 0.1)}]
    return insert(conn, rows)


def test_keeper_rule_pixels_then_bytes_then_oldest(conn):
    rng = np.random.default_rng(1)
    v = cnn_like(rng, 1)[0]
    insert(conn, [{"path": "/k/new.jpg", "vector": v, "sha256": "1" * 64},
                  {"path": "/k/old.jpg", "vector": v, "sha256": "2" * 64}])
    conn.execute("UPDATE images SET mtime = '2001-01-01' WHERE path = '/k/old.jpg'")
    [group] = dupes.find_duplicates(conn).groups
    assert group.keeper.path == "/k/old.jpg"  # same pixels and bytes: the oldest
    assert group.keeper.mtime == datetime(2001, 1, 1, tzinfo=UTC)
    conn.execute("UPDATE images SET bytes = 5000 WHERE path = '/k/new.jpg'")
    assert dupes.find_duplicates(conn).groups[0].keeper.path == "/k/new.jpg"  # bytes first


def test_decisions_settle_groups_and_survive_a_reload(conn):
    three_groups(conn)
    groups = dupes.find_duplicates(conn).groups
    assert len(groups) == 3
    seen = decisions.review(conn, groups)
    assert (len(seen.pending), seen.settled) == (3, 0)
    first, second, _ = seen.pending
    small = next(m for m in second.members if m.path.endswith("small.jpg"))
    assert decisions.decide(conn, [(first, first.keeper.id), (second, small.id)], 0.05) == 2
    seen = decisions.review(conn, dupes.find_duplicates(conn).groups)
    assert (len(seen.pending), seen.settled) == (1, 2)
    # A re-load gives the same files new ids: the decisions, keyed by content and path, hold.
    conn.execute("CREATE TEMP TABLE saved AS SELECT * FROM images")
    conn.execute("DELETE FROM images")
    conn.execute("INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
                 "SELECT path, sha256, bytes, width, height, format, mtime, embedding FROM saved")
    seen = decisions.review(conn, dupes.find_duplicates(conn).groups)
    assert (len(seen.pending), seen.settled) == (1, 2)
    # An edited file (new content) is no longer covered: its group is proposed again, with the
    # keeper chosen before still proposed.
    conn.execute("UPDATE images SET sha256 = repeat('f', 64) WHERE path = %s",
                 [next(m.path for m in second.members if m.id != small.id)])
    seen = decisions.review(conn, dupes.find_duplicates(conn).groups)
    assert (len(seen.pending), seen.settled) == (2, 1)
    again = next(g for g in seen.pending if any(m.path == small.path for m in g.members))
    assert decisions.proposed_keeper(again, seen.earlier).path == small.path
    assert again.keeper.path != small.path  # the rule alone would propose the other one
    rows = decisions.export(conn)
    assert {r["role"] for r in rows} == {"keep", "dupe"} and len(rows) == 4
    # (Two decisions of one second may export in either order: compare the kept paths as a set.)
    assert sorted(r["path"] for r in rows if r["role"] == "keep") == sorted([first.keeper.path, small.path])


def test_not_duplicates_and_a_foreign_keeper(conn):
    three_groups(conn)
    group = dupes.find_duplicates(conn).groups[0]
    assert decisions.decide(conn, [(group, None)], 0.05) == 1
    assert {r["role"] for r in decisions.export(conn)} == {"distinct"}
    other = dupes.find_duplicates(conn).groups
    try:
        decisions.decide(conn, [(other[1], other[2].keeper.id)], 0.05)
    except Exception as e:  # InvalidInput: nothing stored
        assert "not in the group" in str(e)
    else:
        raise AssertionError("a keeper from another group was accepted")
    assert len(decisions.export(conn)) == 2
    assert decisions.group_key(group) == decisions.group_key(dupes.Group(group.members[::-1]))


def test_cli_leaves_settled_groups_out_and_exports_them(settings, conn, tmp_path):
    three_groups(conn)
    groups = dupes.find_duplicates(conn).groups
    decisions.decide(conn, [(g, g.keeper.id) for g in groups[:2]], 0.05)
    out = invoke_cli("dupes", "--format", "csv", check=True)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len({r["group"] for r in rows}) == 1
    assert "2 settled groups left out" in out.stderr
    everything = invoke_cli("dupes", "--format", "csv", "--include-settled", check=True)
    assert len({r["group"] for r in csv.DictReader(io.StringIO(everything.stdout))}) == 3
    exported = json.loads(invoke_cli("dupes", "--decisions", "--format", "json", check=True).stdout)
    assert sorted(r["role"] for r in exported) == ["dupe", "dupe", "keep", "keep"]
    table = list(csv.DictReader(io.StringIO(invoke_cli("dupes", "--decisions", "--format", "csv",
                                                    check=True).stdout)))
    assert [r["path"] for r in table] == [r["path"] for r in exported]


def test_move_script_moves_only_unchanged_duplicates_with_their_keeper(tmp_path):
    photos = tmp_path / "my photos"
    photos.mkdir()
    files = {}
    for name, data in [("keep 1.jpg", b"k1"), ("dupe 1.jpg", b"d1"), ("keep 2.jpg", b"k2"),
                       ("dupe 2.jpg", b"d2"), ("it's.jpg", b"d3")]:
        (photos / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()

    def row(decision, role, name):
        return {"decision": decision, "role": role, "path": str(photos / name), "sha256": files[name]}

    rows = [row("a", "keep", "keep 1.jpg"), row("a", "dupe", "dupe 1.jpg"), row("a", "dupe", "it's.jpg"),
            row("b", "keep", "keep 2.jpg"), row("b", "dupe", "dupe 2.jpg")]
    (photos / "keep 2.jpg").write_bytes(b"edited since")  # its keeper changed: dupe 2 stays
    dest = tmp_path / "to review"
    script = tmp_path / "move.sh"
    script.write_text(decisions.move_script(rows, str(dest)))
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True)
    assert "2 moved" in done.stderr and "1 skipped" in done.stderr
    assert (dest / str(photos / "dupe 1.jpg").lstrip("/")).read_bytes() == b"d1"
    assert (dest / str(photos / "it's.jpg").lstrip("/")).read_bytes() == b"d3"
    assert sorted(p.name for p in photos.iterdir()) == ["dupe 2.jpg", "keep 1.jpg", "keep 2.jpg"]
