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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import exif, formats
from .errors import InvalidInput, NotFound, UnreadableImage, first_line
from .models import CROP, RESIZE
from .output import check_utf8, display_path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib",
                              ".gif", ".tif", ".tiff"}) | formats.HEIF_EXTENSIONS | formats.RAW_EXTENSIONS
# Pillow's own decompression-bomb threshold, applied to the pixels actually decoded (after JPEG
# draft), so a 100-megapixel JPEG still loads at 1/8 scale while a 20000 x 20000 PNG is refused.
# Pillow itself refuses any header above twice this before decoding anything.
MAX_PIXELS = 89_478_485
# Memory is bounded by bytes, not pixels: what decoding really holds at its peak (decode_budget:
# the file's mode and bit depth, the decoder's own buffers, a progressive JPEG's coefficients,
# the conversion to RGB), computed before decoding. 448 MiB keeps the largest photos of today's
# phones (a 48-megapixel HEIC needs 384 MB) and an 8-bit RGBA image of MAX_PIXELS.
MAX_DECODED_BYTES = 448 * 2**20
# Above this many pixels a picture is box-reduced in bands right after decoding, to the smallest
# size whose short side stays >= the draft size (as a JPEG's draft does inside libjpeg), so that
# converting and orienting it costs a fraction of decoding it. Smaller ones keep today's path.
REDUCE_ABOVE = 16_000_000
# What converting a full-size picture to RGB holds a pixel at most: RGBA (4) + RGB (4) + its alpha
# (1), plus the copy an EXIF rotation makes (4).
_CONVERT_BYTES = 13
# Decoders that fill buffers of their own, copied into Pillow's image afterwards (libwebp's
# canvas and output, libavif's and libheif's planes): decoding holds that many copies at once.
_DECODE_COPIES = {"WEBP": 4, "AVIF": 3, "HEIF": 2}  # measured: 4.0, 2.4 and 1.8
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
    # Folders that could not be listed (or checked): nothing under them is known to be gone.
    unlisted: list[str] = field(default_factory=list)


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
    return formats.sniff(head)


def _sniff_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return sniff(f.read(32)) is not None
    except OSError:
        return False


def find_images(folder: str | os.PathLike) -> Found:
    """Every image file under `folder`, recursively, sorted by absolute path.

    Images are recognised by extension or, failing that, by content (a PNG named `.dat` counts;
    a text file named `.jpg` is listed too and fails at decode with a reason). Hidden files and
    directories are skipped; symbolic links are followed, each directory visited once (no loops).
    Entries that look like images but cannot be used (broken link, FIFO, non-UTF-8 name) are
    reported in `failed` instead.
    """
    root = check_utf8(os.path.abspath(os.fspath(folder)))
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
            found.unlisted.append(directory)
            continue
        subdirs = [entry.path for entry in entries if not entry.name.startswith(".")
                   and _classify(entry, found) == "folder"]
        stack.extend(reversed(subdirs))
    found.files.sort(key=lambda c: c.path)
    return found


def find_some(root: str | os.PathLike, paths: Iterable[str]) -> Found:
    """What `find_images(root)` would find at `paths` only (files, or folders walked whole).

    For `vecsearch load --watch`, which knows which paths changed: each file's folder is listed
    once (so `_classify` sees the same entries as a walk), never the whole tree. Paths outside
    `root`, under a hidden name, or gone are left out (gone ones are for the prune to check).
    """
    root = os.path.abspath(os.fspath(root))
    found, by_folder = Found(), {}
    for path in sorted(set(map(os.path.abspath, paths))):
        relative = os.path.relpath(path, root)
        if relative == os.curdir:
            return find_images(root)
        if relative.startswith(os.pardir) or any(p.startswith(".") for p in relative.split(os.sep)):
            continue
        if os.path.isdir(path):
            if display_path(path) == path:
                sub = find_images(path)
                found.files += sub.files
                found.failed += sub.failed
                found.unlisted += sub.unlisted
        else:
            by_folder.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
    for folder, names in by_folder.items():
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if e.name in names]
        except OSError as e:
            if not isinstance(e, FileNotFoundError | NotADirectoryError):
                found.unlisted.append(folder)
            continue
        for entry in entries:
            if _classify(entry, found) == "folder":  # became a folder since the event
                sub = find_images(entry.path)
                found.files += sub.files
                found.failed += sub.failed
                found.unlisted += sub.unlisted
    unique = {c.path: c for c in found.files}
    found.files = sorted(unique.values(), key=lambda c: c.path)
    return found


def _classify(entry: os.DirEntry, found: Found) -> str | None:
    """"folder" for a folder to descend into; an image file goes into `found.files`, an unusable
    one that looks like an image into `found.failed`; anything else is ignored."""
    path = entry.path
    looks_like_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
    try:
        st = entry.stat()  # follows symbolic links
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ELOOP):  # perhaps a folder we could not look into
            found.unlisted.append(path)
        if looks_like_image:
            reason = ("symbolic link loop" if e.errno == errno.ELOOP
                      else "broken symbolic link" if entry.is_symlink() else (e.strerror or str(e)))
            found.failed.append((display_path(path), reason))
        return None
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if not stat.S_ISREG(st.st_mode):
        if looks_like_image:
            found.failed.append((display_path(path), "not a regular file"))
        return None
    if not (looks_like_image or _sniff_file(path)):
        return None
    if display_path(path) != path:
        found.failed.append((display_path(path), "file name is not valid UTF-8: rename it"))
    elif len(path.encode()) > MAX_PATH_BYTES:
        found.failed.append((path, f"path is {len(path.encode())} bytes long, more than the "
                                   f"{MAX_PATH_BYTES} vecsearch can index: move it higher up"))
    else:
        found.files.append(Candidate(path, st.st_size, st.st_mtime_ns))
    return None


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
    """A decoded file: RGB pixels (maybe at JPEG draft scale), the file's own pixel size, and
    its photo metadata (read from the same open file: vecsearch/exif.py)."""

    image: Image.Image
    format: str
    width: int  # full resolution, as displayed (EXIF orientation applied)
    height: int
    metadata: exif.PhotoMetadata = exif.NONE


def open_image(source: str | os.PathLike | BinaryIO, *, draft: int | None = RESIZE,
               name: str | None = None) -> Image.Image:
    """Decode an image file into an RGB Pillow image, the same way everywhere.

    First frame of animations; EXIF orientation applied; palette, alpha (over white), CMYK,
    greyscale and 16-bit modes converted to 8-bit RGB; HEIC, AVIF and camera RAW too
    (vecsearch/formats.py). `draft`: a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale
    whose short side stays >= `draft` pixels, a RAW file at half size likewise (None: full size).
    `name`: the file's name, for bytes given without one (RAW formats are told by extension).
    Raises UnreadableImage with a one-line reason.
    """
    return open_decoded(source, draft=draft, name=name).image


def open_decoded(source: str | os.PathLike | BinaryIO, *, draft: int | None = RESIZE,
                 name: str | None = None) -> Decoded:
    """open_image, plus the format, full pixel size and photo metadata (for the images row)."""
    own = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
    if not isinstance(own, str):  # bytes in memory (the gallery's threads: no warnings juggling there)
        return _decode(source, draft, name)
    path = display_path(own)
    try:
        with warnings.catch_warnings(record=True) as caught:  # Pillow's "Corrupt EXIF data"...
            warnings.simplefilter("always")
            decoded = _decode(source, draft, name or own)
    except UnreadableImage as e:
        if not isinstance(source, (str, os.PathLike)):
            raise  # the caller has its file object's name (the load's `skipped PATH: reason`)
        raise UnreadableImage(f"{path}: {e}") from e.__cause__
    for w in caught:  # again, naming the file they are about
        warnings.warn(f"{path}: {w.message}", stacklevel=2)
    return decoded


def read_metadata(f: BinaryIO, name: str) -> exif.PhotoMetadata:
    """The photo metadata of an open image file, its pixels left undecoded (for files whose row
    is current but whose metadata is not: `vecsearch load --reread-metadata`). UnreadableImage
    for a file that is not an image Pillow (or rawpy) can open."""
    head = _head(f)
    if formats.is_raw(name, head):
        return formats.raw_metadata(f.read())
    formats.register_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on odd EXIF: exif.read says what counts
            with Image.open(f) as img:
                return exif.read(img)
    except Exception as e:
        raise UnreadableImage(f"cannot read its metadata ({first_line(e)})") from e


def _decode(source: str | os.PathLike | BinaryIO, draft: int | None, name: str | None) -> Decoded:
    head = _head(source)
    if formats.is_raw(name if isinstance(name, str) else None, head):
        rgb, width, height, metadata = formats.decode_raw(source, draft, MAX_PIXELS, MAX_DECODED_BYTES)
        ext = os.path.splitext(name or "")[1].lstrip(".").upper()
        return Decoded(Image.fromarray(rgb, "RGB"), ext or formats.sniff(head) or "RAW", width, height,
                       metadata)
    formats.register_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        with img:
            fmt, (width, height) = img.format or "unknown", img.size
            full_size = img.size
            metadata = exif.read(img)  # the headers only, before any pixel is decoded
            if draft and img.format == "JPEG":
                img.draft(None, resized_size(*img.size, draft))
            _check_decode_memory(img, full_size, draft)  # before the orientation: a PNG's loads it
            if _orientation(img) in (5, 6, 7, 8):
                width, height = height, width
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise Image.DecompressionBombError(f"Image size ({w * h} pixels)")
            img.load()
            missing = _jpeg_truncated(source, img, full_size) if img.format == "JPEG" else None
            if missing:
                raise UnreadableImage(f"truncated file ({missing})")
            return Decoded(_to_rgb(_oriented(_reduced(img, draft))), fmt, width, height, metadata)
    except UnreadableImage:
        raise
    except FileNotFoundError as e:
        raise UnreadableImage("file not found") from e
    except Image.DecompressionBombError as e:
        raise UnreadableImage(
            f"decompression bomb? {_pixels(e)} is over the limit of {MAX_PIXELS} pixels") from e
    except UnidentifiedImageError as e:
        missing = formats.missing_decoder(head)
        if missing:
            raise UnreadableImage(missing) from e
        fmt = sniff(head)
        claimed = formats.claimed_size(_head(source, 1 << 16)) if fmt in ("AVIF", "HEIF") else None
        if claimed and claimed[0] * claimed[1] > MAX_PIXELS:  # libavif/libheif refuse it before Pillow
            w, h = claimed
            raise UnreadableImage(f"decompression bomb? {w * h} pixels ({w}x{h}) is over the limit of "
                                  f"{MAX_PIXELS} pixels") from e
        if fmt:
            article = "an" if fmt[0] in "AEIOU" else "a"
            raise UnreadableImage(f"{article} {fmt} file of a kind Pillow cannot decode") from e
        raise UnreadableImage("not an image (no image format recognised in its content)") from e
    except MemoryError as e:
        raise UnreadableImage("out of memory while decoding") from e
    except Exception as e:  # Pillow raises many types on corrupt data (OSError, ValueError, SyntaxError...)
        message = first_line(e)
        if isinstance(e, OSError) and "truncated" in message:
            raise UnreadableImage(f"truncated file ({message})") from e
        raise UnreadableImage(f"cannot decode ({message})") from e


def _bytes_per_pixel(mode: str) -> int:
    return 2 if mode.startswith("I;16") else 1 if mode in ("1", "L", "P") else 4


def decode_budget(img: Image.Image, full_size: tuple[int, int], draft: int | None) -> int:
    """The bytes decoding `img` holds at its peak, from its size, bands and bytes per band alone:
    the decoder's buffers, then the conversion to RGB (of the reduced picture above REDUCE_ABOVE).

    `img.size` is what will be decoded (a JPEG's draft scale), `full_size` the file's own.
    """
    w, h = img.size
    need = w * h * _bytes_per_pixel(img.mode) * _DECODE_COPIES.get(img.format or "", 1)
    if img.format == "JPEG" and ("progressive" in img.info or "progression" in img.info):
        # libjpeg buffers every DCT coefficient (2 bytes) of a progressive image at full size.
        need = max(need, _jpeg_blocks(img, full_size) * 64 * 2)
    factor = _reduce_factor(img.size, draft)
    rw, rh = -(-w // factor), -(-h // factor)
    return need + rw * rh * _CONVERT_BYTES + (_BAND_BYTES * 2 if factor > 1 else 0)


def _check_decode_memory(img: Image.Image, full_size: tuple[int, int], draft: int | None) -> None:
    """Refuse, before decoding, a file whose decoding would allocate over MAX_DECODED_BYTES."""
    need = decode_budget(img, full_size, draft)
    w, h = full_size
    if need > MAX_DECODED_BYTES:
        raise UnreadableImage(f"decompression bomb? decoding this {w}x{h} {img.format or ''} {img.mode} "
                              f"image needs {need / 2**20:.0f} MB, over the limit of "
                              f"{MAX_DECODED_BYTES / 2**20:.0f} MB")


_BAND_BYTES = 1 << 23  # a band of rows reduced at a time (held twice: as read, as converted)


def _reduce_factor(size: tuple[int, int], draft: int | None) -> int:
    w, h = size
    return max(1, min(w, h) // draft) if draft and w * h > REDUCE_ABOVE else 1


def _reduced(img: Image.Image, draft: int | None) -> Image.Image:
    """`img` box-reduced by _reduce_factor, band by band (each band converted to a mode reduce()
    takes first), so no full-size copy is ever made; `img` itself if it is not reduced."""
    factor = _reduce_factor(img.size, draft)
    if factor == 1:
        return img
    w, h = img.size
    rows = factor * max(1, _BAND_BYTES // (w * 4 * factor))
    scale = _grey_scale(img) if img.mode.startswith("I;16") else None
    out = None
    for top in range(0, h, rows):
        band = img.crop((0, top, w, min(h, top + rows)))
        if scale is not None:
            band = Image.fromarray(_to_uint8(np.asarray(band), scale), "L")
        elif band.mode == "P":
            band = band.convert("RGBA" if "transparency" in img.info else "RGB")
        elif band.mode == "1":
            band = band.convert("L")
        band = band.reduce(factor)
        if out is None:
            out = Image.new(band.mode, (-(-w // factor), -(-h // factor)))
        out.paste(band, (0, top // factor))
    out.info = dict(img.info)
    exif = img.getexif()  # the orientation, which a TIFF keeps in its tags rather than in info
    if exif:
        out.getexif().update(exif)
    return out


def _jpeg_truncated(source: str | os.PathLike | BinaryIO, img: Image.Image,
                    full_size: tuple[int, int]) -> str | None:
    """Data missing from a JPEG, which libjpeg pads with grey and Pillow does not report: no
    end-of-image marker after the first scan (0xFFD9 cannot occur inside entropy-coded data), or
    fewer bytes than its blocks need (Huffman coding spends at least one bit a block, so a 569-byte
    file cannot hold a 13000 x 13000 picture)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                data = f.read()
        else:
            position = source.tell()
            source.seek(0)
            data = source.read()
            source.seek(position)
    except (OSError, ValueError):
        return None
    scan = data.find(b"\xff\xda")
    if scan >= 0 and data.find(b"\xff\xd9", scan) < 0:
        return "the JPEG data ends before its end-of-image marker"
    if _jpeg_frame_marker(data) not in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7):
        return None  # arithmetic coding can spend less than a bit a block
    if len(data) * 8 < _jpeg_blocks(img, full_size):
        return f"{len(data)} bytes cannot hold a {full_size[0]}x{full_size[1]} JPEG"
    return None


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The SOFn marker of the frame, found by walking the segments (not inside an EXIF thumbnail)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _jpeg_layers(img: Image.Image) -> list[tuple]:
    return getattr(img, "layer", None) or [("", 1, 1, 0)] * len(img.getbands())


def _jpeg_blocks(img: Image.Image, full_size: tuple[int, int], size: int = 8) -> int:
    """8 x 8 blocks of every component at full size (chroma subsampled as the file says)."""
    w, h = full_size
    layers = _jpeg_layers(img)
    hmax, vmax = max(la[1] for la in layers), max(la[2] for la in layers)
    return sum(-(-w * la[1] // hmax // size) * -(-h * la[2] // vmax // size) for la in layers)


def _head(source: str | os.PathLike | BinaryIO, size: int = 32) -> bytes:
    """The first `size` bytes of a file (a file object is left where it was)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read(size)
        position = source.tell()
        head = source.read(size)
        source.seek(position)
        return head
    except (OSError, ValueError):
        return b""


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
        return Image.fromarray(_to_uint8(np.asarray(img), _grey_scale(img)), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, HSV


def _grey_scale(img: Image.Image) -> float:
    """The factor that maps a 16-bit, 32-bit or float greyscale image's values to 0..255."""
    low_high = img.getextrema()
    top = float(max(0, low_high[1]) if low_high else 0)
    if top <= 1.0 and img.mode == "F":
        return 255.0
    if top <= 255:
        return 1.0
    if top <= 65535:
        return 1 / 257
    return 255.0 / top


def _to_uint8(a: np.ndarray, scale: float) -> np.ndarray:
    """16-bit, 32-bit and float greyscale scaled to 0..255 by `scale` (Pillow's own convert clips
    at 255). In bands of rows, so the extra memory is one byte a pixel plus a small float buffer."""
    out = np.empty(a.shape, dtype=np.uint8)
    rows = max(1, (1 << 22) // max(1, a.shape[1] if a.ndim > 1 else 1))
    for start in range(0, a.shape[0], rows):
        band = a[start:start + rows].astype(np.float32) * scale + 0.5
        np.clip(band, 0, 255, out=band)
        out[start:start + rows] = band
    return out


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

