"""Photo formats beyond Pillow's built-in ones: HEIC/HEIF (iPhone libraries, through pillow-heif),
AVIF (Pillow's own plugin) and camera RAW (rawpy, an optional extra: pip install 'vecsearch[raw]').

Recognised by content where the format says so in its first bytes, else by extension (the RAW
formats that are TIFF inside, DNG, CR2, NEF, ARW..., would otherwise open as a TIFF thumbnail).
RAW decoding has the same limits as the rest: the pixel count and the bytes the decoder holds
are checked from the file's header before anything is unpacked.
"""

from __future__ import annotations

import functools
import io
import os
from typing import BinaryIO

import numpy as np

from . import exif
from .errors import UnreadableImage

HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif", ".avif"})
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf",
                            ".orf", ".rw2", ".rwl", ".pef", ".srw", ".x3f", ".erf", ".kdc", ".mrw", ".3fr",
                            ".iiq", ".mef", ".mos"})
# ISO base media file brands (bytes 8-12, after "ftyp")
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


def sniff(head: bytes) -> str | None:
    """HEIF, AVIF or a RAW format named by a file's first bytes, or None."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return ("AVIF" if brand in _AVIF_BRANDS else "HEIF" if brand in _HEIF_BRANDS
                else "CR3" if brand == b"crx " else None)
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return "RAF"
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR"):
        return "ORF"
    if head[:4] == b"IIU\x00":
        return "RW2"
    return None


def is_raw(name: str | None, head: bytes) -> bool:
    ext = os.path.splitext(name or "")[1].lower()
    return ext in RAW_EXTENSIONS or sniff(head) in ("CR3", "RAF", "ORF", "RW2")


@functools.cache
def register_heif() -> bool:
    """Teach Pillow HEIC/HEIF (once); False when pillow-heif is not installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def claimed_size(start: bytes) -> tuple[int, int] | None:
    """The picture size a HEIF/AVIF file's `ispe` property claims (its first one), or None."""
    at = start.find(b"ispe")
    if at < 0 or len(start) < at + 16:
        return None
    return int.from_bytes(start[at + 8:at + 12], "big"), int.from_bytes(start[at + 12:at + 16], "big")


def missing_decoder(head: bytes) -> str | None:
    """The reason a file Pillow could not open is unreadable here, if a decoder is missing."""
    if sniff(head) == "HEIF" and not register_heif():
        return "a HEIC/HEIF photo: install pillow-heif to read it (pip install pillow-heif)"
    return None


def decode_raw(source: str | os.PathLike | BinaryIO, draft: int | None, max_pixels: int,
               max_bytes: int) -> tuple[np.ndarray, int, int, exif.PhotoMetadata]:
    """A camera RAW file as 8-bit RGB (camera white balance, orientation applied), its full
    size as displayed, and its photo metadata (from the bytes already read: the TIFF tags most RAW
    formats are made of, else the EXIF of the embedded JPEG preview). At half size when that
    keeps the short side >= `draft` (faster, less memory: the model and thumbnails need no more)."""
    try:
        import rawpy
    except ImportError:
        raise UnreadableImage("a camera RAW file: install rawpy to read it "
                              "(pip install 'vecsearch[raw]')") from None
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            data = f.read()
    else:
        source.seek(0)
        data = source.read()
    raw = rawpy.RawPy()
    try:
        raw.open_buffer(io.BytesIO(data))
        sizes = raw.sizes
        pixels = sizes.iwidth * sizes.iheight
        # unpack() holds the raw mosaic (2 bytes a photosite), postprocess() 8-bit RGB on top
        need = sizes.raw_width * sizes.raw_height * 2 + pixels * 3
        if pixels > max_pixels or need > max_bytes:
            raise UnreadableImage(f"decompression bomb? a {sizes.width}x{sizes.height} RAW file needs "
                                  f"{need / 2**20:.0f} MB to decode, over the limit of "
                                  f"{max_bytes / 2**20:.0f} MB")
        metadata = exif.read_raw(data, lambda: _jpeg_preview(raw, rawpy))
        raw.unpack()
        half = bool(draft) and min(sizes.width, sizes.height) // 2 >= draft
        rgb = raw.postprocess(use_camera_wb=True, output_bps=8, half_size=half)
    except rawpy.LibRawError as e:
        raise UnreadableImage(f"cannot decode the RAW file ({type(e).__name__}: {e})") from e
    finally:
        raw.close()
    width, height = (sizes.height, sizes.width) if sizes.flip in (5, 6) else (sizes.width, sizes.height)
    return rgb, width, height, metadata


def raw_metadata(data: bytes) -> exif.PhotoMetadata:
    """A RAW file's photo metadata without decoding it (`vecsearch load --reread-metadata`)."""

    def preview() -> bytes | None:
        try:
            import rawpy
        except ImportError:
            return None
        raw = rawpy.RawPy()
        try:
            raw.open_buffer(io.BytesIO(data))
            return _jpeg_preview(raw, rawpy)
        except rawpy.LibRawError:
            return None
        finally:
            raw.close()

    return exif.read_raw(data, preview)


def _jpeg_preview(raw, rawpy) -> bytes | None:
    """The RAW file's embedded JPEG preview, if it has one (cameras copy their EXIF into it)."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawError, MemoryError):
        return None
    if thumb.format != rawpy.ThumbFormat.JPEG or len(thumb.data) > 64 * 2**20:
        return None
    return bytes(thumb.data)
