"""The duplicate review's JSON API (GET /api/duplicates, POST /api/duplicates/decisions) through
the real app, on test_web_dupes_e2e's folder of real pictures: three groups of four near-copies
and three unrelated pictures, loaded with the random-init test model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_web_dupes_e2e import THRESHOLD, _files, _stored, dupe_folder  # noqa: F401 (fixture)

from vecsearch import db, decisions, dupes, web

BASE = "http://127.0.0.1"
T = float(THRESHOLD)
pytestmark = pytest.mark.filterwarnings("ignore::vecsearch.embed.RandomWeightsWarning")


@pytest.fixture()
def client(dupe_folder) -> Iterator[TestClient]:  # noqa: F811
    settings, _ = dupe_folder
    with db.connect(settings) as conn:
        conn.execute("DELETE FROM vecsearch_dupe_decisions")
    with TestClient(web.create_app(settings, weights="random"), base_url=BASE,
                    raise_server_exceptions=False) as c:
        yield c


def groups_page(client: TestClient, **params) -> dict:
    """GET /api/duplicates until the search is done (202 meanwhile)."""
    deadline = time.monotonic() + 120
    while True:
        r = client.get("/api/duplicates", params={"threshold": T, **params})
        if r.status_code != 202:
            assert r.status_code == 200, r.text
            return r.json()
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)


def test_groups_are_the_dupes_groups_with_proposed_keepers_and_pages(client, dupe_folder):  # noqa: F811
    settings, folder = dupe_folder
    body = groups_page(client)
    with db.connect(settings) as conn:
        expected = dupes.find_duplicates(conn, T).groups
    assert len(expected) == 3
    assert (body["status"], body["pending"], body["settled"], body["images"]) == ("done", 3, 0, 15)
    assert body["pages"] == 1 and body["keeper_rule"] == dupes.KEEPER_RULE
    assert [g["key"] for g in body["groups"]] == [decisions.group_key(g) for g in expected]
    for got, want in zip(body["groups"], expected, strict=True):
        assert [m["id"] for m in got["members"]] == [m.id for m in want.members]
        assert got["proposed_keeper"] == want.keeper.id == got["members"][0]["id"]
        first = got["members"][0]
        assert (first["width"], first["height"], first["distance"], first["similarity"]) == (480, 360, 0, 1)
        assert Path(first["path"]).name != "small.png"
        small = next(m for m in got["members"] if m["path"].endswith("small.png"))
        assert (small["width"], small["height"], small["format"]) == (240, 180, "PNG")
        assert 0 < small["distance"] < T and small["similarity"] == pytest.approx(1 - small["distance"])
        assert small["thumb_url"] == f"/media/{small['id']}/thumb" and small["earlier"] is None
        assert small["mtime"] is not None and small["sha256"] == want.members[
            [m.id for m in want.members].index(small["id"])].sha256
    # Paged: two groups, then the third.
    first, second = groups_page(client, per_page=2), groups_page(client, per_page=2, page=2)
    assert (first["pages"], len(first["groups"]), len(second["groups"])) == (2, 2, 1)
    assert [g["key"] for g in first["groups"] + second["groups"]] == [g["key"] for g in body["groups"]]
    assert groups_page(client, under=str(folder / "trip1"))["pending"] == 1
    assert client.get("/api/duplicates", params={"threshold": 2}).status_code == 400
    assert client.get("/api/duplicates", params={"per_page": 0}).json()["error"].startswith("invalid request")


def test_decisions_keep_pick_distinct_all_and_files_untouched(client, dupe_folder):  # noqa: F811
    settings, folder = dupe_folder
    before = _files(folder)
    one, two, three = groups_page(client)["groups"]
    url = "/api/duplicates/decisions"

    # A browser page of another site is refused; so is an empty or contradictory request.
    forged = client.post(url, json={"threshold": T, "all": True}, headers={"origin": "http://evil.example"})
    assert forged.status_code == 403 and "another site" in forged.json()["error"]
    assert client.post(url, json={"threshold": T, "all": True},
                       headers={"sec-fetch-site": "cross-site"}).status_code == 403
    assert "nothing to decide" in client.post(url, json={"threshold": T}).json()["error"]
    both = client.post(url, json={"threshold": T, "groups": [
        {"group": one["key"], "keep": 1, "distinct": True}]})
    assert both.status_code == 400 and "not both" in both.json()["error"]
    other = three["members"][0]["id"]
    wrong = client.post(url, json={"threshold": T, "groups": [{"group": one["key"], "keep": other}]})
    assert wrong.status_code == 400 and f"image {other} is not in the group" in wrong.json()["error"]
    text = client.post(url, content=f'{{"threshold": {T}, "all": true}}',
                       headers={"content-type": "text/plain"})
    assert text.status_code == 400
    assert _stored(settings) == []

    # Group one keeps its small copy (the user's pick), group two is not duplicates, a stale key is named.
    small = next(m["id"] for m in one["members"] if m["path"].endswith("small.png"))
    r = client.post(url, json={"threshold": T, "groups": [
        {"group": one["key"], "keep": small}, {"group": two["key"], "distinct": True},
        {"group": "0" * 20}]}, headers={"origin": BASE})
    assert r.status_code == 200, r.text
    assert r.json() == {"stored": 2, "stale": ["0" * 20], "pending": 1}
    rows = _stored(settings)
    assert {r["path"] for r in rows if r["role"] == "keep"} == {next(
        m["path"] for m in one["members"] if m["id"] == small)}
    assert sorted(r["role"] for r in rows) == ["distinct"] * 4 + ["dupe"] * 3 + ["keep"]
    after = groups_page(client)
    assert (after["pending"], after["settled"], [g["key"] for g in after["groups"]]) == (1, 2, [three["key"]])

    # all: the remaining group's proposed keeper; nothing is left to review, for the CLI either.
    r = client.post(url, json={"threshold": T, "all": True})
    assert r.json() == {"stored": 1, "stale": [], "pending": 0}
    rows = _stored(settings)
    assert len({r["decision"] for r in rows}) == 3 and len(rows) == 12
    assert three["members"][0]["path"] in {r["path"] for r in rows if r["role"] == "keep"}
    assert groups_page(client)["groups"] == []
    with db.connect(settings) as conn:
        assert decisions.review(conn, dupes.find_duplicates(conn, T).groups).pending == []
    assert _files(folder) == before


def test_a_running_search_answers_202_with_its_progress(client, monkeypatch):
    gate, real = threading.Event(), dupes.find_duplicates

    def gated(*args, **kwargs):  # the real search, held back until the test has seen a 202
        gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(dupes, "find_duplicates", gated)
    monkeypatch.setattr(web.dupes_page, "WAIT_S", 0.05)
    params = {"threshold": 0.0009}  # a search of its own, not yet in the app's cache
    try:
        r = client.get("/api/duplicates", params=params)
        assert r.status_code == 202 and r.headers["retry-after"] == "2"
        assert r.json()["status"] == "computing" and r.json()["elapsed_s"] >= 0
        early = client.post("/api/duplicates/decisions", json={**params, "all": True})
        assert early.status_code == 409 and "still running" in early.json()["error"]
    finally:
        gate.set()
    assert groups_page(client, threshold=0.0009)["status"] == "done"
