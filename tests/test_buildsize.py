"""Build memory and parallel workers decided from what the building server says about itself
(vecsearch/buildsize.py). The Citus side (each worker its own) is in test_citus.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import insert_vectors

from vecsearch import buildsize, compact, hnsw
from vecsearch.errors import InvalidInput
from vecsearch.progress import Progress

GB = 2**30


def facts(**given) -> buildsize.Facts:
    text = {"meminfo": "MemTotal: 16777216 kB\nMemFree: 1 kB\nMemAvailable: 8388608 kB\n",
            "cgroup_memory": "max\n", "cpus_online": "0-3\n", "cgroup_cpu": "max 100000\n",
            "shared_buffers": 128 * 2**20, "maintenance_work_mem": 64 * 2**20,
            "max_parallel_workers": 8, "max_parallel_maintenance_workers": 2,
            "build_memory": None, "build_workers": None, "rows": [100_000]}
    text.update(given)
    return buildsize.parse_facts(json.dumps(text))


def test_what_a_server_reports_is_read_with_its_container_limits():
    f = facts()
    assert (f.ram, f.available, f.cpus) == (16 * GB, 8 * GB, 4)
    f = facts(cgroup_memory="4294967296\n", cpus_online="0-7,10,12-13", cgroup_cpu="250000 100000")
    assert (f.ram, f.available, f.cpus) == (4 * GB, 4 * GB, 2)  # 11 CPUs online, a 2.5-CPU quota
    f = facts(meminfo=None, cgroup_memory=None, cpus_online=None, cgroup_cpu=None)
    assert (f.ram, f.available, f.cpus) == (None, None, None)


def test_the_plan_fits_the_graph_within_the_budget_and_says_why():
    per_row = compact.element_bytes(None, 32)
    fits = buildsize.plan("w1:5432", facts(), per_row)
    assert fits.memory == buildsize.graph_bytes(100_000, per_row) < 4 * GB  # half of 8 GB available
    assert fits.workers == 3  # its 4 CPUs - 1
    assert "w1:5432" in fits.reason and "half the 8.0 GB available of its 16.0 GB RAM" in fits.reason
    assert "finished on disk" not in fits.reason
    big = buildsize.plan("w1:5432", facts(rows=[10_000_000, 9_000_000]), per_row)
    assert big.memory == 4 * GB and "finished on disk" in big.reason and "2 shards" in big.reason
    assert "10,000,000 rows" in big.reason  # sized for the largest shard, built one at a time


def test_the_operators_settings_win_and_bad_ones_name_the_node():
    told = buildsize.plan("w2:5432", facts(build_memory="48GB", build_workers="6",
                                           rows=[10_000_000]), compact.element_bytes(256, 32))
    assert told.memory == buildsize.graph_bytes(10_000_000, compact.element_bytes(256, 32)) < 48 * GB
    assert told.workers == 6 and "its vecsearch.build_memory 48GB" in told.reason
    assert told.memory_setting.endswith("kB")
    with pytest.raises(InvalidInput, match=r"vecsearch.build_memory on w2:5432 is 'lots'"):
        buildsize.plan("w2:5432", facts(build_memory="lots"), 1000)
    with pytest.raises(InvalidInput, match=r"vecsearch.build_workers on w2:5432 is 'many'"):
        buildsize.plan("w2:5432", facts(build_workers="many"), 1000)
    unreadable = buildsize.plan("w3:5432", facts(meminfo=None, cpus_online=None), 1000)
    assert unreadable.memory <= 2 * 128 * 2**20 and unreadable.workers == 2
    assert "RAM not readable" in unreadable.reason


def test_a_real_build_uses_the_memory_the_server_was_told(conn):
    """A session's vecsearch.build_memory reaches the build: pgvector then says the graph outgrew it."""
    rng = np.random.default_rng(3)
    insert_vectors(conn, rng.normal(size=(600, 2048)).astype(np.float32))
    definition = hnsw.drop(conn)
    said, notices = [], []

    class Said(Progress):
        def message(self, text: str) -> None:
            said.append(text)

    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    conn.execute("SET vecsearch.build_memory = '1MB'")
    conn.execute("SET vecsearch.build_workers = '0'")
    hnsw.rebuild_index(conn, definition, Said())
    assert any("vecsearch.build_memory 1MB" in line and "finished on disk" in line for line in said), said
    assert any("no longer fits into maintenance_work_mem" in n for n in notices), notices
    assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'images' "
                        "AND indexdef LIKE '%hnsw%'").fetchone()[0] == 1
