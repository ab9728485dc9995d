"""Hardening, round 2: each case a hostile or careless user found, as a test of the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import make_image
from fastapi.testclient import TestClient

from vecsearch import db, web
from vecsearch.load import load


def _plant_like(path: Path, private: Path) -> None:
    """Pad the image at `path` to the private file's size and give it its mtime (both from stat)."""
    st = private.stat()
    data = path.read_bytes()
    assert len(data) < st.st_size
    path.write_bytes(data + b"\0" * (st.st_size - len(data)))  # decoders ignore bytes after IEND
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_gallery_never_serves_a_symlink_swapped_in_with_the_private_files_size_and_mtime(
        settings, embedder, tmp_path):
    folder = tmp_path / "shared"
    private = tmp_path / "private" / "shadow"
    private.parent.mkdir()
    private.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n" * 400)
    photo = make_image(folder / "holiday.png", 3, (48, 48))
    _plant_like(photo, private)
    summary = load(settings, folder, embedder, workers=0)
    assert summary.new == 1 and not summary.failed
    with db.connect(settings) as conn:
        image_id, size = conn.execute("SELECT id, bytes FROM images").fetchone()
    assert size == private.stat().st_size

    app = web.create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        assert client.get(f"/media/{image_id}/original").content == photo.read_bytes()
        assert client.get(f"/media/{image_id}/thumb").status_code == 200  # cached from now on
        photo.unlink()
        photo.symlink_to(private)
        assert (os.stat(photo).st_size, os.stat(photo).st_mtime_ns) == (size, private.stat().st_mtime_ns)
        for rendition in ("original", "preview", "thumb"):
            for method in (client.get, client.head):
                response = method(f"/media/{image_id}/{rendition}")
                assert response.status_code == 404, (rendition, method)
                assert b"secret-hash" not in response.content
        # The same bytes behind a link are the indexed content, and are served.
        (tmp_path / "copy.png").write_bytes(private.read_bytes())
        private.unlink()
        private.symlink_to(tmp_path / "copy.png")
        assert client.get(f"/media/{image_id}/original").status_code == 404  # NUL-padded secret
        photo.unlink()
        _restore = tmp_path / "restored.png"
        make_image(_restore, 3, (48, 48))
        _plant_like(_restore, tmp_path / "copy.png")
        photo.symlink_to(_restore)
        response = client.get(f"/media/{image_id}/original")
        assert response.status_code == 200 and response.content == _restore.read_bytes()
        assert client.head(f"/media/{image_id}/original").status_code == 200


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_gallery_refuses_a_fifo_or_directory_in_the_files_place(settings, embedder, tmp_path, kind):
    folder = tmp_path / "shared"
    photo = make_image(folder / "a.png", 4, (40, 40))
    load(settings, folder, embedder, workers=0)
    with db.connect(settings) as conn:
        image_id = conn.execute("SELECT id FROM images").fetchone()[0]
    photo.unlink()
    os.mkfifo(photo) if kind == "fifo" else photo.mkdir()
    app = web.create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for rendition in ("original", "thumb"):
            assert client.get(f"/media/{image_id}/{rendition}").status_code == 404
