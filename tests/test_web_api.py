"""The web app (`vecsearch serve`): every JSON endpoint and page, through the real app.

The app runs against a real database holding real Pillow pictures loaded by `vecsearch.load`
with the random-init test model (fixture `web_gallery`). Traversal attempts also go over a real
socket to a uvicorn server, because HTTP clients normalise `../` away before sending.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from conftest import counting, make_image
from fastapi.testclient import TestClient
from PIL import Image

from vecsearch import db, thumbs, web
from vecsearch.embed import Embedder
from vecsearch.expr import evaluate, parse
from vecsearch.query import similar, similar_to

BASE = "http://127.0.0.1"
# The server embeds uploads with the recorded model, here `--weights random`, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::vecsearch.embed.RandomWeightsWarning")


@pytest.fixture(scope="module")
def client(web_gallery) -> Iterator[TestClient]:
    app = web.create_app(web_gallery.settings, weights="random")
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        yield c


@contextmanager
def live_server(app) -> Iterator[tuple[str, int]]:
    """`app` served by uvicorn on 127.0.0.1 and a free port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def raw_get(address: tuple[str, int], target: str) -> tuple[int, bytes]:
    """GET with the request target sent exactly as written (no normalisation of `..`)."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


# -- browse and metadata -------------------------------------------------------------------------


def test_browse_page_shows_count_grid_and_filters_by_path(client, web_gallery):
    n = len(web_gallery.ids)
    page = client.get("/")
    assert page.status_code == 200
    assert f"{n} images" in page.text
    for image_id in web_gallery.ids.values():
        assert f'href="/images/{image_id}"' in page.text
        assert f'src="/media/{image_id}/thumb"' in page.text

    filtered = client.get("/", params={"q": "SUB/"})  # any case
    assert "1 image whose path contains" in filtered.text
    assert f'href="/images/{web_gallery.ids["sub/b_sub.png"]}"' in filtered.text
    assert filtered.text.count('class="card"') == 1

    # LIKE wildcards are plain characters in the filter.
    assert client.get("/", params={"q": "a_c"}).text.count('class="card"') == 1  # a_copy.jpg
    assert client.get("/", params={"q": "a%c"}).text.count('class="card"') == 0
    assert client.get("/", params={"q": "no such name"}).text.count('class="card"') == 0


def test_browse_pages(client, web_gallery):
    assert len(web_gallery.ids) == 8
    first = client.get("/", params={"per_page": 3})
    assert first.text.count('class="card"') == 3
    assert "page 1 of 3" in first.text
    assert 'rel="next" href="/?per_page=3&amp;page=2"' in first.text
    assert 'rel="prev"' not in first.text
    last = client.get("/", params={"per_page": 3, "page": 3})
    assert last.text.count('class="card"') == 2
    assert 'rel="prev"' in last.text and 'rel="next"' not in last.text
    ids = sorted(web_gallery.ids.values())
    assert f'href="/images/{ids[-1]}"' in last.text and f'href="/images/{ids[0]}"' not in last.text


def test_api_images_lists_pages_in_id_order(client, web_gallery):
    ids = sorted(web_gallery.ids.values())
    body = client.get("/api/images", params={"per_page": 3, "page": 2}).json()
    assert body["total"] == len(ids) and body["pages"] == -(-len(ids) // 3)
    assert [img["id"] for img in body["images"]] == ids[3:6]
    assert client.get("/api/images", params={"q": "odd <name>"}).json()["total"] == 1
    assert client.get("/api/images", params={"per_page": 0}).status_code == 400
    assert client.get("/api/images", params={"page": 10**20}).status_code == 400
    assert client.get("/api/images", params={"page": 10**9}).json()["images"] == []
    bad = client.get("/api/images", params={"page": "x"})
    assert bad.status_code == 400 and "page" in bad.json()["error"]


def test_api_image_metadata_matches_the_row(client, web_gallery):
    image_id = web_gallery.ids["a.png"]
    body = client.get(f"/api/images/{image_id}").json()
    with db.connect(web_gallery.settings) as conn:
        row = conn.execute("SELECT path, sha256, bytes, width, height, format FROM images WHERE id = %s",
                           [image_id]).fetchone()
    assert (body["path"], body["sha256"], body["bytes"], body["width"], body["height"],
            body["format"]) == row
    assert body["path"] == str(web_gallery.folder / "a.png")
    assert body["thumb_url"] == f"/media/{image_id}/thumb"
    missing = client.get("/api/images/987654")
    assert missing.status_code == 404
    assert missing.json() == {"error": "no image with id 987654", "status": 404}


# -- neighbours ------------------------------------------------------------------------------------


def test_api_similar_is_the_library_result(client, web_gallery):
    a = web_gallery.ids["a.png"]
    body = client.get(f"/api/images/{a}/similar", params={"k": 4}).json()
    with db.connect(web_gallery.settings) as conn:
        expected = similar(conn, a, k=4)
    assert [(r["id"], r["path"]) for r in body["results"]] == [(n.id, n.path) for n in expected]
    assert [r["similarity"] for r in body["results"]] == pytest.approx([n.similarity for n in expected])
    assert body["results"][0]["id"] == web_gallery.ids["a_copy.jpg"]  # the near-copy first
    assert a not in [r["id"] for r in body["results"]]
    sims = [r["similarity"] for r in body["results"]]
    assert sims == sorted(sims, reverse=True)
    exact = client.get(f"/api/images/{a}/similar", params={"k": 4, "exact": True}).json()
    assert [r["id"] for r in exact["results"]] == [r["id"] for r in body["results"]]
    assert client.get(f"/api/images/{a}/similar", params={"k": 0}).status_code == 400
    assert client.get(f"/api/images/{a}/similar", params={"k": 101}).status_code == 400
    assert client.get("/api/images/987654/similar").status_code == 404


def test_image_page_shows_neighbours_with_scores_as_links(client, web_gallery):
    a = web_gallery.ids["a.png"]
    page = client.get(f"/images/{a}", params={"k": 3})
    assert page.status_code == 200
    assert str(web_gallery.folder / "a.png") in page.text
    assert f'src="/media/{a}/preview"' in page.text
    with db.connect(web_gallery.settings) as conn:
        expected = similar(conn, a, k=3)
    for n in expected:
        assert f'href="/images/{n.id}"' in page.text
        assert f"{n.similarity:.4f}" in page.text
    assert "3 nearest neighbours" in page.text
    missing = client.get("/images/987654")
    assert missing.status_code == 404 and "no image with id 987654" in missing.text


def test_html_escapes_paths(client, web_gallery):
    odd = web_gallery.ids["odd <name> & 'q'.png"]
    page = client.get(f"/images/{odd}")
    assert "odd &lt;name&gt; &amp; &#39;q&#39;.png" in page.text
    assert "odd <name>" not in page.text


# -- files and thumbnails ------------------------------------------------------------------------


def test_thumbnail_cached_on_disk_keyed_by_indexed_content(client, web_gallery):
    image_id = web_gallery.ids["c.png"]
    path = web_gallery.folder / "c.png"
    response = client.get(f"/media/{image_id}/thumb")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) == thumbs.SIZES["thumb"] and thumb.size == (256, 192)  # 320 x 240 source
    st = path.stat()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cached = list(thumbs.cache_dir(web_gallery.settings.home).rglob(thumbs.cache_key(digest, 256) + ".jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == response.content
    made = cached[0].stat().st_mtime_ns
    assert client.get(f"/media/{image_id}/thumb").content == response.content
    assert cached[0].stat().st_mtime_ns == made  # served from the cache, not made again

    # A new mtime with the same content is still the indexed content: served. New content is not,
    # until it is loaded again (web and thumbs serve only bytes that hash to the stored sha256).
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    original = path.read_bytes()
    try:
        assert client.get(f"/media/{image_id}/thumb").content == response.content
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        for rendition in ("thumb", "preview", "original"):
            assert client.get(f"/media/{image_id}/{rendition}").status_code == 404, rendition
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert client.get(f"/media/{image_id}/thumb").content == response.content


def test_thumbnail_applies_exif_orientation(client, web_gallery):
    image_id = web_gallery.ids["rotated.jpg"]
    stored = Image.open(web_gallery.folder / "rotated.jpg")
    assert stored.size == (320, 160)  # landscape pixels, EXIF orientation 6 (portrait on screen)
    for rendition, px in (("thumb", 256), ("preview", 1024)):
        img = Image.open(io.BytesIO(client.get(f"/media/{image_id}/{rendition}").content))
        assert img.size[1] > img.size[0], rendition
        assert max(img.size) == min(px, 320)


def test_original_is_the_indexed_file(client, web_gallery):
    image_id = web_gallery.ids["b.png"]
    response = client.get(f"/media/{image_id}/original")
    assert response.status_code == 200
    assert response.content == (web_gallery.folder / "b.png").read_bytes()
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_file_gone_from_disk_is_a_clear_404(client, web_gallery):
    gone = str(web_gallery.folder / "deleted-after-load.png")
    with db.connect(web_gallery.settings) as conn:
        image_id = conn.execute(
            "INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
            "SELECT %s, sha256, bytes, width, height, format, mtime, embedding FROM images "
            "WHERE id = %s RETURNING id", [gone, web_gallery.ids["a.png"]]).fetchone()[0]
        try:
            for rendition in ("thumb", "preview", "original"):
                response = client.get(f"/media/{image_id}/{rendition}")
                assert response.status_code == 404, rendition
                assert "deleted-after-load.png" in response.text
                assert "Traceback" not in response.text
        finally:
            conn.execute("DELETE FROM images WHERE id = %s", [image_id])


TRAVERSALS = [
    "/media/../../../../etc/passwd",
    "/media/1/../../../../etc/passwd",
    "/media/%2e%2e/%2e%2e/etc/passwd",
    "/media/..%2f..%2f..%2fetc%2fpasswd/original",
    "/media/%2fetc%2fpasswd/original",
    "/media/%252e%252e%252fetc%252fpasswd/original",
    "/media//etc/passwd/original",
    "/media/1/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/media/1/%2e%2e",
    "/media/-1/original",
    "/media/1.5/thumb",
    "/media/987654/original",
    "/media/99999999999999999999/original",
    "/api/images/99999999999999999999/similar",
    "/media/0/thumb",
    "/static/../__init__.py",
    "/static/../../db.py",
    "/static/../../../pyproject.toml",
    "/static/%2e%2e/__init__.py",
    "/static/..%2f__init__.py",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/static/..%5c__init__.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "//etc/passwd",
    "/etc/passwd",
    "/images/../../etc/passwd",
    "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/images/..%2f..%2fetc%2fpasswd",
    "/api/images/%2Fetc%2Fpasswd",
    "/api/images/%2e%2e/similar",
]


def test_traversal_attempts_are_404_over_a_real_socket(web_gallery):
    secret = Path("/etc/passwd").read_bytes()[:20]
    source = (Path(web.__file__)).read_bytes()[:40]
    app = web.create_app(web_gallery.settings)
    with live_server(app) as address:
        for target in TRAVERSALS:
            status, body = raw_get(address, target)
            assert status == 404, (target, status, body[:200])
            assert secret not in body and source not in body and b"Traceback" not in body
        # A path in the query string is ignored: only ids name files.
        a = web_gallery.ids["a.png"]
        status, body = raw_get(address, f"/media/{a}/original?path=/etc/passwd")
        assert status == 200 and body == (web_gallery.folder / "a.png").read_bytes()


@pytest.mark.parametrize("target", [t for t in TRAVERSALS if "/../" not in t and not t.endswith("/..")])
def test_traversal_attempts_are_404_through_the_app(client, target):
    response = client.get(target)
    assert response.status_code == 404
    assert "root:" not in response.text


# -- search by upload ------------------------------------------------------------------------------


def test_upload_search_loads_the_recorded_model_once_and_lazily(web_gallery, embedder, monkeypatch):
    app = web.create_app(web_gallery.settings, weights="random")
    builds = counting(monkeypatch, Embedder, "from_record")
    query = web_gallery.folder / "a_copy.jpg"
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/").status_code == 200 and builds.calls == 0  # not loaded for browsing
        first = c.post("/api/search", files={"file": ("query.jpg", query.read_bytes(), "image/jpeg")},
                       data={"k": "3"})
        assert first.status_code == 200, first.text
        body = first.json()
        with db.connect(web_gallery.settings) as conn:
            # The same library path as `vecsearch search`: embed with the recorded model, similar_to.
            from vecsearch.embed import file_embedder

            expected = similar_to(conn, file_embedder(conn, embedder=embedder)(query), k=3)
        assert [r["id"] for r in body["results"]] == [n.id for n in expected]
        assert body["results"][0]["id"] in (web_gallery.ids["a_copy.jpg"], web_gallery.ids["a.png"])
        assert body["query"] == {"filename": "query.jpg", "bytes": query.stat().st_size}

        page = c.post("/search", files={"file": ("q.png", (web_gallery.folder / "b.png").read_bytes())})
        assert page.status_code == 200
        assert f'href="/images/{web_gallery.ids["b.png"]}"' in page.text
        assert 'src="data:image/jpeg;base64,' in page.text  # the uploaded image, shown back
        assert builds.calls == 1


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 60).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def test_upload_with_weights_other_than_the_recorded_model_is_refused(web_gallery, tmp_path):
    other = tmp_path / "other-weights.pt"
    other.write_bytes(os.urandom(1024))
    app = web.create_app(web_gallery.settings, weights=str(other))
    with TestClient(app, base_url=BASE) as c:
        query = (web_gallery.folder / "a.png").read_bytes()
        response = c.post("/api/search", files={"file": ("a.png", query)})
    assert response.status_code == 409
    assert "random(seed=0)" in response.json()["error"] and "--reembed" in response.json()["error"]


@pytest.mark.parametrize("content,message", [
    (b"", "the uploaded file is empty"),
    (b"just some text, not a picture", "x.jpg: not an image"),
    (_truncated_png(), "x.jpg: truncated"),
])
def test_upload_of_a_non_image_is_a_clear_400(client, content, message):
    api = client.post("/api/search", files={"file": ("x.jpg", content)})
    assert api.status_code == 400
    assert message in api.json()["error"]
    assert "/tmp" not in api.json()["error"]
    page = client.post("/search", files={"file": ("x.jpg", content)})
    assert page.status_code == 400 and message in page.text and "Traceback" not in page.text


def test_upload_decompression_bomb_is_refused_before_decoding(client, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 megapixels in a few kB
    assert bomb.stat().st_size < 100_000
    response = client.post("/api/search", files={"file": ("bomb.png", bomb.read_bytes())})
    assert response.status_code == 400
    assert "decompression bomb" in response.json()["error"]


def test_upload_size_limit(web_gallery, monkeypatch):
    app = web.create_app(web_gallery.settings, max_upload_bytes=64 * 1024)
    builds = counting(monkeypatch, Embedder, "from_record")
    big = b"\xff\xd8\xff" + os.urandom(100 * 1024)
    with TestClient(app, base_url=BASE) as c:
        api = c.post("/api/search", files={"file": ("big.jpg", big)})
        assert api.status_code == 413 and "larger than the server's limit" in api.json()["error"]
        page = c.post("/search", files={"file": ("big.jpg", big)})
        assert page.status_code == 413 and "larger than the server&#39;s limit" in page.text

        # Without a Content-Length (chunked), the body is counted as it arrives.
        def chunks():
            yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
            for _ in range(10):
                yield os.urandom(16 * 1024)
        chunked = c.post("/api/search", content=chunks(),
                         headers={"content-type": "multipart/form-data; boundary=x"})
        assert chunked.status_code == 413
        assert builds.calls == 0  # refused before any model was built


# -- arithmetic --------------------------------------------------------------------------------


def test_arithmetic_api_and_page_use_the_cli_functions(client, web_gallery):
    a, b, c = (web_gallery.ids[n] for n in ("a.png", "b.png", "c.png"))
    expr = f"{a} + {b}*0.5 - {c}"
    body = client.get("/api/arithmetic", params={"expr": expr, "k": 4}).json()
    with db.connect(web_gallery.settings) as conn:
        vector, exclude = evaluate(conn, parse(expr), embed_file=None)
        expected = similar_to(conn, vector, k=4, exclude=exclude)
    assert [r["id"] for r in body["results"]] == [n.id for n in expected]
    assert not {a, b, c} & {r["id"] for r in body["results"]}
    assert body["query"] == {"expr": expr, "exclude": sorted([a, b, c])}

    page = client.get("/arithmetic", params={"expr": expr, "k": 4})
    assert page.status_code == 200
    for n in expected:
        assert f'href="/images/{n.id}"' in page.text


def test_arithmetic_errors_point_at_the_bad_token(client, web_gallery):
    bad = client.get("/api/arithmetic", params={"expr": "1 + + * 2"})
    assert bad.status_code == 400 and "position" in bad.json()["error"]
    page = client.get("/arithmetic", params={"expr": "1 + + * 2"})
    assert page.status_code == 400 and "position" in page.text and 'value="1 + + * 2"' in page.text
    missing = client.get("/api/arithmetic", params={"expr": "987654 + 1"})
    assert missing.status_code == 404 and "987654" in missing.json()["error"]
    # Files on the server are not for the web to name, not even indexed ones.
    for expr in ("/etc/passwd + 1", f"{web_gallery.folder / 'a.png'}"):
        response = client.get("/api/arithmetic", params={"expr": expr})
        assert response.status_code == 400 and "not allowed" in response.json()["error"]
    assert client.get("/api/arithmetic").status_code == 400


# -- the rest: empty database, docs, errors, headers, hosts --------------------------------------


def test_empty_database_says_what_to_do(settings, tmp_path):
    app = web.create_app(settings)
    with TestClient(app, base_url=BASE) as c:
        page = c.get("/")
        assert page.status_code == 200 and "0 images" in page.text and "vecsearch load DIR" in page.text
        query = make_image(tmp_path / "q.png", seed=1).read_bytes()
        upload = c.post("/api/search", files={"file": ("q.png", query)})
        assert upload.status_code == 404 and "vecsearch load DIR" in upload.json()["error"]
        assert c.get("/api/images").json() == {"total": 0, "page": 1, "per_page": 48, "pages": 1,
                                               "path_contains": None, "images": []}


def test_openapi_documents_every_api_endpoint(client):
    spec = client.get("/api/openapi.json").json()
    assert set(spec["paths"]) == {"/api/images", "/api/images/{image_id}",
                                  "/api/images/{image_id}/similar", "/api/search", "/api/arithmetic",
                                  "/api/duplicates", "/api/duplicates/decisions"}
    assert "post" in spec["paths"]["/api/search"] and "post" in spec["paths"]["/api/duplicates/decisions"]
    assert "202" in spec["paths"]["/api/duplicates"]["get"]["responses"]  # a search still running
    for operations in spec["paths"].values():  # errors documented as they are sent: 400 {error, status}
        for operation in operations.values():
            assert "422" not in operation["responses"]
            assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorOut"}
    docs = client.get("/api/docs")
    assert docs.status_code == 200 and "/api/openapi.json" in docs.text


def test_unexpected_errors_are_a_message_without_traceback(web_gallery, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(thumbs, "thumbnail", boom)
    app = web.create_app(web_gallery.settings)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        image_id = web_gallery.ids["a.png"]
        page = c.get(f"/media/{image_id}/thumb")
        assert page.status_code == 500
        assert "internal error" in page.text
        assert "secret internals" not in page.text and "Traceback" not in page.text


def test_security_headers_and_loopback_host_check(client, web_gallery):
    page = client.get("/")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    # DNS rebinding: a loopback-bound server answers only to loopback names.
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/", headers={"host": "localhost:8000"}).status_code == 200
    open_app = web.create_app(web_gallery.settings, host="0.0.0.0")
    with TestClient(open_app, base_url="http://gallery.example") as c:
        assert c.get("/api/images").status_code == 200


def test_unknown_routes_and_methods(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/api/nope").json()["error"] == "no such page: /api/nope"
    assert client.delete("/api/images").status_code == 405
