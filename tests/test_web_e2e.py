"""The gallery end to end: the real `vecsearch serve` in a subprocess, driven by headless Chromium.

Debian's `chromium` through playwright's Python API with the system browser (playwright cannot
download its own browser here; `.ci/run` installs chromium). The neighbours page is saved as
artifacts/neighbours.png.
"""

from __future__ import annotations

import base64
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = os.environ.get("VECSEARCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TIMEOUT_MS = 60_000  # the first upload imports torch and builds the model in the server


@pytest.fixture(scope="module")
def served(web_gallery) -> Iterator[str]:
    """`vecsearch serve --port 0` on the gallery's database; yields its base URL."""
    env = {**os.environ, "VECSEARCH_DATABASE_URL": web_gallery.settings.database_url,
           "VECSEARCH_HOME": str(web_gallery.settings.home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from vecsearch.cli import main; main()", "serve", "--port", "0",
         "--weights", "random"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = _read_line(proc, timeout=60)
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"unexpected first line from vecsearch serve: {line!r}"
        yield match.group(0).rstrip("/")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err  # Ctrl-C is a clean stop
    assert "Traceback" not in err


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            raise AssertionError(f"vecsearch serve printed nothing in {timeout}s: {proc.stderr.read()}")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"vecsearch serve exited: {proc.wait()} {proc.stderr.read()}")
    return line


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        f"no Chromium at {CHROMIUM}: `apt-get install chromium` (or set VECSEARCH_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def _card_ids(page: Page, selector: str) -> list[int]:
    return [int(x) for x in page.locator(selector).evaluate_all("els => els.map(e => e.dataset.id)")]


def _images_loaded(page: Page) -> bool:
    return page.evaluate("""() => Array.from(document.images)
        .every(img => img.complete && img.naturalWidth > 0)""")


def test_grid_click_an_image_see_and_walk_its_neighbours(page, served, web_gallery):
    ids = web_gallery.ids
    page.goto(served + "/")
    expect(page.locator("#count")).to_contain_text("8 images")
    assert sorted(_card_ids(page, ".browse .card")) == sorted(ids.values())
    page.wait_for_function("""() => Array.from(document.images)
        .every(img => img.complete && img.naturalWidth > 0)""")  # every thumbnail decoded

    page.locator(f'.browse .card[data-id="{ids["a.png"]}"] a').click()
    page.wait_for_url(f"**/images/{ids['a.png']}")
    expect(page.locator(".meta")).to_contain_text(str(web_gallery.folder / "a.png"))
    neighbours = _card_ids(page, ".neighbours .card")
    assert len(neighbours) == 7 and ids["a.png"] not in neighbours  # all the others, not itself
    assert neighbours[0] == ids["a_copy.jpg"]
    scores = [float(s) for s in page.locator(".neighbours .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    page.wait_for_function("""() => Array.from(document.images)
        .every(img => img.complete && img.naturalWidth > 0)""")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "neighbours.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    page.locator(".neighbours .card a").first.click()  # walk: the neighbour's own neighbours
    page.wait_for_url(f"**/images/{ids['a_copy.jpg']}")
    assert _card_ids(page, ".neighbours .card")[0] == ids["a.png"]


def test_upload_a_file_and_drop_a_file(page, served, web_gallery):
    ids = web_gallery.ids
    page.goto(served + "/")
    page.set_input_files("#upload-file", str(web_gallery.folder / "a_copy.jpg"))  # submits on change
    page.wait_for_url("**/search")
    expect(page.locator("#query-summary")).to_contain_text("a_copy.jpg")
    results = _card_ids(page, ".neighbours .card")
    assert len(results) == 8 and results[0] == ids["a_copy.jpg"]  # the same file: distance 0
    assert results[1] == ids["a.png"]
    expect(page.locator("img.query-image")).to_be_visible()

    page.goto(served + "/")
    data = base64.b64encode((web_gallery.folder / "b.png").read_bytes()).decode()
    with page.expect_navigation(url="**/search"):
        page.evaluate("""([data, name]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/png"}));
            for (const type of ["dragenter", "dragover", "drop"]) {
                document.body.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true,
                                                                 cancelable: true}));
            }
        }""", [data, "dropped.png"])
    expect(page.locator("#query-summary")).to_contain_text("dropped.png")
    assert _card_ids(page, ".neighbours .card")[0] == ids["b.png"]


def test_arithmetic_box_and_its_errors(page, served, web_gallery):
    ids = web_gallery.ids
    page.goto(served + "/arithmetic")
    page.fill('#arithmetic-form input[name="expr"]', f"{ids['a.png']} + {ids['b.png']}")
    page.fill('#arithmetic-form input[name="k"]', "3")
    page.click('#arithmetic-form button')
    page.wait_for_url("**/arithmetic?expr=*")
    results = _card_ids(page, ".neighbours .card")
    assert len(results) == 3 and not {ids["a.png"], ids["b.png"]} & set(results)

    page.goto(served + f"/images/{ids['c.png']}")  # the box in the header, on any page
    page.fill('#arith-box input[name="expr"]', f"{ids['c.png']} - {ids['d.png']}*0.5")
    page.press('#arith-box input[name="expr"]', "Enter")
    page.wait_for_url("**/arithmetic?expr=*")
    assert not {ids["c.png"], ids["d.png"]} & set(_card_ids(page, ".neighbours .card"))

    page.fill('#arithmetic-form input[name="expr"]', "1 + * 2")
    page.click('#arithmetic-form button')
    expect(page.locator("#search-error")).to_contain_text("bad expression at position")


def test_error_pages_are_messages(page, served):
    response = page.goto(served + "/images/987654")
    assert response.status == 404
    expect(page.locator("#error-message")).to_have_text("no image with id 987654")
    response = page.goto(served + "/media/..%2f..%2fetc%2fpasswd/original")
    assert response.status == 404
    assert "root:" not in page.content()


def test_openapi_page_renders_without_a_cdn(page, served):
    page.goto(served + "/api/docs")
    expect(page.locator(".swagger-ui")).to_contain_text("/api/images/{image_id}/similar")
    expect(page.locator(".swagger-ui")).to_contain_text("/api/search")


def test_serve_refuses_a_busy_port_in_one_line(served, web_gallery):
    port = served.rsplit(":", 1)[1]
    result = run_cli("serve", "--port", port, timeout=60, env={
        "VECSEARCH_DATABASE_URL": web_gallery.settings.database_url,
        "VECSEARCH_HOME": str(web_gallery.settings.home)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use): choose another --port"]


def test_serve_refuses_a_missing_weights_file(tmp_path):
    result = run_cli("serve", "--port", "0", "--weights", str(tmp_path / "nope.pt"), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --weights {tmp_path / 'nope.pt'}: no such file (give a state-dict file, or 'random')"]
