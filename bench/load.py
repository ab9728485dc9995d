"""`vecsearch load` as a user meets it, and its throughput per stage, for the default engine
(`--precision auto`) and the fp32 reference side by side.

    .venv/bin/python bench/load.py [--mode process|throughput|both] [--process-sizes 1,16,64,300,1000]
                                   [--sizes 100,300] [--batch-size 16] [--workers N] [--weights random]

Whole processes (`--mode process`, the default): for each folder size, `vecsearch load FOLDER -q`
into an empty database, timed from start to exit, in the order fp32, default (a fresh
VECSEARCH_HOME: no engine measurement kept), fp32, default again (the home of the first default
run: its measurement reused); then `vecsearch search FILE -k 3`, default and fp32 alternately,
three times each (medians). Ratios are within one run; the load average is printed with them.

Throughput (`--mode throughput`):
Generated photos (vecsearch.synthetic.make_image: 4 in 5 JPEG 1024x768 q90, 1 in 5 PNG 640x480) go
into folders of the sizes given. For each size a fresh child process (its own peak RSS)
measures, at the same batch size:
  - bare forward: the network alone on pre-made channels_last tensors (inference_mode), before
    and after the load (mean of both, so a busy machine does not favour one side);
  - decode-only: load's own worker function (read, sha256, decode, resize + crop) over the
    folder, in the same worker processes as load;
  - end to end: `vecsearch.load.load` into an empty database (decode workers, model, writer
    thread, HNSW index built at the end), model already built;
  - peak RSS of the process and of its largest decode worker;
  - CPU time per image (this process and its decode workers), which a machine shared with
    other jobs disturbs far less than wall-clock rates.
Both engines load the same folder alternately; the table gives the worst cosine between their
vectors. A last child compares them on scikit-image's real photos and measures how far JPEG
draft() decoding moves vectors from a full-size decode (scikit-image's photos saved as JPEG q90,
and the drift of a q70 re-encode for scale). A throwaway embedded server under a temporary
VECSEARCH_HOME is used (removed at the end) unless VECSEARCH_DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from vecsearch import server  # noqa: E402
from vecsearch.config import Settings  # noqa: E402


def make_folder(folder: Path, n: int, source: Path | None = None) -> None:
    """n generated photos; the first ones hard-linked from `source` when it has them."""
    from vecsearch.synthetic import make_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"{i:05d}.jpg" if i % 5 else f"{i:05d}.png"
        if source is not None and (source / name).exists():
            os.link(source / name, folder / name)
        elif i % 5:
            make_image(folder / name, i, (1024, 768))
        else:
            make_image(folder / name, i, (640, 480))


def _database(url_base: str | None, running, name: str) -> str:
    if url_base:
        return url_base
    with server.psql_connection(running) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return running.url(name)


def _child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _quiet_embedder(weights: str, batch_size: int, precision: str = "fp32"):
    """An Embedder, built, that has made its engine choice (on one batch of noise)."""
    from vecsearch.embed import Embedder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embedder = Embedder(weights, batch_size=batch_size, precision=precision).prepare()
    import numpy as np

    embedder.embed_arrays(np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), np.uint8))
    return embedder


def _cpu() -> float:
    """CPU seconds of this process (all threads) and its reaped children (decode workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _bare_forward(embedder, batch_size: int, batches: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the network alone, in the precision the embedder kept."""
    import torch

    x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    precision = embedder.active_precision
    with torch.inference_mode():
        embedder._forward(x, precision)  # warm-up
        started, cpu = time.perf_counter(), _cpu()
        for _ in range(batches):
            embedder._forward(x, precision)
    n = batch_size * batches
    return n / (time.perf_counter() - started), (_cpu() - cpu) * 1000 / n


def child_throughput(folder: str, url: str, batch_size: int, workers: int, weights: str,
                     precision: str) -> dict:
    from vecsearch import db
    from vecsearch import load as loader
    from vecsearch.embed import map_batches
    from vecsearch.images import find_images

    settings = Settings(database_url=url, home=Path(tempfile.gettempdir()))
    db.connect(settings).close()  # migrated
    embedder = _quiet_embedder(weights, batch_size, precision)
    paths = [c.path for c in find_images(folder).files]
    batches = max(3, min(8, len(paths) // batch_size))
    forward_before, forward_cpu = _bare_forward(embedder, batch_size, batches)

    from vecsearch.pipeline import Reader

    reader = Reader(url, "public", None)
    started = time.perf_counter()
    for _ in map_batches(reader, paths, batch_size=batch_size, workers=workers):
        pass
    decode = len(paths) / (time.perf_counter() - started)
    reader.close()

    started, cpu = time.perf_counter(), _cpu()
    summary = loader.load(settings, folder, embedder, workers=workers)
    end_to_end = summary.embedded / (time.perf_counter() - started)
    load_cpu = (_cpu() - cpu) * 1000 / summary.embedded
    assert summary.embedded == len(paths) and not summary.failed, summary.describe()
    forward_after, forward_cpu_after = _bare_forward(embedder, batch_size, batches)
    with db.connect(settings) as conn:
        vectors = {p: v.to_numpy().tolist() for p, v in conn.execute("SELECT path, embedding FROM images")}
    Path(folder, "..", f"vectors-{precision}-{len(paths)}.json").write_text(json.dumps(vectors))

    kib = 1024  # ru_maxrss is in KiB on Linux
    return {"files": len(paths), "forward": (forward_before + forward_after) / 2,
            "forward_before": forward_before, "forward_after": forward_after, "decode": decode,
            "end_to_end": end_to_end, "forward_cpu_ms": (forward_cpu + forward_cpu_after) / 2,
            "load_cpu_ms": load_cpu, "decode_wait": summary.decode_wait, "load_s": summary.seconds,
            "write_wait": summary.write_wait, "model_s": summary.model_seconds,
            "limited_by": summary.limited_by, "engine": embedder.choice.describe(),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
            "load_avg": os.getloadavg()[0]}


def child_extra(folder: str, url: str, batch_size: int, workers: int, weights: str, precision: str) -> dict:
    """The auto engine against fp32 on real photos (worst cosine), and JPEG draft drift."""
    import numpy as np
    import skimage.data

    from vecsearch.errors import UnreadableImage
    from vecsearch.images import model_input, open_image

    photos = []
    for path in sorted(Path(skimage.data.__file__).parent.iterdir()):
        try:
            photos.append((path, open_image(path, draft=None)))
        except UnreadableImage:
            continue
    fp32 = _quiet_embedder(weights, batch_size, "fp32")
    pixels = np.stack([model_input(img) for _, img in photos])
    reference = fp32.embed_arrays(pixels)
    auto = _quiet_embedder(weights, batch_size, "auto")
    vectors = auto.embed_arrays(pixels)
    result = {"photos": len(photos), "engine": auto.choice.describe(),
              "min_cosine": float((reference * vectors).sum(axis=1).min())}

    # Draft drift: photos big enough for draft (short side >= 464) saved as JPEG q90.
    drift, reencode, scales = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for path, img in photos:
            if min(img.size) < 2 * 232:
                continue
            jpeg, q70 = Path(tmp) / f"{path.stem}.jpg", Path(tmp) / f"{path.stem}_q70.jpg"
            img.save(jpeg, quality=90)
            img.save(q70, quality=70)
            full = open_image(jpeg, draft=None)
            drafted = open_image(jpeg)
            scales.append(f"1/{round(full.size[0] / drafted.size[0])}")
            a, b, c = fp32.embed_images([full, drafted, open_image(q70, draft=None)])
            drift.append(1 - float(a @ b))
            reencode.append(1 - float(a @ c))
    result |= {"draft_photos": len(drift), "draft_scales": sorted(set(scales)),
               "draft_max": max(drift), "draft_mean": float(np.mean(drift)),
               "reencode_q70_mean": float(np.mean(reencode))}
    return result


def _timed_cli(args: list[str], env: dict) -> tuple[float, float]:
    """Wall-clock and CPU seconds (its own and its decode workers', not the database server's) of
    one whole `vecsearch` process, which must succeed. CPU time is what a machine shared with
    other jobs disturbs least."""
    cpu = _cpu()
    started = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "vecsearch"), *args], capture_output=True,
                            text=True, env={**os.environ, **env})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"vecsearch {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return seconds, _cpu() - cpu


def process_table(sizes: list[int], folders: dict, external: str | None, running, home: Path,
                  weights: str, small_rounds: int) -> tuple[list[dict], dict]:
    """Whole-process `load` times by size (fp32, default first run, fp32, default second run)
    and `search FILE` times, default vs fp32."""
    rows, url = [], None
    for n in sizes:
        rounds = small_rounds if n <= 64 else 1  # small loads are noisy: medians of rounds
        times: dict = {}
        for r in range(rounds):
            cache = home / f"engine-home-{n}-{r}"  # the default runs' VECSEARCH_HOME (engine.json)
            for run, precision in ((1, "fp32"), (1, "auto"), (2, "fp32"), (2, "auto")):
                print(f"load {n} files, --precision {precision}, run {run}...", file=sys.stderr)
                url = _database(external, running, f"bench_proc_{n}_{precision}_{run}_{r}")
                env = {"VECSEARCH_DATABASE_URL": url,
                       "VECSEARCH_HOME": str(cache if precision == "auto" else home / f"fp32-{n}-{run}-{r}")}
                args = ["load", str(folders[n]), "--weights", weights, "-q", "--precision", precision]
                times.setdefault((run, precision), []).append(_timed_cli(args, env))
        kept = cache / "engine.json"
        engines = json.loads(kept.read_text())["entries"] if kept.exists() else []
        medians = {k: tuple(sorted(x)[len(x) // 2] for x in zip(*v, strict=True)) for k, v in times.items()}
        rows.append({"files": n, "rounds": rounds, "times": medians,
                     "kept": [e["measured"]["precision"] for e in engines], "load_avg": os.getloadavg()[0]})
        so_far = {f"{p} run {run}": t for (run, p), t in medians.items()}
        # as it goes: a long run cut short keeps what it measured
        print(f"  {n} files (wall, CPU s): {json.dumps(so_far)}", file=sys.stderr)
    search = {"auto": [], "fp32": []}
    file = sorted(folders[sizes[0]].iterdir())[0]
    env = {"VECSEARCH_DATABASE_URL": url, "VECSEARCH_HOME": str(cache)}
    for _ in range(3):
        for precision in ("auto", "fp32"):
            print(f"whole process: search FILE, --precision {precision}...", file=sys.stderr)
            args = ["search", str(file), "-k", "3", "--precision", precision]
            search[precision].append(_timed_cli(args, env))
    medians = {p: tuple(sorted(x)[1] for x in zip(*t, strict=True)) for p, t in search.items()}
    return rows, medians | {"load_avg": os.getloadavg()[0]}


def _report_process(rows: list[dict], search: dict) -> None:
    """Wall-clock seconds, and in brackets CPU seconds; ratios default / fp32 of each."""
    print("| files | fp32, run 1 | default, run 1 | default / fp32 | fp32, run 2 | default, run 2 "
          "| default / fp32 | engine kept | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")

    def cells(fp32: tuple, auto: tuple) -> str:
        return (f"{fp32[0]:.1f} ({fp32[1]:.1f}) | {auto[0]:.1f} ({auto[1]:.1f}) "
                f"| {auto[0] / fp32[0]:.2f}x ({auto[1] / fp32[1]:.2f}x)")

    for r in rows:
        t = r["times"]
        files = f"{r['files']} (median of {r['rounds']})" if r["rounds"] > 1 else r["files"]
        print(f"| {files} | {cells(t[1, 'fp32'], t[1, 'auto'])} | {cells(t[2, 'fp32'], t[2, 'auto'])} "
              f"| {', '.join(r['kept']) or '(none measured)'} | {r['load_avg']:.1f} |")
    auto, fp32 = search["auto"], search["fp32"]
    print(f"`vecsearch search FILE -k 3`, whole process, median of 3: default {auto[0]:.2f} s ({auto[1]:.2f} "
          f"CPU s), fp32 {fp32[0]:.2f} s ({fp32[1]:.2f}); {auto[0] / fp32[0]:.2f}x "
          f"({auto[1] / fp32[1]:.2f}x); load avg {search['load_avg']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["process", "throughput", "both"], default="process")
    parser.add_argument("--process-sizes", default="1,16,64,300,1000", help="sizes of the process table")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the process table up to 64 files")
    parser.add_argument("--sizes", default="100,300", help="folder sizes of the throughput table")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: load's)")
    parser.add_argument("--weights", default="random", help="default, FILE or random")
    parser.add_argument("--child", choices=["throughput", "extra"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = child_throughput if args.child == "throughput" else child_extra
        print(json.dumps(fn(args.folder, args.url, args.batch_size, args.workers, args.weights,
                            args.precision)))
        return

    from vecsearch.embed import default_workers

    workers = default_workers() if args.workers is None else args.workers
    throughput = args.mode != "process"
    sizes = sorted(int(s) for s in args.sizes.split(",")) if throughput else []
    process_sizes = sorted(int(s) for s in args.process_sizes.split(",")) if args.mode != "throughput" else []
    external = os.environ.get("VECSEARCH_DATABASE_URL")
    home = Path(tempfile.mkdtemp(prefix="vecsearch-bench-load-"))
    running = None if external else server.ensure_running(home)
    try:
        every = sorted(set(sizes) | set(process_sizes))
        print(f"generating {every[-1]} images...", file=sys.stderr)
        folders = {}
        for n in reversed(every):
            folders[n] = home / f"images-{n}"
            make_folder(folders[n], n, source=folders.get(every[-1]))
        if process_sizes:
            rows, search = process_table(process_sizes, folders, external, running, home, args.weights,
                                         args.rounds)
        common = ["--batch-size", str(args.batch_size), "--workers", str(workers), "--weights", args.weights]
        results = {}
        for n in sizes:
            for precision in ("fp32", "auto"):  # alternately, so a busy machine favours neither
                print(f"loading {n} images, --precision {precision}...", file=sys.stderr)
                url = _database(external, running, f"bench_load_{n}_{precision}")
                results[n, precision] = _child("--child", "throughput", "--folder", str(folders[n]),
                                               "--url", url, "--precision", precision, *common)
            vectors = [json.loads((home / f"vectors-{p}-{n}.json").read_text()) for p in ("fp32", "auto")]
            results[n, "auto"]["min_cosine"] = _min_cosine(*vectors)
        if throughput:
            print("real photos and draft drift...", file=sys.stderr)
            extra = _child("--child", "extra", "--folder", str(folders[sizes[0]]),
                           "--url", _database(external, running, "bench_load_extra"), *common)
    finally:
        if running is not None:
            server.stop(home)
        shutil.rmtree(home, ignore_errors=True)
    print(f"vecsearch load and search as whole processes, weights {args.weights}, {os.cpu_count()} CPUs")
    if process_sizes:
        _report_process(rows, search)
    if throughput:
        _report(results, extra, args, workers)


def _min_cosine(a: dict, b: dict) -> float:
    import numpy as np

    return min(float(np.dot(a[p], b[p])) for p in a)


def _report(results: dict, extra: dict, args, workers: int) -> None:
    print(f"vecsearch load, weights {args.weights}, batch size {args.batch_size}, {workers} decode "
          f"worker(s), {os.cpu_count()} CPUs")
    print(f"{'files':>6} {'precision':>9} {'forward img/s':>14} {'decode img/s':>13} {'load img/s':>11} "
          f"{'load/forward':>13} {'limited by':>11} {'min cos':>8} {'peak RSS MB':>12} {'load avg':>9}")
    for (n, precision), r in results.items():
        cosine = f"{r['min_cosine']:.5f}" if "min_cosine" in r else "ref"
        print(f"{n:>6} {precision:>9} {r['forward']:>14.2f} {r['decode']:>13.1f} {r['end_to_end']:>11.2f} "
              f"{r['end_to_end'] / r['forward']:>13.2f} {r['limited_by']:>11} {cosine:>8} "
              f"{r['rss_mb']:>12.0f} {r['load_avg']:>9.1f}")
    for n in sorted({n for n, _ in results}):
        fp32, auto = results[n, "fp32"], results[n, "auto"]
        print(f"  {n} files: auto is {auto['end_to_end'] / fp32['end_to_end']:.2f}x fp32 end to end "
              f"({auto['engine']}); stages (auto): model {auto['model_s']:.1f} s, waiting for decode "
              f"{auto['decode_wait']:.1f} s, for writes {auto['write_wait']:.1f} s "
              f"of {auto['load_s']:.1f} s; "
              f"CPU per image: forward {auto['forward_cpu_ms']:.0f} ms, load {auto['load_cpu_ms']:.0f} ms")
    print(f"real photos ({extra['photos']} from scikit-image): {extra['engine']}; worst cosine to fp32 "
          f"{extra['min_cosine']:.6f}")
    print(f"JPEG draft vs full-size decode ({extra['draft_photos']} photos, draft scales "
          f"{', '.join(extra['draft_scales'])}): cosine distance mean {extra['draft_mean']:.6f}, max "
          f"{extra['draft_max']:.6f} (a q70 re-encode of the same photos: mean "
          f"{extra['reencode_q70_mean']:.6f})")


if __name__ == "__main__":
    main()
