"""The gallery's duplicate review (/duplicates) end to end: the real `vecsearch serve`, headless
Chromium, a folder of real pictures with three duplicate groups. Saves artifacts/duplicates.png.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fresh_database, make_image, run_cli
from PIL import Image
from playwright.sync_api import Page, expect
from test_web_e2e import ARTIFACTS, _read_line, browser, page  # noqa: F401 (fixtures)

from vecsearch import db, decisions, dupes
from vecsearch.config import Settings

THRESHOLD = "0.001"  # the random-weights test model's scale (docs/dupes.md)


@pytest.fixture(scope="module")
def dupe_folder(pg_home, embedder, tmp_path_factory) -> Iterator[tuple[Settings, Path]]:
    """Three originals, each with near-copies (a byte copy, a half-size PNG, a JPEG re-encode),
    and three unrelated pictures; loaded through vecsearch.load into a database of its own."""
    from vecsearch.load import load

    folder = tmp_path_factory.mktemp("dupes")
    for g in range(3):
        original = make_image(folder / f"trip{g}" / "original.png", seed=100 + g, size=(480, 360))
        (folder / f"trip{g}" / "copy.png").write_bytes(original.read_bytes())
        img = Image.open(original)
        img.resize((240, 180), Image.LANCZOS).save(folder / f"trip{g}" / "small.png")
        img.save(folder / f"trip{g}" / "reencoded.jpg", quality=92)
    for i in range(3):
        make_image(folder / "other" / f"unrelated{i}.png", seed=200 + i)
    with fresh_database(pg_home) as url:
        settings = Settings(database_url=url, home=tmp_path_factory.mktemp("dupeshome"))
        summary = load(settings, folder, embedder, workers=0)
        assert summary.failed == [] and summary.new == 15, summary.describe()
        yield settings, folder


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dupes_served(dupe_folder) -> Iterator[str]:
    settings, _ = dupe_folder
    env = {**os.environ, "VECSEARCH_DATABASE_URL": settings.database_url,
           "VECSEARCH_HOME": str(settings.home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from vecsearch.cli import main; main()", "serve",
                             "--port", "0", "--weights", "random"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", _read_line(proc, timeout=60))
        assert match
        yield match.group(0).rstrip("/")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def _stored(settings: Settings) -> list[dict]:
    with db.connect(settings) as conn:
        return decisions.export(conn)


def test_review_accept_all_reload_export_files_untouched(page: Page, dupes_served, dupe_folder):  # noqa: F811
    settings, folder = dupe_folder
    before = _files(folder)
    url = f"{dupes_served}/duplicates?threshold={THRESHOLD}"
    page.goto(url)
    groups = page.locator("fieldset.dupe-group")
    expect(groups).to_have_count(3)
    expect(page.locator("#summary")).to_contain_text("3 groups to review")
    for i in range(3):
        group = groups.nth(i)
        expect(group.locator(".card")).to_have_count(4)
        # The rule's keeper: the most pixels (not the half-size one), then the largest file.
        trip = Path(group.locator(".card a").first.get_attribute("title")).parent
        full = [p for p in trip.iterdir() if p.name != "small.png"]
        largest = {p.name for p in full if p.stat().st_size == max(q.stat().st_size for q in full)}
        expect(group.locator(".card").first.locator(".name")).to_have_text(re.compile("|".join(largest)))
        expect(group.locator(".card").first.locator(".facts")).to_contain_text("480×360")
        expect(group.locator(".card").first.locator("input[type=radio]")).to_be_checked()
    small_png = re.compile(r"^240×180 · .* · PNG · \d{4}-\d\d-\d\d$")  # size, bytes, format, date
    expect(groups.first.locator(".facts", has_text=small_png)).to_have_count(1)
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "duplicates.png"), full_page=True)

    # A page of another site cannot post decisions: wrong Origin, or none at all.
    form = {"threshold": THRESHOLD, "k": "10", "ef_search": str(dupes.EF_SEARCH), "per_page": "20",
            "action": "all"}
    forged = page.request.post(f"{dupes_served}/duplicates", form=form,
                               headers={"origin": "http://evil.example"}, max_redirects=0)
    assert forged.status == 403
    assert page.request.post(f"{dupes_served}/duplicates", form=form, max_redirects=0).status == 403
    assert _stored(settings) == []

    page.click("#accept-all")
    expect(page.locator("#stored")).to_have_text("Stored 3 decisions.")
    expect(page.locator("#none-pending")).to_be_visible()
    rows = _stored(settings)
    assert len({r["decision"] for r in rows}) == 3
    assert sorted(r["role"] for r in rows).count("keep") == 3 and len(rows) == 12
    page.goto(url)
    expect(page.locator("#none-pending")).to_be_visible()
    expect(page.locator("#summary")).to_contain_text("0 groups to review, 3 settled")

    env = {"VECSEARCH_DATABASE_URL": settings.database_url, "VECSEARCH_HOME": str(settings.home)}
    exported = list(csv.DictReader(io.StringIO(
        run_cli("dupes", "--decisions", "--format", "csv", env=env, check=True).stdout)))
    assert sorted((r["path"], r["role"]) for r in exported) == sorted((r["path"], r["role"]) for r in rows)
    assert len({r["decision"] for r in exported}) == 3 and [r["role"] for r in exported].count("keep") == 3
    cli = run_cli("dupes", "--threshold", THRESHOLD, "--format", "csv", env=env, check=True)
    assert cli.stdout.strip() == ",".join(dupes.COLUMNS)  # nothing proposed again
    assert "3 settled groups left out" in cli.stderr
    script = run_cli("dupes", "--decisions", "--move-to", str(folder.parent / "review"), env=env,
                     check=True).stdout
    assert script.count("\nmove ") == 9
    assert _files(folder) == before  # the gallery and the export moved nothing


def test_choose_another_keeper_for_a_selected_group(page: Page, dupes_served, dupe_folder):  # noqa: F811
    settings, _ = dupe_folder
    with db.connect(settings) as conn:
        conn.execute("DELETE FROM vecsearch_dupe_decisions")
    page.goto(f"{dupes_served}/duplicates?threshold={THRESHOLD}")
    group = page.locator("fieldset.dupe-group").first
    small = group.locator(".card", has=page.locator(".name", has_text="small.png"))
    small.locator("input[type=radio]").check()
    group.locator("legend input[type=checkbox]").check()
    page.click("#accept-selected")
    expect(page.locator("#stored")).to_have_text("Stored 1 decision.")
    expect(page.locator("#summary")).to_contain_text("2 groups to review, 1 settled")
    [kept] = [r for r in _stored(settings) if r["role"] == "keep"]
    assert kept["path"].endswith("small.png")


def test_kept_alive_responses_are_not_held_back(dupes_served):
    """Each response on a reused connection leaves at once (TCP_NODELAY on the served socket):
    without it every one waited ~40 ms for the client's delayed ACK, so even the fastest of ten
    took over 40 ms; with it, a few ms."""
    import http.client
    from urllib.parse import urlparse

    address = urlparse(dupes_served)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        times = []
        for _ in range(11):
            t = time.perf_counter()
            conn.request("GET", "/static/style.css")
            response = conn.getresponse()
            assert response.status == 200 and response.read()
            times.append(time.perf_counter() - t)
    finally:
        conn.close()
    assert min(times[1:]) < 0.025, [round(s * 1000, 1) for s in times]
