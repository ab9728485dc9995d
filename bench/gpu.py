"""vecsearch's embedding on a GPU, prepared to run on a lent machine in under 8 minutes.

    python3 bench/gpu.py [--quick] [--seconds 4] [--images 512] [--out results.json]

Needs torch, torchvision, numpy, Pillow (what the lent machine has); no database and no network.
Prints, side by side, and writes as JSON:
  1. the bare ResNet50 forward (vecsearch's own Embedder network, random weights: same cost) at
     batch 64 / 128 / 256 in fp32, bf16 and fp16 autocast, img/s, and each one's worst cosine to
     fp32 on the same batch;
  2. what `--precision auto` keeps there (vecsearch.engine's first-batch check);
  3. decoding generated 1024x768 JPEGs: vecsearch's CPU decode (images.open_image + model_input)
     in N worker processes, and torchvision.io.decode_jpeg on the GPU (batched), img/s;
  4. the pipeline up to the database writer: embed.map_batches decode workers feeding the
     Embedder (auto precision, the device's batch size), img/s, and what limited it.
The database writer's own rate is bench/load.py's (it needs PostgreSQL, which the lent machine
does not carry). --quick shrinks everything for a smoke run on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _embedder(batch_size: int | None = None, precision: str = "fp32"):
    from vecsearch.embed import Embedder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Embedder("random", batch_size=batch_size, precision=precision).prepare()


def _rate(fn, n_per_call: int, seconds: float, sync) -> float:
    fn()  # warm-up (kernel selection, autotuning)
    sync()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    sync()
    return calls * n_per_call / (time.perf_counter() - started)


def forward_table(batches: list[int], seconds: float) -> list[dict]:
    import torch

    embedder = _embedder()
    device = torch.device(embedder.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            reference = embedder._forward(x, "fp32")
            for precision in ("fp32", "bf16", "fp16"):
                try:
                    vectors = embedder._forward(x, precision)
                    rate = _rate(lambda p=precision, x=x: embedder._forward(x, p), batch, seconds, sync)
                    cosine = float((reference * vectors).sum(dim=1).min())
                except RuntimeError as e:
                    rate, cosine = None, str(e).splitlines()[0][:80]
                rows.append({"batch": batch, "precision": precision, "img_s": rate, "min_cosine": cosine})
                shown = f"{rate:.0f} img/s" if rate else "n/a"
                print(f"  forward batch {batch:>4} {precision}: {shown}, min cosine {cosine}",
                      file=sys.stderr)
    return rows


def auto_choice(batch: int) -> str:
    import numpy as np

    embedder = _embedder(batch_size=batch, precision="auto")
    embedder.embed_arrays(np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), np.uint8))
    return embedder.choice.describe()


def make_jpegs(folder: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        yy, xx = np.mgrid[0:768, 0:1024]
        base = np.stack([(np.sin(xx / (7 + i % 13)) * 127 + 128), (np.cos(yy / (9 + i % 7)) * 127 + 128),
                         ((xx + yy) * (i % 5 + 1)) % 256], axis=-1).astype(np.uint8)
        img = Image.fromarray(base, "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x0, y0 = int(rng.integers(0, 900)), int(rng.integers(0, 650))
            draw.ellipse([x0, y0, x0 + 120, y0 + 100], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


def _decode_one(path: str):
    from vecsearch.images import model_input, open_image

    return model_input(open_image(path))


def cpu_decode(paths: list[str], workers: int, batch: int) -> float:
    from vecsearch.embed import map_batches

    started = time.perf_counter()
    for _ in map_batches(_decode_one, paths, batch_size=batch, workers=workers):
        pass
    return len(paths) / (time.perf_counter() - started)


def gpu_decode(paths: list[str], batch: int) -> float | str:
    import torch
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2.functional import center_crop, resize

    if not torch.cuda.is_available():
        return "no CUDA device"
    data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(data), batch):
        images = decode_jpeg(data[start:start + batch], device="cuda")
        torch.stack([center_crop(resize(img, [232], antialias=True), [224]) for img in images])
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - started)


def pipeline(paths: list[str], workers: int) -> dict:
    """Decode workers feeding the Embedder, as `vecsearch load` runs them, minus the writer."""
    import numpy as np

    from vecsearch.embed import map_batches

    embedder = _embedder(precision="auto")
    batch = embedder.batch_size
    embedder.embed_arrays(np.stack([_decode_one(p) for p in paths[:batch]]))  # the engine check
    waited = model = 0.0
    started = time.perf_counter()
    batches = map_batches(_decode_one, paths, batch_size=batch, workers=workers)
    while True:
        t = time.perf_counter()
        pixels = next(batches, None)
        waited += time.perf_counter() - t
        if pixels is None:
            break
        t = time.perf_counter()
        embedder.embed_arrays(np.stack(pixels))
        model += time.perf_counter() - t
    elapsed = time.perf_counter() - started
    return {"img_s": len(paths) / elapsed, "batch": batch, "workers": workers,
            "engine": embedder.choice.describe(), "waiting_for_decode_s": waited, "model_s": model,
            "limited_by": "decode" if waited > 0.25 * model else "model"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run on a CPU")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per forward configuration")
    parser.add_argument("--images", type=int, default=512, help="generated JPEGs for decode and pipeline")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    import torch

    batches = [2, 4] if args.quick else [64, 128, 256]
    seconds = 0.5 if args.quick else args.seconds
    n = 16 if args.quick else args.images
    workers = max(1, (os.cpu_count() or 2) - 1)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    results = {"device": device, "torch": torch.__version__, "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d")}
    print(f"device: {device}, torch {torch.__version__}, {os.cpu_count()} CPUs", file=sys.stderr)
    results["forward"] = forward_table(batches, seconds)
    results["auto"] = auto_choice(batches[-1])
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), n)
        results["decode_cpu_img_s"] = cpu_decode(paths, workers, batches[0])
        results["decode_gpu_img_s"] = gpu_decode(paths, batches[0])
        results["pipeline"] = pipeline(paths, workers)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
