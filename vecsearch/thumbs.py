"""Thumbnails for the web gallery: made on first request, cached on disk under VECSEARCH_HOME.

The cache is keyed by the indexed content (its sha256) and the rendition size, and a thumbnail is
only ever made from bytes that hashed to that sha256 (`indexed.Verified`): whatever happens to the
file after the load, no thumbnail shows anything but what was indexed. Before a cached thumbnail
is served, the file itself is checked to still hold that content. Files are written to a
temporary name and renamed, so concurrent requests never see half a JPEG. Decoding goes through
`images.open_image`, the same code (EXIF orientation, RGB, memory limits) that `vecsearch load` uses.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from .verified_files import Verified

# Rendition name -> longest side in pixels.
SIZES = {"thumb": 256, "preview": 1024}
QUALITY = 85


def cache_dir(home: Path) -> Path:
    return home / "thumbs"


def cache_key(sha256: str, px: int) -> str:
    return f"{sha256}-{px}"


def thumbnail(home: Path, row: dict, px: int, verified: Verified) -> Path:
    """The cached JPEG of image `row` (id, path, sha256, bytes) scaled to fit `px` x `px`.

    Raises NotFound when the file is gone or no longer holds the indexed content,
    errors.UnreadableImage when it does not decode.
    """
    key = cache_key(row["sha256"], px)
    target = cache_dir(home) / key[:2] / f"{key}.jpg"
    if target.exists():
        verified.check(row["id"], row["path"], row["sha256"], row["bytes"])
        return target
    from PIL import Image

    from .images import open_image

    data = verified.read(row["id"], row["path"], row["sha256"], row["bytes"])
    # A big JPEG decodes at 1/2..1/8 scale, a RAW file at half size, still >= px.
    img = open_image(io.BytesIO(data), draft=px, name=row["path"])
    img.thumbnail((px, px), Image.Resampling.LANCZOS, reducing_gap=3.0)
    cache_dir(home).mkdir(parents=True, exist_ok=True, mode=0o700)
    target.parent.mkdir(exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            img.save(f, "JPEG", quality=QUALITY, optimize=True)
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
