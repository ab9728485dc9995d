"""Photo metadata from EXIF: when a photo was taken, with what camera and lens, where, and how it
is oriented; the columns migration 0009 adds to `images`.

Pure: an already-open Pillow image (or a RAW file's bytes) in, a PhotoMetadata out, no file of
its own opened. The decode worker calls it on the image it is decoding anyway (images.py), so
metadata costs no second read of the file. Everything is checked, because EXIF is whatever the
file says: a value of the wrong type, out of range (a year 9999, a latitude of 500), unprintable
or too long, or a block over MAX_BLOCK_BYTES is NULL and one warning line, never a failed file.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from PIL import Image

# Which reading of the EXIF a row's metadata columns hold (images.metadata_version): rows of an
# older one (or none: loaded before migration 0009) are read again by the next load.
VERSION = 1
# An EXIF block larger than this is ignored whole (a JPEG's cannot exceed 64 KiB; PNG, WebP, HEIC
# and AVIF blocks can be anything). A string field longer than MAX_TEXT is NULL.
MAX_BLOCK_BYTES = 256 * 1024
MAX_TEXT = 128
# Dates outside [FIRST_YEAR, now + 1 day] are clock errors or forgeries (photography began 1826).
FIRST_YEAR = 1826
# UTC offsets that exist (-12:00 .. +14:00).
MAX_OFFSET = timedelta(hours=14)

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKE, MODEL, ORIENTATION = 0x010F, 0x0110, 0x0112
DATETIME_ORIGINAL, DATETIME_DIGITIZED = 0x9003, 0x9004
OFFSET_TIME, OFFSET_TIME_ORIGINAL, OFFSET_TIME_DIGITIZED = 0x9010, 0x9011, 0x9012
SUBSEC_ORIGINAL, SUBSEC_DIGITIZED = 0x9291, 0x9292
LENS_MODEL = 0xA434
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON = 1, 2, 3, 4

_DATETIME = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})")
# What cameras write for "no date": blanks, zeros and separators only.
_NO_DATE = re.compile(r"[\s0:.\-T]*")


@dataclass(frozen=True)
class PhotoMetadata:
    """The metadata columns of one image; None where the file says nothing usable.

    taken_at: the local wall-clock time the photo was taken (DateTimeOriginal, else
    DateTimeDigitized), as the camera showed it; taken_offset: its UTC offset where the file
    records one (OffsetTimeOriginal...), so UTC is taken_at - taken_offset.
    warnings: why values the file had were dropped (one line each, for the load's report).
    """

    taken_at: datetime | None = None
    taken_offset: timedelta | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    gps_latitude: float | None = None
    gps_longitude: float | None = None
    orientation: int | None = None
    warnings: tuple[str, ...] = ()

    def values(self) -> list[Any]:
        """The values of COLUMNS, in order."""
        return [getattr(self, c) for c in COLUMNS]


COLUMNS = tuple(f.name for f in fields(PhotoMetadata) if f.name != "warnings")
COPY_TYPES = ("timestamp", "interval", "text", "text", "text", "float8", "float8", "int2")
NONE = PhotoMetadata()


def read(img: Image.Image, *, now: datetime | None = None) -> PhotoMetadata:
    """The metadata of an open Pillow image (its EXIF is parsed, no pixels are decoded)."""
    block = img.info.get("exif")
    if isinstance(block, (bytes, bytearray)) and len(block) > MAX_BLOCK_BYTES:
        return PhotoMetadata(warnings=(f"EXIF block of {len(block)} bytes, over the limit of "
                                       f"{MAX_BLOCK_BYTES}: metadata ignored",))
    try:
        exif = img.getexif()
    except Exception as e:  # Pillow raises many types on a corrupt block
        return PhotoMetadata(warnings=(f"unreadable EXIF ({type(e).__name__}): metadata ignored",))
    return from_exif(exif, now=now)


def read_raw(data: bytes, thumbnail: Callable[[], bytes | None] | None = None, *,
             now: datetime | None = None) -> PhotoMetadata:
    """The metadata of a camera RAW file from its bytes (already in memory for decoding): the TIFF
    tags most RAW formats are made of (DNG, NEF, CR2, ARW...), else the EXIF of the embedded JPEG
    preview `thumbnail()` returns, else nothing."""
    if data[:4] in _TIFF_HEADERS:
        exif = Image.Exif()
        try:
            exif.load(data)  # the IFDs only, parsed from the bytes in memory
        except Exception:
            pass
        else:
            found = from_exif(exif, now=now)
            if found != NONE:
                return found
    try:
        preview = thumbnail() if thumbnail is not None else None
        if preview:
            with Image.open(io.BytesIO(preview)) as img:  # headers only: no pixels are decoded
                return read(img, now=now)
    except Exception:
        pass
    return NONE


_TIFF_HEADERS = (b"II*\x00", b"MM\x00*")


def from_exif(exif: Image.Exif, *, now: datetime | None = None) -> PhotoMetadata:
    """The checked fields of a parsed EXIF block."""
    warnings: list[str] = []
    main = _ifd(exif, EXIF_IFD, warnings)
    gps = _ifd(exif, GPS_IFD, warnings)
    found = PhotoMetadata(
        camera_make=_text(exif, MAKE, "Make", warnings),
        camera_model=_text(exif, MODEL, "Model", warnings),
        lens=_text(main, LENS_MODEL, "LensModel", warnings),
        orientation=_orientation(exif, warnings),
    )
    taken_at, offset = _taken(main, exif, warnings, now or datetime.now(UTC))
    latitude, longitude = _gps(gps, warnings)
    return replace(found, taken_at=taken_at, taken_offset=offset, gps_latitude=latitude,
                   gps_longitude=longitude, warnings=tuple(warnings))


def _ifd(exif: Image.Exif, tag: int, warnings: list[str]) -> dict:
    try:
        ifd = exif.get_ifd(tag)
    except Exception as e:
        warnings.append(f"unreadable EXIF {'GPS' if tag == GPS_IFD else 'Exif'} block "
                        f"({type(e).__name__}): ignored")
        return {}
    return ifd if isinstance(ifd, dict) else {}


def _text(ifd: Any, tag: int, name: str, warnings: list[str]) -> str | None:
    value = ifd.get(tag)
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):  # stored as UNDEFINED: text only if it is ASCII
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            warnings.append(f"EXIF {name} is not text: ignored")
            return None
    if not isinstance(value, str):
        warnings.append(f"EXIF {name} is a {type(value).__name__}, not text: ignored")
        return None
    try:  # Pillow decodes EXIF text as latin-1; cameras and phones write UTF-8
        value = value.encode("latin-1").decode("utf-8")
    except UnicodeEncodeError:
        pass  # not from latin-1 bytes: already text
    except UnicodeDecodeError:
        warnings.append(f"EXIF {name} is not UTF-8 text: ignored")
        return None
    value = value.strip("\x00 \t\r\n")
    if not value:
        return None
    if len(value) > MAX_TEXT:
        warnings.append(f"EXIF {name} is {len(value)} characters long, over {MAX_TEXT}: ignored")
        return None
    if not value.isprintable():
        warnings.append(f"EXIF {name} holds control characters: ignored")
        return None
    return value


def _orientation(exif: Any, warnings: list[str]) -> int | None:
    value = exif.get(ORIENTATION)
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        warnings.append(f"EXIF Orientation {_shown(value)} is not 1..8: ignored")
        return None
    return value


def _taken(main: dict, ifd0: Any, warnings: list[str], now: datetime
           ) -> tuple[datetime | None, timedelta | None]:
    for tag, subsec, offset_tag, name in (
            (DATETIME_ORIGINAL, SUBSEC_ORIGINAL, OFFSET_TIME_ORIGINAL, "DateTimeOriginal"),
            (DATETIME_DIGITIZED, SUBSEC_DIGITIZED, OFFSET_TIME_DIGITIZED, "DateTimeDigitized")):
        value = main.get(tag)
        if value is None:
            continue
        taken = _datetime(value, name, warnings, now)
        if taken is None:
            return None, None
        fraction = main.get(subsec)
        if isinstance(fraction, str) and fraction.strip("\x00 ").isdigit():
            digits = fraction.strip("\x00 ")[:6].ljust(6, "0")
            taken = taken.replace(microsecond=int(digits))
        offset_value = main.get(offset_tag, main.get(OFFSET_TIME))
        offset = None if offset_value is None else _offset(offset_value, warnings)
        if offset is not None and taken - offset > _utc(now) + timedelta(days=1):
            warnings.append(f"EXIF {name} {taken.isoformat()} is in the future: ignored")
            return None, None
        return taken, offset
    return None, None


def _datetime(value: Any, name: str, warnings: list[str], now: datetime) -> datetime | None:
    if not isinstance(value, str):
        warnings.append(f"EXIF {name} is a {type(value).__name__}, not a date: ignored")
        return None
    text = value.strip("\x00 ")
    if _NO_DATE.fullmatch(text):
        return None  # what cameras write when their clock was never set
    found = _DATETIME.match(text)
    if found is None:
        warnings.append(f"EXIF {name} {_shown(text)} is not a date: ignored")
        return None
    try:
        taken = datetime(*map(int, found.groups()))
    except ValueError:
        warnings.append(f"EXIF {name} {_shown(text)} is not a date: ignored")
        return None
    # now + 1 day in any zone: a naive local time up to 14 hours ahead of UTC is still the present
    latest = _utc(now) + timedelta(days=1) + MAX_OFFSET
    if taken.year < FIRST_YEAR or taken > latest:
        warnings.append(f"EXIF {name} {text} is outside {FIRST_YEAR}..now: ignored")
        return None
    return taken


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def _offset(value: Any, warnings: list[str]) -> timedelta | None:
    text = value.strip("\x00 ") if isinstance(value, str) else None
    if not text:
        if text is None:
            warnings.append(f"EXIF OffsetTime is a {type(value).__name__}, not text: ignored")
        return None
    found = _OFFSET.fullmatch(text)
    if found is None or int(found.group(3)) >= 60:
        if not _NO_DATE.fullmatch(text):
            warnings.append(f"EXIF OffsetTime {_shown(text)} is not +HH:MM: ignored")
        return None
    sign, hours, minutes = found.groups()
    offset = timedelta(hours=int(hours), minutes=int(minutes)) * (-1 if sign == "-" else 1)
    if not -timedelta(hours=12) <= offset <= MAX_OFFSET:
        warnings.append(f"EXIF OffsetTime {text} is not a UTC offset: ignored")
        return None
    return offset


def _gps(gps: dict, warnings: list[str]) -> tuple[float | None, float | None]:
    if GPS_LAT not in gps and GPS_LON not in gps:
        return None, None
    latitude = _degrees(gps.get(GPS_LAT), gps.get(GPS_LAT_REF), "NS", 90.0)
    longitude = _degrees(gps.get(GPS_LON), gps.get(GPS_LON_REF), "EW", 180.0)
    if latitude is None or longitude is None:
        warnings.append(f"EXIF GPS position {_shown(gps.get(GPS_LAT))}, {_shown(gps.get(GPS_LON))} "
                        "is not a position on Earth: ignored")
        return None, None
    return latitude, longitude


def _degrees(value: Any, ref: Any, refs: str, limit: float) -> float | None:
    """Degrees, minutes, seconds (rationals) and a hemisphere letter -> signed decimal degrees."""
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        return None
    try:
        parts = [float(v) for v in value]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not all(math.isfinite(p) and p >= 0 for p in parts) or any(p >= 60 for p in parts[1:]):
        return None
    degrees = sum(p / 60 ** n for n, p in enumerate(parts))
    if isinstance(ref, (bytes, bytearray)):
        ref = bytes(ref).decode("ascii", "replace")
    ref = ref.strip("\x00 ").upper() if isinstance(ref, str) else ""
    if ref not in ("", *refs) or degrees > limit:
        return None
    return -degrees if ref == refs[1] else degrees


def _shown(value: Any) -> str:
    """A value as a warning quotes it: printable and short (it came from a hostile file, perhaps)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
