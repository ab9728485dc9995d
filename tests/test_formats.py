"""The photo formats people have: HEIC/HEIF (iPhone), AVIF, camera RAW, beside Pillow's own; made
here with pillow-heif, Pillow and a minimal DNG writer (conftest.make_dng) that libraw reads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import make_dng, make_image
from PIL import Image

from vecsearch import db, formats
from vecsearch.errors import UnreadableImage
from vecsearch.images import find_images, open_decoded
from vecsearch.load import load


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: portrait on screen
    return exif.tobytes()


def _photo(tmp_path, seed: int) -> Image.Image:
    return Image.open(make_image(tmp_path / f"src{seed}.png", seed, (320, 160)))


def test_heic_avif_and_raw_load_with_their_orientation_and_by_content(settings, embedder, tmp_path):
    formats.register_heif()
    folder = tmp_path / "phone"
    folder.mkdir()
    _photo(tmp_path, 1).save(folder / "IMG_0001.HEIC", exif=_rotated_exif())
    _photo(tmp_path, 2).save(folder / "pic.avif", exif=_rotated_exif())
    _photo(tmp_path, 3).save(folder / "renamed.dat", format="HEIF")  # found by content
    make_dng(folder / "DSC_0004.DNG", np.asarray(_photo(tmp_path, 4)), orientation=6)
    make_dng(folder / "DSC_0005.dng", np.asarray(_photo(tmp_path, 5)))
    summary = load(settings, folder, embedder, workers=0)
    assert summary.failed == [] and summary.new == 5, summary.describe()
    with db.connect(settings) as conn:
        rows = {p.rsplit("/", 1)[1]: (f, w, h) for p, f, w, h in
                conn.execute("SELECT path, format, width, height FROM images")}
    assert rows == {"IMG_0001.HEIC": ("HEIF", 160, 320), "pic.avif": ("AVIF", 160, 320),
                    "renamed.dat": ("HEIF", 320, 160), "DSC_0004.DNG": ("DNG", 160, 320),
                    "DSC_0005.dng": ("DNG", 320, 160)}
    # The pixels are the picture: the HEIC's decode is close to the source, rotated.
    decoded = np.asarray(open_decoded(folder / "IMG_0001.HEIC", draft=None).image, dtype=float)
    source = np.asarray(_photo(tmp_path, 1).transpose(Image.Transpose.ROTATE_270), dtype=float)
    assert decoded.shape == source.shape and np.abs(decoded - source).mean() < 12


def test_a_raw_file_claiming_a_huge_size_is_refused_before_unpacking(tmp_path):
    path = make_dng(tmp_path / "claims.dng", np.zeros((16, 16, 3), np.uint8), claim=(20000, 20000))
    with pytest.raises(UnreadableImage, match="decompression bomb\\? a 20000x20000 RAW file needs"):
        open_decoded(path)


def test_missing_optional_decoders_are_a_reason_per_file_not_a_crash(tmp_path):
    folder = tmp_path / "mixed"
    make_image(folder / "fine.png", 1, (32, 32))
    formats.register_heif()
    _photo(tmp_path, 2).save(folder / "phone.heic")
    make_dng(folder / "camera.nef", np.zeros((16, 16, 3), np.uint8))
    code = ("import sys; sys.modules['pillow_heif'] = None; sys.modules['rawpy'] = None\n"
            "from vecsearch.images import find_images, open_decoded\n"
            "from vecsearch.errors import UnreadableImage\n"
            f"for c in find_images({str(folder)!r}).files:\n"
            "    try:\n        open_decoded(c.path); print('ok', c.path)\n"
            "    except UnreadableImage as e:\n        print('skip', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = sorted(out.strip().splitlines())
    assert len(lines) == 3 and lines[0] == f"ok {folder / 'fine.png'}"
    assert lines[1] == f"skip {folder / 'camera.nef'}: a camera RAW file: install rawpy to read it " \
        "(pip install 'vecsearch[raw]')"
    assert lines[2] == f"skip {folder / 'phone.heic'}: a HEIC/HEIF photo: install pillow-heif to read it " \
        "(pip install pillow-heif)"
    assert {c.path for c in find_images(folder).files} == {str(folder / n) for n in
                                                            ("fine.png", "phone.heic", "camera.nef")}
