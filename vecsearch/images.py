"""Image files: finding them in a folder tree and decoding them safely into model-ready pixels.

Pillow and numpy only (no torch): decoding runs in load's worker processes, in the web server
and in `vecsearch search`, and every one of them must turn a file into the same pixels.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInput, NotFound, UnreadableImage
from .models import CROP, RESIZE

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib",
                              ".gif", ".tif", ".tiff"})
# Pillow's own decompression-bomb threshold, applied to the pixels actually decoded (after JPEG
# draft), so a 100-megapixel JPEG still loads at 1/8 scale while a 20000 x 20000 PNG is refused.
# Pillow itself refuses any header above twice this before decoding anything.
MAX_PIXELS = 89_478_485
WHITE = (255, 255, 255)
# The unique btree index on images.path holds rows of at most 2704 bytes; a longer path (Linux
# allows 4095) would fail its whole batch. Reported at discovery instead.
MAX_PATH_BYTES = 2600


# -- discovery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """An image file found by `find_images`: absolute path, size and mtime from its stat."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class Found:
    files: list[Candidate] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def sniff(head: bytes) -> str | None:
    """The image format named by a file's first bytes, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    # "BM" alone is too weak a signature: also require a known DIB header size.
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"
    return None


def _sniff_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return sniff(f.read(32)) is not None
    except OSError:
        return False


def display_path(path: str) -> str:
    """`path` printable and storable as UTF-8 (undecodable bytes shown as \\x escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def find_images(folder: str | os.PathLike) -> Found:
    """Every image file under `folder`, recursively, sorted by absolute path.

    Images are recognised by extension or, failing that, by content (a PNG named `.dat` counts;
    a text file named `.jpg` is listed too and fails at decode with a reason). Hidden files and
    directories are skipped; symbolic links are followed, each directory visited once (no loops).
    Entries that look like images but cannot be used (broken link, FIFO, non-UTF-8 name) are
    reported in `failed` instead.
    """
    root = os.path.abspath(os.fspath(folder))
    if not os.path.exists(root):
        raise NotFound(f"folder {root} does not exist")
    if not os.path.isdir(root):
        raise InvalidInput(f"{root} is not a folder: give the folder that holds the images")
    found = Found()
    seen_dirs: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            found.failed.append((display_path(directory), f"cannot list folder: {e.strerror or e}"))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = entry.path
            looks_like_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            try:
                st = entry.stat()  # follows symbolic links
            except OSError as e:
                if looks_like_image:
                    reason = ("symbolic link loop" if e.errno == errno.ELOOP
                              else "broken symbolic link" if entry.is_symlink() else (e.strerror or str(e)))
                    found.failed.append((display_path(path), reason))
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(path)
                continue
            if not stat.S_ISREG(st.st_mode):
                if looks_like_image:
                    found.failed.append((display_path(path), "not a regular file"))
                continue
            if not (looks_like_image or _sniff_file(path)):
                continue
            if display_path(path) != path:
                found.failed.append((display_path(path), "file name is not valid UTF-8: rename it"))
                continue
            if len(path.encode()) > MAX_PATH_BYTES:
                found.failed.append((path, f"path is {len(path.encode())} bytes long, more than the "
                                           f"{MAX_PATH_BYTES} vecsearch can index: move it higher up"))
                continue
            found.files.append(Candidate(path, st.st_size, st.st_mtime_ns))
        stack.extend(reversed(subdirs))
    found.files.sort(key=lambda c: c.path)
    return found


# -- decoding --------------------------------------------------------------------------------


def sha256_of(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def resized_size(width: int, height: int, resize: int = RESIZE) -> tuple[int, int]:
    """torchvision's Resize(resize) output size: short side `resize`, long side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


@dataclass(frozen=True)
class Decoded:
    """A decoded file: RGB pixels (maybe at JPEG draft scale) and the file's own pixel size."""

    image: Image.Image
    format: str
    width: int  # full resolution, as displayed (EXIF orientation applied)
    height: int


def open_image(source: str | os.PathLike | BinaryIO, *, draft: int | None = RESIZE) -> Image.Image:
    """Decode an image file into an RGB Pillow image, the same way everywhere.

    First frame of animations; EXIF orientation applied; palette, alpha (over white), CMYK,
    greyscale and 16-bit modes converted to 8-bit RGB. `draft`: a JPEG is decoded at the
    smallest 1/2, 1/4 or 1/8 scale whose short side stays >= `draft` pixels (None: full size).
    Raises UnreadableImage with a one-line reason.
    """
    return open_decoded(source, draft=draft).image


def open_decoded(source: str | os.PathLike | BinaryIO, *, draft: int | None = RESIZE) -> Decoded:
    """open_image, plus the format and full pixel size (for the images row)."""
    if not isinstance(source, (str, os.PathLike)):
        return _decode(source, draft)
    try:
        return _decode(source, draft)
    except UnreadableImage as e:
        raise UnreadableImage(f"{display_path(os.fspath(source))}: {e}") from e.__cause__


def _decode(source: str | os.PathLike | BinaryIO, draft: int | None) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        with img:
            fmt, (width, height) = img.format or "unknown", img.size
            if _orientation(img) in (5, 6, 7, 8):
                width, height = height, width
            if draft and img.format == "JPEG":
                img.draft(None, resized_size(*img.size, draft))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise Image.DecompressionBombError(f"Image size ({w * h} pixels)")
            img.load()
            return Decoded(_to_rgb(_oriented(img)), fmt, width, height)
    except FileNotFoundError as e:
        raise UnreadableImage("file not found") from e
    except Image.DecompressionBombError as e:
        raise UnreadableImage(
            f"decompression bomb? {_pixels(e)} is over the limit of {MAX_PIXELS} pixels") from e
    except UnidentifiedImageError as e:
        fmt = _sniff_source(source)
        if fmt:
            raise UnreadableImage(f"a {fmt} file of a kind Pillow cannot decode") from e
        raise UnreadableImage("not an image (no image format recognised in its content)") from e
    except MemoryError as e:
        raise UnreadableImage("out of memory while decoding") from e
    except Exception as e:  # Pillow raises many types on corrupt data (OSError, ValueError, SyntaxError...)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and "truncated" in message:
            raise UnreadableImage(f"truncated file ({message})") from e
        raise UnreadableImage(f"cannot decode ({message})") from e


def _sniff_source(source: str | os.PathLike | BinaryIO) -> str | None:
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return sniff(f.read(32))
        source.seek(0)
        return sniff(source.read(32))
    except (OSError, ValueError):
        return None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _pixels(e: Exception) -> str:
    # Pillow's message: "Image size (N pixels) exceeds limit of ...": keep our own wording.
    text = str(e)
    if "Image size (" in text:
        return text.split("Image size (", 1)[1].split(")", 1)[0]
    return text or "too many pixels"


def _oriented(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # a malformed EXIF block: the pixels are still good, keep them as stored
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, HSV


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit and float greyscale scaled to 0..255 (Pillow's own convert clips at 255)."""
    a = a.astype(np.float64)
    top = float(a.max(initial=0))
    if top <= 1.0 and a.dtype.kind == "f":
        scale = 255.0
    elif top <= 255:
        scale = 1.0
    elif top <= 65535:
        scale = 1 / 257
    else:
        scale = 255.0 / top
    return np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)


def model_input(img: Image.Image, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """torchvision's Resize(resize, bilinear) + CenterCrop(crop) of an RGB image, as crop x crop x 3 uint8.

    Pillow resamples only the region the crop keeps (`box`), with the filter of the full resize,
    so the pixels are those of resize-then-crop while memory stays crop x crop: a 20000 x 1 image
    would otherwise become a 4,640,000 x 232 intermediate (3 GB).
    """
    w, h = img.size
    new_w, new_h = resized_size(w, h, resize)
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    out = img.resize((crop, crop), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)

