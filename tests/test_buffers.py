"""The embedded server's shared_buffers: sized to its data at each start, a user's own value kept."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
from conftest import clustered, insert_vectors

from vecsearch import buffers, db, server
from vecsearch.config import Settings

MB = buffers.MB


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def _library(data: Path) -> Path:
    """The vecsearch database's directory (the only one not created by initdb)."""
    return next(d for d in (data / "base").iterdir() if d.name.isdigit() and int(d.name) >= 16384)


def _cgroup_tree(root: Path, groups: str, limits: dict[str, str]) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(groups)
    for file, text in limits.items():
        (root / "sys/fs/cgroup" / file).parent.mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup" / file).write_text(text)
    return root


def test_memory_is_the_lowest_limit_of_this_process_cgroup_and_those_above(tmp_path):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # cgroup v2: a systemd unit's MemoryMax two levels above this process's own group.
    v2 = _cgroup_tree(tmp_path / "v2", "0::/user.slice/job.service/inner\n", {
        "memory.max": "max", "user.slice/memory.max": "max",
        "user.slice/job.service/memory.max": str(2 * 2**30),
        "user.slice/job.service/inner/memory.max": "max"})
    assert buffers.machine_memory(v2) == min(ram, 2 * 2**30)
    # cgroup v1: "unlimited" is a huge number; a container's own view has the limit at the root.
    v1 = _cgroup_tree(tmp_path / "v1", "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n", {
        "memory/memory.limit_in_bytes": str(3 * 2**30),
        "memory/docker/abc/memory.limit_in_bytes": "9223372036854771712"})
    assert buffers.machine_memory(v1) == min(ram, 3 * 2**30)
    # No cgroup files (macOS): the machine's RAM.
    assert buffers.machine_memory(tmp_path / "none") == ram


def test_half_the_data_between_256mb_and_an_eighth_of_memory(tmp_path):
    data = tmp_path / "pg"
    (data / "base").mkdir(parents=True)
    assert buffers.shared_buffers_for(data, 64 * 2**30) == 256 * MB
    _sparse(data / "base/16384/16385", 1500 * MB)
    _sparse(data / "base/5/16385", 8000 * MB)  # the `postgres` database: never the library
    assert buffers.shared_buffers_for(data, 64 * 2**30) == 768 * MB  # 750 MB, up to 128 MB steps
    assert buffers.shared_buffers_for(data, 4 * 2**30) == 512 * MB  # 1/8 of 4 GB
    assert buffers.shared_buffers_for(data, 1 * 2**30) == 256 * MB  # never below the old default
    assert buffers.shared_buffers_for(data, None) == 256 * MB  # memory unknown
    _sparse(data / "base/pgsql_tmp/pgsql_tmp1.0", 8000 * MB)  # a crashed sort's leftovers
    assert buffers.shared_buffers_for(data, 64 * 2**30) == 768 * MB


def test_the_server_starts_with_it_and_keeps_a_users_own(tmp_path):
    home = tmp_path / "home"
    data = server.pgdata(home)
    conf = data / "postgresql.conf"

    def restart() -> int:
        server.stop(home)
        with psycopg.connect(server.ensure_running(home).url()) as c:
            return c.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))").fetchone()[0]

    def alter_system(statement: str) -> None:
        with psycopg.connect(server.running(home).url(), autocommit=True) as c:
            c.execute(statement)

    def our_line(replacement: str, header: str = buffers.HEADER) -> None:
        text = conf.read_text().replace(buffers.HEADER, header)
        line = next(x for x in text.splitlines() if x.startswith("shared_buffers = ") and buffers.MARK in x)
        conf.write_text(text.replace(line, replacement))

    server.ensure_running(home)
    try:
        assert restart() == 256 * MB  # a small library: as before
        # The library grows: a sparse file stands in for 1.2 GB of tables (a relation file no
        # catalog names, which the server never opens).
        _sparse(_library(data) / "999999999", 1200 * MB)
        expected = buffers.shared_buffers_for(data, buffers.machine_memory())
        assert expected == min(max(256 * MB, buffers.machine_memory() // 8 // MB * MB), 640 * MB)
        assert restart() == expected
        assert f"shared_buffers = {expected // MB}MB  {buffers.MARK}\n" in conf.read_text()
        mode = conf.stat().st_mode
        # A home from before sizing (a plain 256MB under the old header) is ours: resized.
        our_line("shared_buffers = 256MB", header=buffers.OLD_HEADER)
        assert restart() == expected
        assert buffers.HEADER in conf.read_text() and conf.stat().st_mode == mode
        # The user's own values win: ALTER SYSTEM, a later line, the line without its comment
        # (256MB too, which under the new header is no longer an old home's default).
        alter_system("ALTER SYSTEM SET shared_buffers = '200MB'")
        assert restart() == 200 * MB
        alter_system("ALTER SYSTEM RESET shared_buffers")
        conf.write_text(conf.read_text() + "shared_buffers = 300MB\n")
        assert restart() == 300 * MB
        conf.write_text(conf.read_text().replace("shared_buffers = 300MB\n", ""))
        our_line("shared_buffers = 256MB")
        assert restart() == 256 * MB
        assert "shared_buffers = 256MB\n" in conf.read_text()
    finally:
        server.stop(home)


def test_a_start_that_fails_says_why_and_falls_back_to_256mb(tmp_path):
    home = tmp_path / "home"
    data = server.pgdata(home)
    server.ensure_running(home)
    server.stop(home)
    _sparse(_library(data) / "999999999", 1200 * MB)
    auto = data / "postgresql.auto.conf"
    good = auto.read_text()
    auto.write_text(good + "work_mem = 'lots'\n")
    try:
        server.ensure_running(home)
        raise AssertionError("the server started with a bad setting")
    except server.DatabaseUnavailable as e:
        # The FATAL line, not the "database system is shut down" after it.
        assert "FATAL:" in str(e) and "contains errors" in str(e), e
    if buffers.machine_memory() // 8 > 256 * MB:  # it had sized above 256MB: retried at 256MB
        assert f"shared_buffers = 256MB  {buffers.MARK}" in (data / "postgresql.conf").read_text()
    auto.write_text(good)
    try:
        with psycopg.connect(server.ensure_running(home).url()) as c:
            sized = c.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))").fetchone()[0]
        assert sized == buffers.shared_buffers_for(data, buffers.machine_memory())
    finally:
        server.stop(home)


def test_status_says_whether_shared_buffers_holds_the_graph(tmp_path):
    home = tmp_path / "home"
    settings = Settings(database_url=None, home=home)
    try:
        with db.connect(settings) as conn:
            insert_vectors(conn, clustered(300, seed=5))
            assert dict(db.status(conn))["cache"].startswith("shared_buffers 256 MB, holds the ")
            conn.execute("ALTER SYSTEM SET shared_buffers = '1MB'")
        server.stop(home)
        with db.connect(settings) as conn:
            line = dict(db.status(conn))["cache"]
        assert line.startswith("shared_buffers 1024 kB, less than the ") and "vecsearch db stop" in line
    finally:
        server.stop(home)
