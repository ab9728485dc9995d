"""The gallery's duplicate review (/duplicates) with 2,000+ groups: server time of each request.

    .venv/bin/python bench/dupes_page.py [--groups 2400] [--group-every 5] [--repeat 7]

bench/dupes.py's synthetic CNN-like vectors and planted groups (an original and 1-3 copies: an
exact copy, a "re-encode", a "resize", a "crop"), planted densely: one group per `--group-every`
rows instead of per 40, so 2,400 groups take 12,000 rows. Rows only: GET /duplicates renders
HTML that names thumbnails by URL, so no file is read for it (the thumbnails are separate
requests, not timed here).

The same sequence runs twice, each with a search of its own: in-process (the app called over
ASGI by FastAPI's TestClient: server time alone), then against the real `vecsearch serve` as a
subprocess on the same throwaway embedded server, with one keep-alive HTTP client (wall-clock
from request to last byte over loopback). In order:
- the first view (cold): the search runs in the server's background thread while the page
  answers "computing" (after waiting up to dupes_page.WAIT_S, 0.8 s, for it) and reloads; timed
  until the groups page arrives, with the search's own seconds as the page states them;
- cached views: the first page, a middle page, the last page, a first page of 100 groups;
- POST accept-selected (one page of 20 groups), then POST accept-all (every remaining group),
  each without following the redirect, then the page with nothing pending.
The machine is shared: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import dupes as bench_dupes  # noqa: E402

from vecsearch import db, dupes, server, web  # noqa: E402
from vecsearch.config import Settings  # noqa: E402

THRESHOLD = 0.05  # the default: copies sit at <= 0.05, unrelated neighbours above 0.19


def populate(conn, groups: int, every: int) -> int:
    """COPY groups * every rows, one planted group per `every` rows; the HNSW index rebuilt."""
    bench_dupes.GROUP_EVERY = every
    planted, *_, definition = bench_dupes.populate(conn, groups * every)
    common.build_index(conn, definition)
    return len(set(planted.values()))


def serve(url: str, home: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "VECSEARCH_DATABASE_URL": url, "VECSEARCH_HOME": str(home),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from vecsearch.cli import main; main()", "serve",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if match := re.search(r"http://127\.0\.0\.1:\d+", line):
            return proc, match.group(0)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"vecsearch serve did not start: {line}")


def timed(client: httpx.Client, method: str, url: str, **kw) -> tuple[float, httpx.Response]:
    t = time.perf_counter()
    response = client.request(method, url, **kw)
    response.read()
    seconds = time.perf_counter() - t
    if response.status_code not in (200, 303):
        raise SystemExit(f"{method} {url}: {response.status_code} {response.text[:300]}")
    return seconds, response


def pending(html: str) -> int:
    match = re.search(r'id="summary">([\d,]+) group', html)
    if not match:
        raise SystemExit(f"no summary on the page: {html[:500]}")
    return int(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2400, help="planted duplicate groups")
    parser.add_argument("--group-every", type=int, default=5, help="rows per planted group")
    parser.add_argument("--repeat", type=int, default=7, help="views per cached measurement")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway server home")
    args = parser.parse_args()
    with common.throwaway_home("dupes-page", keep=args.keep) as home:
        print(f"server home {home}; {common.load_average()} at start", flush=True)
        running = server.ensure_running(home)
        with server.psql_connection(running) as admin:
            admin.execute("CREATE DATABASE bench_dupes_page")
        url = running.url("bench_dupes_page")
        with db.connect(Settings(database_url=url, home=home)) as conn:
            t = time.perf_counter()
            planted = populate(conn, args.groups, args.group_every)
            images = conn.execute("SELECT count(*) FROM images").fetchone()[0]
        print(f"{images:,} rows, {planted:,} planted groups, COPY + HNSW build "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        # In-process first (the app over ASGI, no socket: server time alone), then over HTTP; each
        # app searches on its own (a cold view each), the decisions emptied in between.
        settings = Settings(database_url=url, home=home)
        with TestClient(web.create_app(settings), base_url="http://127.0.0.1") as client:
            asgi = measure(client, "http://127.0.0.1", args.repeat)
        with db.connect(settings) as conn:
            conn.execute("DELETE FROM vecsearch_dupe_decisions")
        proc, base = serve(url, home)
        try:
            with httpx.Client(base_url=base, timeout=600) as client:
                http = measure(client, base, args.repeat)
        finally:
            proc.terminate()
            proc.wait(30)
        with db.connect(settings) as conn:
            decided = conn.execute("SELECT count(DISTINCT decision), count(*) "
                                   "FROM vecsearch_dupe_decisions").fetchone()
    groups = http.pop("groups")
    print(f"\n{images:,} images, {groups:,} groups found ({planted:,} planted), threshold {THRESHOLD}; "
          f"{decided[0]:,} decisions over {decided[1]:,} files stored; load average now "
          f"{os.getloadavg()[0]:.2f}")
    print("| request | over HTTP: median ms (max) | in-process: median ms (max) | runs | note (HTTP run) |")
    print("|---|---|---|---|---|")
    for label, (times, note) in http.items():
        other = asgi[label][0]
        print(f"| {label} | {statistics.median(times) * 1000:.0f} ({max(times) * 1000:.0f}) "
              f"| {statistics.median(other) * 1000:.0f} ({max(other) * 1000:.0f}) | {len(times)} | {note} |")


def measure(client: httpx.Client, origin: str, repeat: int) -> dict:
    """{label: (seconds of each run, note)} for the sequence in the module docstring, and
    "groups": how many the search found."""
    out: dict = {}
    page = f"/duplicates?threshold={THRESHOLD}"
    t = time.perf_counter()
    first, response = timed(client, "GET", page)
    views = 1
    while 'id="computing"' in response.text:
        time.sleep(0.2)
        response = client.get(page)
        views += 1
    cold = time.perf_counter() - t
    html = response.text
    searched = float(re.search(r"searched in ([\d.]+) s", html).group(1))
    out["groups"] = groups = pending(html)
    pages = int(re.search(r"page 1 of (\d+)", html).group(1))
    out["first view, cold: until the groups page"] = (
        [cold], f"{views} views; the search itself {searched:.1f} s; first answer {first * 1000:.0f} ms")

    def again(label: str, target: str) -> str:
        times, body = [], ""
        for _ in range(repeat):
            seconds, r = timed(client, "GET", target)
            times.append(seconds)
            body = r.text
        out[label] = (times, f"{len(body) / 1024:.0f} KiB")
        return body

    again("page 1 (20 groups), cached", page)
    again("a middle page, cached", f"{page}&page={pages // 2}")
    again("the last page, cached", f"{page}&page={pages}")
    again("page 1 of 100 groups, cached", f"{page}&per_page=100")
    form = {"threshold": str(THRESHOLD), "k": str(dupes.DEFAULT_K), "ef_search": str(dupes.EF_SEARCH),
            "per_page": "20"}
    keys = re.findall(r'data-key="([0-9a-f]+)"', client.get(page).text)
    seconds, r = timed(client, "POST", "/duplicates", headers={"origin": origin},
                       data={**form, "action": "selected", "group": keys}, follow_redirects=False)
    stored = int(re.search(r"stored=(\d+)", r.headers["location"]).group(1))
    out["POST accept the selected (one page)"] = ([seconds], f"{stored} groups stored")
    seconds, r = timed(client, "POST", "/duplicates", headers={"origin": origin},
                       data={**form, "action": "all"}, follow_redirects=False)
    stored_all = int(re.search(r"stored=(\d+)", r.headers["location"]).group(1))
    out["POST accept all"] = ([seconds], f"{stored_all:,} groups stored")
    html = again("page 1 after accept-all (none pending)", page + "&stored=1")
    assert 'id="none-pending"' in html and stored + stored_all == groups, (stored, stored_all)
    return out

if __name__ == "__main__":
    main()
