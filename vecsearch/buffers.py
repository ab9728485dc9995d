"""The embedded server's shared_buffers, sized to its data at each start.

A graph search reads thousands of index pages; once the graph outgrows shared_buffers each one is
a copy from the OS cache (docs/scaling.md#memory). A full graph is about half of the data on
disk and a compact one less, so half the data is enough, and a small library's server stays as
small and as quick to start as it always was (256MB). At most 1/8 of the memory this process may
use, not PostgreSQL's usual 1/4: the server shares a laptop with everything else.

The value lives on one marked line of postgresql.conf, rewritten before each start. A user's
ALTER SYSTEM (postgresql.auto.conf, read after it), a later line, or the line with its comment
removed wins. Sizing is an optimisation: whatever stops it leaves the file as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

MB = 2**20
FLOOR = 256 * MB
STEP = 128 * MB
# The header of the defaults that server.py appends to a new cluster's postgresql.conf; under the
# old one (homes from before sizing) a plain `shared_buffers = 256MB` is ours too.
HEADER = "# vecsearch defaults (see vecsearch/server.py; shared_buffers: vecsearch/buffers.py)"
OLD_HEADER = "# vecsearch defaults (see vecsearch/server.py)"
MARK = "# vecsearch: sized to the data at each start (remove this comment to keep a value)"
LINE = f"shared_buffers = 256MB  {MARK}"
_FIXED = {"1", "4", "5", "pgsql_tmp"}


def machine_memory(root: Path = Path("/")) -> int | None:
    """Bytes of RAM this process may use: the machine's, or the lowest memory limit of its
    cgroup and the cgroups above it (a container, a systemd unit's MemoryMax, a batch job)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    if memory <= 0:
        return None
    try:
        groups = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return memory
    for group in groups:
        _, controllers, path = group.split(":", 2)
        if controllers == "":  # cgroup v2
            base, limit_file = root / "sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            base, limit_file = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        here = base / path.lstrip("/")
        for directory in [here, *here.parents]:
            try:
                text = (directory / limit_file).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                memory = min(memory, int(text))
            if directory == base:
                break
    return memory


def shared_buffers_for(data: Path, memory: int | None) -> int:
    """Bytes of shared_buffers for the cluster in `data`, given the memory we may use."""
    # Not the template databases and `postgres` (fixed OIDs 1, 4, 5), never the library, nor the
    # server's temporary files (a crashed sort's leftovers, removed at start).
    on_disk = sum(_bytes_under(d) for d in (data / "base").iterdir() if d.name not in _FIXED)
    half = -(-on_disk // (2 * STEP)) * STEP
    ceiling = FLOOR if memory is None else max(FLOOR, memory // 8 // MB * MB)
    return min(ceiling, max(FLOOR, half))


def size(data: Path, ceiling: int | None = None) -> int | None:
    """Rewrite our shared_buffers line for this start (at most `ceiling`); the bytes written,
    None where the line is not ours or the file could not be rewritten."""
    conf = data / "postgresql.conf"
    try:
        if conf.is_symlink() or conf.stat().st_uid != os.geteuid():
            return None  # not ours to replace (under sudo, replacing would hand it to root)
        lines = conf.read_text(encoding="utf-8").splitlines(keepends=True)
        ours = next((i for i, line in enumerate(lines) if line.startswith("shared_buffers = ")
                     and (line.rstrip().endswith(MARK) or (line.strip() == "shared_buffers = 256MB"
                                                           and OLD_HEADER + "\n" in lines[:i]))), None)
        if ours is None:
            return None
        value = shared_buffers_for(data, machine_memory())
        if ceiling is not None:
            value = min(value, ceiling)
        wanted = [HEADER + "\n" if line == OLD_HEADER + "\n" else line for line in lines]
        wanted[ours] = f"shared_buffers = {value // MB}MB  {MARK}\n"
        if wanted != lines:
            _replace(conf, "".join(wanted))
        return value
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _replace(path: Path, text: str) -> None:
    """Write `text` over `path` as a kill or a power cut leaves it: the old file or the new."""
    scratch = path.with_name(path.name + ".vecsearch")
    with open(os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, path.stat().st_mode & 0o777),
              "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    scratch.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _bytes_under(path: Path) -> int:
    """Bytes of the files under `path`."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    total += _bytes_under(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:  # removed meanwhile, or unreadable: not counted
                continue
    return total
