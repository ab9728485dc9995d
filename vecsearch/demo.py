"""`./dev demo`: a sample folder of real photos, loaded into the embedded database, queried.

The photos are the ones scikit-image ships (astronaut, coffee, chelsea, rocket...), plus a
few perturbed copies so that near-duplicates have something to find.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

from . import db
from .config import Settings

# Perturbed copies made of these originals (file stem -> how).
PERTURBED = {
    "chelsea": "crop",
    "coffee": "blur",
    "astronaut": "mirror",
    "rocket": "jpeg",
}


def sample_folder(dest: Path) -> list[Path]:
    """Copy scikit-image's sample photos (colour and greyscale) into `dest`, plus perturbed copies."""
    import skimage.data

    src = Path(skimage.data.__file__).parent
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(src.iterdir()):
        if path.suffix.lower() not in {".png", ".jpg", ".gif", ".tif"}:
            continue
        target = dest / path.name
        if not target.exists():
            target.write_bytes(path.read_bytes())
        written.append(target)
    for stem, how in PERTURBED.items():
        original = next((p for p in written if p.stem == stem), None)
        if original is None:
            continue
        target = dest / f"{stem}_{how}.jpg"
        if not target.exists():
            _perturb(Image.open(original).convert("RGB"), how).save(target, quality=70)
        written.append(target)
    return written


def _perturb(img: Image.Image, how: str) -> Image.Image:
    w, h = img.size
    if how == "crop":
        return img.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize((w, h))
    if how == "blur":
        return img.filter(ImageFilter.GaussianBlur(2))
    if how == "mirror":
        return ImageOps.mirror(img)
    return img.resize((w // 2, h // 2))  # "jpeg": downscaled and re-encoded at quality 70


def _embedder():
    """The pretrained model if its weights can be had, else the random one, said plainly."""
    import warnings

    from .embed import Embedder, RandomWeightsWarning
    from .errors import WeightsUnavailable

    try:
        return Embedder("default").prepare()
    except WeightsUnavailable as e:
        print(f"pretrained weights could not be downloaded: {e}")
        print("continuing with `--weights random`: an untrained network, so the neighbours below "
              "show the machinery working, not what the pretrained model would find")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            return Embedder("random")


def main() -> int:
    from rich.console import Console

    from . import progress
    from .errors import VecsearchError
    from .load import load

    settings = Settings.from_env()
    folder = settings.home / "demo-images"
    photos = sample_folder(folder)
    print(f"sample folder: {folder} ({len(photos)} images)")

    # -- load: `vecsearch load <folder>` -----------------------------------------------------
    embedder = _embedder()
    random = embedder.record.weights.startswith("random")
    print(f"model: {embedder.record.describe()}" + ("  [RANDOM WEIGHTS]" if random else ""))
    try:
        summary = load(settings, folder, embedder, progress=progress.for_terminal(Console(stderr=True)))
    except VecsearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"loaded: {summary.describe()}")
    with db.connect(settings) as conn:
        for label, value in db.status(conn):
            print(f"{label + ':':<10} {value}")

    # -- neighbours: `vecsearch similar ID` of the photos that have perturbed copies ---------
    from . import output, query

    label = " (random weights: similarity shows the machinery, not semantics)" if random else ""
    first = None
    with db.connect(settings) as conn:
        for stem in PERTURBED:
            row = conn.execute("SELECT id, path FROM images WHERE path = %s",
                               [str(next(p for p in photos if p.stem == stem))]).fetchone()
            if row is None:
                continue
            first = first or row[0]
            neighbours = query.similar(conn, row[0], k=3)
            print(f"\nvecsearch similar {row[0]} -k 3   # {row[1]}{label}")
            output.render(query.rows(neighbours), query.COLUMNS, "table")
    print("\n" + next_steps(first or 1))
    return 0


def next_steps(image_id: int) -> str:
    """The exact commands to type next: `vecsearch` is in this environment's bin folder, which is
    on PATH only once the environment is activated."""
    bin_dir = Path(sys.executable).parent
    found = shutil.which("vecsearch")
    lines = ["next, in this shell:"]
    if found is None or Path(found).parent != bin_dir:
        activate = bin_dir / "activate"
        lines.append(f"  source {activate}" if activate.exists() else f"  export PATH={bin_dir}:$PATH")
    lines += [f"  vecsearch similar {image_id}", "  vecsearch serve          # the web gallery",
              "  vecsearch db psql        # the same tables in SQL"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
