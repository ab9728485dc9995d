"""Thumbnails for the web gallery: made on first request, cached on disk under VECSEARCH_HOME.

The cache key is the file's path, mtime and size plus the rendition size, so an edited or
replaced file gets a new thumbnail and a stale one is never served. Files are written to a
temporary name and renamed, so concurrent requests for the same thumbnail never see half a
JPEG. Decoding goes through `images.open_image`, the same code (EXIF orientation, RGB,
decompression-bomb limit) that `vecsearch load` uses.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import NotFound

# Rendition name -> longest side in pixels.
SIZES = {"thumb": 256, "preview": 1024}
QUALITY = 85


def cache_dir(home: Path) -> Path:
    return home / "thumbs"


def cache_key(path: str, mtime_ns: int, size_bytes: int, px: int) -> str:
    return hashlib.sha256(f"{path}\0{mtime_ns}\0{size_bytes}\0{px}".encode()).hexdigest()


def thumbnail(home: Path, path: str, px: int) -> Path:
    """The cached JPEG of the image at `path` scaled to fit `px` x `px`, made if missing.

    Raises NotFound when the file is gone, errors.InvalidInput when it no longer decodes.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise NotFound(f"the file {path} cannot be read ({e.strerror}): re-run `vecsearch load` "
                       "with --prune to drop rows of deleted files") from e
    key = cache_key(path, st.st_mtime_ns, st.st_size, px)
    target = cache_dir(home) / key[:2] / f"{key}.jpg"
    if target.exists():
        return target
    from PIL import Image

    from .images import open_image

    img = open_image(path, draft=px)  # a big JPEG decodes at 1/2..1/8 scale, still >= px
    img.thumbnail((px, px), Image.Resampling.LANCZOS, reducing_gap=3.0)
    cache_dir(home).mkdir(parents=True, exist_ok=True, mode=0o700)
    target.parent.mkdir(exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, "JPEG", quality=QUALITY, optimize=True)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
