"""`vecsearch dupes` at scale: time, peak memory and recall of planted near-duplicate groups.

    .venv/bin/python bench/dupes.py [--sizes 10000,100000] [--threshold 0.05]

Synthetic CNN-like vectors (2048-d, non-negative with about a third of zeros, clustered,
L2-normalised, fixed seed) go into a throwaway embedded server (its own home under /tmp,
removed at the end): binary COPY, then the HNSW index built in bulk (big
maintenance_work_mem, parallel workers). Planted among them, per 40 images one group of an
original and 1-3 copies (an exact copy: same sha256 and vector; a "re-encode" at cosine
distance ~0.001; a "resize" ~0.008; a "crop" ~0.03), and per 100 images one "sibling" at
~0.1 (a similar but different picture, which must NOT be grouped). Unrelated nearest
neighbours sit above 0.19.

The real `vecsearch dupes --format csv` runs as a subprocess: its wall time, its peak RSS
(VmHWM, sampled every 50 ms), and the server backend's peak RSS (sampled from /proc; it includes the shared
buffers it touched). Recall: planted pairs (original-copy and copy-copy) found in one group;
false pairs: pairs grouped together that were not planted together (siblings or unrelated).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import threading
import time
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import DIM, MTIME  # noqa: E402

from vecsearch import db, dupes, server  # noqa: E402
from vecsearch.config import Settings  # noqa: E402

SEED = 20240611
CLUSTERS = 200
# copy kind -> relative noise (cosine distance to the original ~ eps^2 / 2); None: exact copy
COPIES = {"exact": None, "reencode": 0.06, "resize": 0.15, "crop": 0.30}
SIBLING_EPS = 0.60
GROUP_EVERY = 40
SIBLING_EVERY = 100


def generate(n: int, rng: np.random.Generator, chunk: int = 4096):
    """Yield (index, vector, planted_group or None, kind, sha_index) rows, n in total, streamed."""
    space = common.CnnLike(rng, CLUSTERS, noise=0.6)
    i = 0
    group = 0

    def unit(v):
        return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)

    def near(v, eps):
        return unit(np.maximum(v + rng.normal(0, eps / np.sqrt(DIM), DIM).astype(np.float32), 0))

    while i < n:
        m = min(chunk, n - i)
        for v in space.draw(m):
            if i >= n:
                return
            original = i
            yield i, v, None, "original", original
            i += 1
            if original % GROUP_EVERY == 0:
                kinds = rng.choice(list(COPIES), size=1 + int(rng.integers(0, 3)), replace=False)
                for kind in kinds:
                    if i >= n:
                        return
                    kind = str(kind)
                    eps = COPIES[kind]
                    yield i, (v if eps is None else near(v, eps)), group, kind, \
                        original if eps is None else i
                    i += 1
                # The original belongs to the planted group too.
                yield -1, None, group, "original", original
                group += 1
            elif original % SIBLING_EVERY == 1 and i < n:
                yield i, near(v, SIBLING_EPS), None, "sibling", i
                i += 1


def populate(conn, n: int):
    """COPY n rows (no index); return planted {row index: group}, copies per kind, their
    distances to the original, and the index definition to rebuild."""
    rng = np.random.default_rng(SEED)
    planted: dict[int, int] = {}
    kinds: dict[str, int] = {}
    distances: dict[str, list[float]] = {}
    definition = common.drop_index(conn)
    with common.copy_images(conn) as copy:
        last_original = None
        for i, v, group, kind, sha in generate(n, rng):
            if i < 0:
                planted[sha] = group
                continue
            if kind == "original":
                last_original = v
            else:
                kinds[kind] = kinds.get(kind, 0) + 1
                distances.setdefault(kind, []).append(float(1 - last_original @ v))
            if group is not None:
                planted[i] = group
            w, h = (1024, 768) if kind in ("original", "sibling", "exact") else (640, 480)
            copy.write_row([f"/bench/img{i:07d}.jpg", f"{sha:064x}", 100_000 + i % 1000, w, h,
                            "JPEG", MTIME, v])
    return planted, kinds, distances, definition


class BackendPeak(threading.Thread):
    """Samples the peak RSS of the server backends serving application_name `app`."""

    def __init__(self, url: str, app: str):
        super().__init__(daemon=True)
        self.url, self.app = url, app
        self.peak_hwm = 0  # kB, VmHWM (includes shared buffers touched)
        self.peak_anon = 0  # kB, RssAnon (private memory)
        self.stop = threading.Event()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.wait(0.2):
                pids = [r[0] for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [self.app])]
                for pid in pids:
                    status = _status_kb(pid)
                    self.peak_hwm = max(self.peak_hwm, status.get("VmHWM", 0))
                    self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))


def run_dupes(url: str, args: argparse.Namespace, out_path: Path) -> tuple[float, int, BackendPeak]:
    app = f"vecsearch-bench-dupes-{os.getpid()}"
    sampler = BackendPeak(url, app)
    sampler.start()
    env = {**os.environ, "VECSEARCH_DATABASE_URL": url, "PGAPPNAME": app}
    cmd = [sys.executable, "-c", "from vecsearch.cli import main; main()", "dupes",
           "--threshold", str(args.threshold), "--k", str(args.k), "--ef-search", str(args.ef_search),
           "--format", "csv"] + (["--jobs", str(args.jobs)] if args.jobs else [])
    t = time.perf_counter()
    peak_kb = 0
    with open(out_path, "w") as out, open(out_path.with_suffix(".err"), "w") as errf:
        proc = subprocess.Popen(cmd, stdout=out, stderr=errf, env=env)
        # VmHWM of the child's own address space. (wait4's ru_maxrss would not do: after a
        # vfork + exec Linux carries this big parent's high-water mark over into the child.)
        while proc.poll() is None:
            peak_kb = max(peak_kb, _status_kb(proc.pid).get("VmHWM", 0))
            time.sleep(0.05)
    seconds = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"vecsearch dupes failed:\n{out_path.with_suffix('.err').read_text()}")
    return seconds, peak_kb, sampler


def _status_kb(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (empty once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: int(value.split()[0]) for key, _, value in (line.partition(":") for line in lines)
            if value.strip().endswith("kB")}


def score(out_path: Path, planted: dict[int, int]) -> dict[str, float]:
    found: dict[int, set[int]] = {}
    with open(out_path) as f:
        for row in csv.DictReader(f):
            index = int(Path(row["path"]).stem.removeprefix("img"))
            found.setdefault(int(row["group"]), set()).add(index)
    group_of = {i: g for g, members in found.items() for i in members}
    truth: dict[int, set[int]] = {}
    for i, g in planted.items():
        truth.setdefault(g, set()).add(i)
    planted_pairs = [(a, b) for members in truth.values() for a, b in combinations(sorted(members), 2)]
    hit = sum(1 for a, b in planted_pairs if a in group_of and group_of.get(a) == group_of.get(b))
    found_pairs = [(a, b) for members in found.values() for a, b in combinations(sorted(members), 2)]
    false = sum(1 for a, b in found_pairs if planted.get(a, -1) != planted.get(b, -2))
    exact_groups = sum(1 for members in truth.values()
                       if members == found.get(group_of.get(next(iter(members)), -1)))
    return {"planted_groups": len(truth), "planted_pairs": len(planted_pairs),
            "found_groups": len(found), "recall": hit / max(1, len(planted_pairs)),
            "false_pairs": false, "groups_exact": exact_groups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--threshold", type=float, default=dupes.DEFAULT_THRESHOLD)
    parser.add_argument("--k", type=int, default=dupes.DEFAULT_K)
    parser.add_argument("--ef-search", type=int, default=dupes.EF_SEARCH)
    parser.add_argument("--jobs", type=int, help="vecsearch dupes --jobs (default: its own)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway server home")
    args = parser.parse_args()
    rows = []
    with common.throwaway_home("dupes", keep=args.keep) as home:
        print(f"server home {home}; {common.load_average()} at start (shared: other jobs slow this "
              "down)", flush=True)
        running = server.ensure_running(home)
        for n in [int(s) for s in args.sizes.split(",")]:
            name = f"bench_dupes_{n}"
            with server.psql_connection(running) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name}")
                admin.execute(f"CREATE DATABASE {name}")
            url = running.url(name)
            with db.connect(Settings(database_url=url, home=home)) as conn:
                t = time.perf_counter()
                planted, kinds, distances, definition = populate(conn, n)
                load_s = time.perf_counter() - t
                index_s = common.build_index(conn, definition)
            print(f"n={n}: COPY {load_s:.1f} s, HNSW build {index_s:.1f} s; planted copies {kinds}; "
                  "distance to original p50/max: " + ", ".join(
                      f"{k} {np.median(d):.4f}/{max(d):.4f}" for k, d in distances.items()), flush=True)
            out_path = home / f"dupes_{n}.csv"
            seconds, rss_kb, backend = run_dupes(url, args, out_path)
            s = score(out_path, planted)
            rows.append((n, seconds, rss_kb, backend, s))
            print("  vecsearch dupes said: " + " / ".join(
                out_path.with_suffix(".err").read_text().strip().splitlines()), flush=True)
            print(f"n={n}: dupes {seconds:.1f} s, client peak RSS {rss_kb / 1024:.0f} MiB, "
                  f"backend peak RSS {backend.peak_hwm / 1024:.0f} MiB "
                  f"(private {backend.peak_anon / 1024:.0f} MiB), {s}", flush=True)
    print(f"\nthreshold {args.threshold}, k {args.k}, ef_search {args.ef_search}, jobs "
          f"{args.jobs or 'default'}; load average now "
          f"{os.getloadavg()[0]:.2f}")
    print("| images | dupes wall s | client peak RSS MiB | backend peak RSS MiB (private) | planted groups "
          "| found groups | recall of planted pairs | groups exact | false pairs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, seconds, rss_kb, backend, s in rows:
        print(f"| {n:,} | {seconds:.1f} | {rss_kb / 1024:.0f} | {backend.peak_hwm / 1024:.0f} "
              f"({backend.peak_anon / 1024:.0f}) | {s['planted_groups']} | {s['found_groups']} "
              f"| {s['recall']:.4f} | {s['groups_exact']} | {s['false_pairs']} |")


if __name__ == "__main__":
    main()
