"""What the user settled about near-duplicate groups, kept in vecsearch_dupe_decisions (0008).

A decision covers the files of one group, each row keyed by (sha256, path) rather than the image
id, so a re-load of the same files keeps it and an edited file (new content) falls out of it. A
group is settled when every one of its files has a decision; `vecsearch dupes` and the gallery's
/duplicates propose only the others. Nothing here deletes or moves a file: `move_script` writes a
shell script for the user to read and run.
"""

from __future__ import annotations

import hashlib
import shlex
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from .dupes import Group, Member
from .errors import InvalidInput

ROLES = ("keep", "dupe", "distinct")
COLUMNS = ["decision", "role", "path", "sha256", "distance", "threshold", "decided_at"]


def group_key(group: Group) -> str:
    """A stable name for a group: its files (content and path), not its ids or order, so that a
    form shown before a recomputation still names the same group after it."""
    files = sorted(f"{m.sha256}\0{m.path}" for m in group.members)
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Review:
    """Groups split by whether the user settled them; `earlier` maps a file (sha256, path) of a
    pending group to its role in an earlier decision (a group that gained a new file)."""

    pending: list[Group]
    settled: int
    earlier: dict[tuple[str, str], str]


def review(conn: psycopg.Connection, groups: Sequence[Group]) -> Review:
    """Which groups still need a decision: one query joining every member to the decisions. The
    arrays go in binary: text arrays of 7,200 paths took 45-65 ms to quote, binary 9 ms."""
    shas = [m.sha256 for g in groups for m in g.members]
    paths = [m.path for g in groups for m in g.members]
    decided = dict(((sha, path), role) for sha, path, role in conn.execute(
        "SELECT d.sha256, d.path, d.role FROM vecsearch_dupe_decisions d "
        "JOIN unnest(%b::text[], %b::text[]) AS u(sha256, path) USING (sha256, path)",
        [shas, paths]).fetchall()) if shas else {}
    pending, settled, earlier = [], 0, {}
    for g in groups:
        keys = [(m.sha256, m.path) for m in g.members]
        if all(k in decided for k in keys):
            settled += 1
        else:
            pending.append(g)
            earlier.update((k, decided[k]) for k in keys if k in decided)
    return Review(pending, settled, earlier)


def proposed_keeper(group: Group, earlier: dict[tuple[str, str], str] | None = None) -> Member:
    """The keeper to propose: the one the user kept before, else the rule's (dupes.KEEPER_RULE)."""
    for m in group.members:
        if (earlier or {}).get((m.sha256, m.path)) == "keep":
            return m
    return group.keeper


def decide(conn: psycopg.Connection, choices: Iterable[tuple[Group, int | None]],
           threshold: float) -> int:
    """Store decisions: per group, the id of the member to keep (the others are its duplicates),
    or None for "not duplicates". One transaction; a file decided before gets the new decision.
    Returns how many groups were stored."""
    rows: dict[tuple[str, str], tuple[Any, ...]] = {}  # a file named twice gets its last decision
    n = 0
    for group, keep in choices:
        ids = {m.id for m in group.members}
        if keep is not None and keep not in ids:
            raise InvalidInput(f"image {keep} is not in the group it is to be kept from")
        keeper = next((m for m in group.members if m.id == keep), None)
        decision = uuid.uuid4()
        for m in group.members:
            role = "distinct" if keeper is None else "keep" if m.id == keep else "dupe"
            distance = None if keeper is None else _distance(group, keeper, m)
            rows[(m.sha256, m.path)] = (m.sha256, m.path, decision, role, distance)
        n += 1
    if not rows:
        return 0
    # One statement over arrays, not a statement per file: 2,400 groups (7,200 files) in one round
    # trip (docs/benchmarks.md, the duplicate review).
    columns = [list(c) for c in zip(*rows.values(), strict=True)]
    conn.execute(
        "INSERT INTO vecsearch_dupe_decisions (sha256, path, decision, role, distance, threshold) "
        "SELECT sha256, path, decision, role, distance, %s "
        "FROM unnest(%b::text[], %b::text[], %b::uuid[], %b::text[], %b::float8[]) "
        "AS u(sha256, path, decision, role, distance) "
        "ON CONFLICT (sha256, path) DO UPDATE SET "
        "decision = EXCLUDED.decision, role = EXCLUDED.role, distance = EXCLUDED.distance, "
        "threshold = EXCLUDED.threshold, decided_at = now()", [threshold, *columns])
    return n


def _distance(group: Group, keeper: Member, m: Member) -> float | None:
    """Cosine distance to the chosen keeper where known: the group's distances are to the rule's
    keeper, so a user-picked keeper leaves the others' NULL."""
    if m.id == keeper.id:
        return 0.0
    return m.distance if keeper.id == group.keeper.id else None


def export(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every decision, one row per file, keepers first within a decision (oldest decision first)."""
    cur = conn.execute(
        "SELECT decision::text, role, path, sha256, distance, threshold, decided_at "
        "FROM vecsearch_dupe_decisions "
        "ORDER BY min(decided_at) OVER (PARTITION BY decision), decision, role <> 'keep', path")
    names = [c.name for c in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def move_script(rows: Sequence[dict[str, Any]], folder: str) -> str:
    """A POSIX shell script moving each decided duplicate (role 'dupe') into `folder`, under its
    own absolute path (so nothing collides, and moving back is obvious). Each file moves only if
    it still has the decided content and its keeper is still there; mv -n never overwrites."""
    if not folder:
        raise InvalidInput("--move-to needs a folder")
    keepers = {r["decision"]: r for r in rows if r["role"] == "keep"}
    lines = ["#!/bin/sh", "# Written by `vecsearch dupes --decisions --move-to`: read it, then run it.",
             "# Moves the duplicates you decided on; keepers and files not decided stay where they are.",
             "set -u", f"dest={shlex.quote(folder)}", "moved=0 skipped=0",
             "same() { [ -f \"$1\" ] && [ \"$(sha256sum < \"$1\" | cut -d' ' -f1)\" = \"$2\" ]; }",
             "move() {  # file sha256 keeper keeper_sha256",
             "  if same \"$1\" \"$2\" && same \"$3\" \"$4\"; then",
             "    mkdir -p -- \"$dest$(dirname -- \"$1\")\" && mv -n -- \"$1\" \"$dest$1\" "
             "&& moved=$((moved + 1)) && return",
             "  fi",
             "  echo \"skipped (changed, gone, or its keeper is): $1\" >&2; skipped=$((skipped + 1))",
             "}"]
    for r in rows:
        keeper = keepers.get(r["decision"])
        if r["role"] != "dupe" or keeper is None:
            continue
        lines.append("move " + " ".join(shlex.quote(v) for v in
                                        (r["path"], r["sha256"], keeper["path"], keeper["sha256"])))
    lines.append('echo "$moved moved to $dest, $skipped skipped" >&2')
    return "\n".join(lines) + "\n"
