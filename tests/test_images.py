"""Discovery and decoding: what counts as an image file, and how each one becomes RGB pixels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from vecsearch.errors import NotFound, UnreadableImage
from vecsearch.images import MAX_PIXELS, find_images, model_input, open_decoded, open_image, sniff


def test_find_images_by_content_skipping_hidden_and_following_links_without_loops(tmp_path):
    root = tmp_path / "root"
    a = make_image(root / "a.jpg", 1)
    b = make_image(root / "sub" / "b.PNG", 2)
    c = make_image(root / "sub" / "photo.dat", 3, fmt="PNG")  # an image by content
    make_image(root / ".hidden" / "h.jpg", 4)
    make_image(root / "sub" / ".h.png", 5)
    (root / "readme.txt").write_text("hello")
    (root / "fake.jpg").write_text("text named like a photo")  # listed: it fails at decode
    outside = make_image(tmp_path / "elsewhere" / "o.webp", 6, fmt="WEBP")
    (root / "linked").symlink_to(outside.parent)  # a symlinked folder is followed
    (root / "sub" / "loop").symlink_to(root)  # a loop is not
    (root / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    os.mkfifo(root / "pipe.png")  # must not be opened (it would block)
    (root / "dir.jpg").mkdir()  # a folder named like an image is just a folder
    make_image(root / "dir.jpg" / "inner.gif", 7, fmt="GIF")
    found = find_images(root)
    paths = [f.path for f in found.files]
    assert paths == sorted([str(a), str(b), str(c), str(root / "fake.jpg"), str(root / "linked" / "o.webp"),
                            str(root / "dir.jpg" / "inner.gif")])
    assert all(os.path.isabs(p) for p in paths)
    assert found.files[0].size == a.stat().st_size and found.files[0].mtime_ns == a.stat().st_mtime_ns
    assert dict(found.failed) == {str(root / "broken.jpg"): "broken symbolic link",
                                  str(root / "pipe.png"): "not a regular file"}


def test_find_images_relative_folder_gives_absolute_paths_and_clear_errors(tmp_path, monkeypatch):
    make_image(tmp_path / "p" / "x.png", 1)
    monkeypatch.chdir(tmp_path)
    assert [f.path for f in find_images("p").files] == [str(tmp_path / "p" / "x.png")]
    with pytest.raises(NotFound, match="does not exist"):
        find_images(tmp_path / "nope")
    with pytest.raises(Exception, match="is not a folder"):
        find_images(tmp_path / "p" / "x.png")


def test_non_utf8_file_name_is_reported_not_crashed_on(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    name = os.fsencode(root) + b"/caf\xe9.png"
    make_image(Path(os.fsdecode(name)), 1)
    found = find_images(root)
    assert found.files == []
    assert found.failed == [(str(root) + "/caf\\xe9.png", "file name is not valid UTF-8: rename it")]


def test_sniff_recognises_formats_by_their_first_bytes(tmp_path):
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"):
        path = make_image(tmp_path / f"x.{fmt}", 1, (16, 16), fmt=fmt)
        assert sniff(path.read_bytes()[:32]) == fmt
    assert sniff(b"BM but really a text file") is None
    assert sniff(b"") is None


def test_modes_become_8bit_rgb(tmp_path):
    cmyk = open_image(make_image(tmp_path / "cmyk.jpg", 1, mode="CMYK"))
    assert cmyk.mode == "RGB" and cmyk.size == (320, 240)
    # 16-bit greyscale is scaled, not clipped at 255 (Pillow's own convert would make it white).
    ramp = np.linspace(0, 65535, 64 * 48).astype(np.uint16).reshape(48, 64)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    grey = np.asarray(open_image(tmp_path / "g16.png"))
    assert grey.shape == (48, 64, 3) and grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255
    assert 100 < grey[24, 32, 0] < 156
    # Transparent pixels come out white, opaque ones keep their colour.
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))
    rgba.save(tmp_path / "alpha.png")
    pixels = np.asarray(open_image(tmp_path / "alpha.png"))
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[1, 1]) == (255, 0, 0)
    palette = rgba.convert("P")
    palette.save(tmp_path / "palette.png", transparency=palette.getpixel((0, 0)))
    assert tuple(np.asarray(open_image(tmp_path / "palette.png"))[0, 0]) == (255, 255, 255)
    Image.new("LA", (3, 3), (10, 255)).save(tmp_path / "la.png")
    assert tuple(np.asarray(open_image(tmp_path / "la.png"))[1, 1]) == (10, 10, 10)
    Image.new("1", (5, 5), 1).save(tmp_path / "bw.png")
    assert open_image(tmp_path / "bw.png").mode == "RGB"


def test_animation_gives_its_first_frame(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 8), c) for c in colours]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    for name in ("a.gif", "a.webp"):
        assert tuple(np.asarray(open_image(tmp_path / name))[4, 4]) == (255, 0, 0), name


def test_exif_orientation_is_applied(tmp_path):
    original = Image.open(make_image(tmp_path / "o.png", 1, (300, 200))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    original.save(tmp_path / "r.png", exif=exif)
    decoded = open_decoded(tmp_path / "r.png")
    assert (decoded.width, decoded.height) == (200, 300)
    upright = original.transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(upright))


def test_unreadable_files_raise_with_one_line_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    data = make_image(tmp_path / "t.png", 1).read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    # A PNG claiming 20000 x 20000 pixels (a few rows of data): refused before decoding anything.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (60001 * 4))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                                        + chunk(b"IEND", b""))
    expected = {"empty.png": "not an image", "text.jpg": "not an image", "truncated.png": "truncated",
                "bomb.png": f"over the limit of {MAX_PIXELS} pixels", "missing.png": "file not found"}
    for name, fragment in expected.items():
        with pytest.raises(UnreadableImage) as info:
            open_image(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: ") and fragment in message, message
        assert "\n" not in message


def test_jpeg_draft_decodes_big_photos_at_reduced_scale(tmp_path):
    make_image(tmp_path / "big.jpg", 1, (2000, 1500))
    drafted = open_decoded(tmp_path / "big.jpg")
    assert drafted.image.size == (500, 375)  # 1/4: the smallest scale keeping the short side >= 232
    assert (drafted.width, drafted.height) == (2000, 1500)  # the row records the real size
    assert open_image(tmp_path / "big.jpg", draft=None).size == (2000, 1500)
    assert open_image(tmp_path / "big.jpg", draft=1000).size == (2000, 1500)


def test_model_input_equals_torchvision_resize_and_centre_crop(tmp_path):
    from torchvision.transforms import functional as F

    for i, size in enumerate([(320, 240), (240, 320), (1, 1), (7, 900), (900, 7), (232, 232), (513, 347)]):
        img = open_image(make_image(tmp_path / f"{i}.png", i, size))
        reference = F.pil_to_tensor(F.center_crop(F.resize(img, [232]), [224])).permute(1, 2, 0).numpy()
        ours = model_input(img)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
        diff = np.abs(ours.astype(int) - reference.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, (size, diff.max(), diff.mean())


def test_extreme_aspect_ratios_decode_in_bounded_memory(tmp_path):
    """20000 x 1 resized naively to a 232-pixel short side is 4,640,000 x 232 (3.2 GB)."""
    wide = make_image(tmp_path / "wide.png", 1, (20000, 1))
    tall = make_image(tmp_path / "tall.png", 2, (1, 20000))
    code = """
import resource, sys
from PIL import Image
from vecsearch.images import model_input, open_image
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space
for path in sys.argv[1:]:
    assert model_input(open_image(path)).shape == (224, 224, 3)
try:  # the naive way needs more than the limit: the limit is real
    open_image(sys.argv[1]).resize((4_640_000, 232))
except MemoryError:
    print("naive resize: MemoryError")
"""
    result = subprocess.run([sys.executable, "-c", code, str(wide), str(tall)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "naive resize: MemoryError"
