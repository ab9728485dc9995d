"""Retrieval quality on the user's own images: `vecsearch eval perturb` and `vecsearch eval labels`.

Both experiments embed their images into a scratch schema (vecsearch/scratch.py), never into the
user's `images` table, then ask every query image for its neighbours twice, with `vecsearch
similar`'s own query: through the HNSW index, and exactly. Metrics and perturbations are in
vecsearch/eval/metrics.py, plots in vecsearch/eval/plots.py. Library functions return a `Report`; the CLI
renders it as a table, JSON or a plot.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from .. import db
from ..config import Settings
from ..errors import InvalidInput, VecsearchError
from ..limits import DEFAULT_EF_SEARCH, check_ef_search, check_k
from ..progress import Progress
from ..scratch import scratch_schema
from .metrics import (
    DEFAULT_PERTURBATIONS,
    PERTURBATIONS,
    label_precision,
    mean_precision_recall_f1,
    perturbed,
    recall_against_exact,
)

if TYPE_CHECKING:

    from ..embed import Embedder

# Working copies are made from the original scaled to fit this many pixels: the model sees
# 224 x 224 after resizing anyway, and full-size PNGs of 12-megapixel photos are slow to write.
WORK_PX = 1024


@dataclass
class Report:
    """What an experiment measured: one metrics row per k, plus per-group details."""

    experiment: str
    model: str
    images: int  # embedded into the scratch schema
    queries: int
    ks: list[int]
    ef_search: int | None  # what the queries ran at: the database's own when none was given
    columns: list[str]  # of `metrics`, "k" first
    metrics: list[dict[str, float]]
    detail_columns: list[str]
    details: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    # Each query's neighbours, so a report can be checked and its failures looked at:
    # {"query": name, "relevant": [names] (perturb) or "label" (labels), "ann": [[name, distance]],
    #  "exact": [[name, distance]]}. Names: "<n>_<perturbation>" (perturb, n indexes `originals`),
    # the image's path relative to DIR (labels).
    per_query: list[dict[str, Any]] = field(default_factory=list)
    originals: list[str] = field(default_factory=list)  # perturb: the source file of each n
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- neighbours in the scratch schema --------------------------------------------------------


def neighbours(conn: psycopg.Connection, schema: str, ids: Sequence[int], k: int, *, exact: bool,
               ef_search: int | None = None) -> dict[int, list[tuple[int, float]]]:
    """The k nearest (id, distance) of each id, itself excluded: `vecsearch similar`'s own query
    (the `vecsearch_similar` function, which query.similar calls), one statement for all ids, with
    `schema` first on the search path, exact or through the HNSW index. `ef_search` None: the
    database's own (`vecsearch db recall --tune`), exactly as `vecsearch similar` leaves it."""
    out: dict[int, list[tuple[int, float]]] = {int(q): [] for q in ids}
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(sql.Identifier(schema)))
        rows = conn.execute(
            "SELECT q.id, n.id, n.distance FROM images q CROSS JOIN LATERAL vecsearch_similar("
            "q.id, k => %(k)s, ef_search => %(ef)s, exact => %(exact)s) n WHERE q.id = ANY(%(ids)s)",
            {"k": k, "ef": ef_search, "exact": exact, "ids": [int(q) for q in ids]})
        for qid, nid, distance in rows:
            out[qid].append((nid, distance))
    for found in out.values():
        found.sort(key=lambda pair: (pair[1], pair[0]))  # the function's own order
    return out


# -- the experiments -------------------------------------------------------------------------


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks:
        raise InvalidInput("give at least one k value")
    return [check_k(k) for k in ks]


def _embed_into_scratch(settings: Settings, conn: psycopg.Connection, schema: str, folder: Path,
                        embedder: Embedder, progress: Progress | None,
                        skipped: list[tuple[str, str]]) -> dict[str, int]:
    """Load `folder` into the scratch schema; return {absolute path: id}; failures go to `skipped`."""
    from ..load import load

    summary = load(settings, folder, embedder, schema=schema, progress=progress)
    skipped += summary.failed
    rows = conn.execute(sql.SQL("SELECT path, id FROM {}.images").format(sql.Identifier(schema))).fetchall()
    return {path: id_ for path, id_ in rows}


def _metric_rows(ks: list[int], ann: Mapping[int, Sequence[int]], exact: Mapping[int, Sequence[int]],
                 relevant: Mapping[int, Collection[int]]) -> list[dict[str, float]]:
    rows = []
    for k in ks:
        row: dict[str, float] = {"k": k}
        for method, results in (("ann", ann), ("exact", exact)):
            p, r, f1 = mean_precision_recall_f1(results, relevant, k)
            row |= {f"{method}_precision": p, f"{method}_recall": r, f"{method}_f1": f1}
        row["ann_recall_vs_exact"] = recall_against_exact(ann, exact, k)
        rows.append(row)
    return rows


def _model_name(embedder: Embedder) -> str:
    record = getattr(embedder, "record", None)
    return record.describe() if record is not None else type(embedder).__name__


def perturb(settings: Settings, folder: str | os.PathLike, embedder: Embedder, *, originals: int = 20,
            ks: Sequence[int] = (1, 3, 5, 10), perturbations: Sequence[str] = DEFAULT_PERTURBATIONS,
            seed: int = 0, ef_search: int | None = None, progress: Progress | None = None) -> Report:
    """The perturbation-recovery experiment: can each original find its own perturbed copies?

    `originals` images are drawn (seeded) from `folder`; each gets one copy per perturbation.
    Originals and copies are embedded into a scratch schema; each original queries its k
    nearest, and its own copies are the relevant ones. Precision@k is at most
    len(perturbations) / k for k above the number of copies.
    """
    import numpy as np

    from ..images import find_images

    started = time.perf_counter()
    ks = _check_ks(ks)
    if ef_search is not None:
        check_ef_search(ef_search)
    perturbations = _check_perturbations(perturbations, originals)
    found = find_images(folder)
    files = [c.path for c in found.files]
    report = Report("perturb", _model_name(embedder), 0, 0, ks, ef_search, [], [], [], [],
                    skipped=list(found.failed))
    with tempfile.TemporaryDirectory(prefix="vecsearch-eval-") as tmp:
        work = Path(tmp)
        order = np.random.default_rng(seed).permutation(len(files))
        chosen = _write_copies([files[i] for i in order], originals, perturbations, seed, work,
                               report.skipped, progress)
        if len(chosen) < 2:
            raise InvalidInput(f"{folder} has {len(chosen)} readable image(s): eval perturb needs at least 2")
        if len(chosen) < originals:
            report.notes.append(f"only {len(chosen)} readable images in the folder: {len(chosen)} originals")
        with db.connect(settings) as conn, scratch_schema(conn) as schema:
            report.ef_search = ef_search or db.database_ef_search(conn) or DEFAULT_EF_SEARCH
            ids = _embed_into_scratch(settings, conn, schema, work, embedder, progress, report.skipped)
            by_number: dict[int, dict[str, int]] = {}  # original number -> {kind: id}
            for path, id_ in ids.items():
                number, _, kind = Path(path).stem.partition("_")
                by_number.setdefault(int(number), {})[kind] = id_
            # Each original queries; its own copies are the relevant images.
            relevant = {kinds["original"]: {i for kind, i in kinds.items() if kind != "original"}
                        for kinds in by_number.values() if "original" in kinds}
            queries = sorted(relevant)
            if len(queries) < 2:
                raise InvalidInput("fewer than 2 originals could be embedded: see the skipped files")
            report.images, report.queries = len(ids), len(queries)
            kmax = ks[-1]
            ann, exact = _ann_and_exact(conn, schema, queries, kmax, ef_search, progress)
            ann_ids = {q: [i for i, _ in found] for q, found in ann.items()}
            exact_ids = {q: [i for i, _ in found] for q, found in exact.items()}
            name = {id_: Path(path).stem for path, id_ in ids.items()}
            report.originals = [path for _, path in chosen]
            report.per_query = [
                _query_record(q, name, ann, exact, relevant=sorted(name[i] for i in relevant[q]))
                for q in queries]
            report.columns = ["k", "ann_precision", "ann_recall", "ann_f1", "exact_precision", "exact_recall",
                              "exact_f1", "ann_recall_vs_exact"]
            report.metrics = _metric_rows(ks, ann_ids, exact_ids, relevant)
            _perturb_details(conn, schema, report, by_number, ann_ids, perturbations, kmax)
    if report.skipped:
        report.notes.append(f"{len(report.skipped)} files skipped (unreadable or failed to embed)")
    report.seconds = time.perf_counter() - started
    return report


def _check_perturbations(perturbations: Sequence[str], originals: int) -> list[str]:
    unknown = [p for p in perturbations if p not in PERTURBATIONS]
    if unknown or not perturbations:
        raise InvalidInput(f"unknown perturbation {', '.join(unknown) or '(none given)'}: choose from "
                           f"{', '.join(PERTURBATIONS)}")
    if originals < 2:
        raise InvalidInput("--originals must be at least 2 (an original is judged against the others)")
    return list(dict.fromkeys(perturbations))


def _ann_and_exact(conn: psycopg.Connection, schema: str, queries: Sequence[int], k: int,
                   ef_search: int | None,
                   progress: Progress | None) -> tuple[dict, dict]:
    """Each query's k nearest through the HNSW index, then exactly."""
    found = []
    for exact in (False, True):
        if progress:
            progress.start(len(queries), "query (exact)" if exact else "query (HNSW)")
        found.append(neighbours(conn, schema, queries, k, exact=exact, ef_search=ef_search))
        if progress:
            progress.advance(len(queries))
            progress.stop()
    return found[0], found[1]


def _write_copies(files: Sequence[str], originals: int, perturbations: Sequence[str], seed: int,
                  work: Path, skipped: list[tuple[str, str]], progress: Progress | None
                  ) -> list[tuple[int, str]]:
    """The first `originals` readable files (in the order given) copied into `work` as
    NNNNN_original.EXT, with one NNNNN_<perturbation>.png each; [(NNNNN, source path)]."""
    from ..images import open_image

    if progress:
        progress.start(min(originals, len(files)), "prepare")
    chosen: list[tuple[int, str]] = []
    for path in files:
        if len(chosen) == originals:
            break
        try:
            img = open_image(path, draft=WORK_PX)
        except VecsearchError as e:
            skipped.append((path, str(e)))
            continue
        n = len(chosen)
        chosen.append((n, path))
        shutil.copyfile(path, work / f"{n:05d}_original{Path(path).suffix.lower() or '.img'}")
        img.thumbnail((WORK_PX, WORK_PX))
        for name in perturbations:
            perturbed(img, name, seed, n).save(work / f"{n:05d}_{name}.png")
        if progress:
            progress.advance(1)
    if progress:
        progress.stop()
    return chosen


def _perturb_details(conn: psycopg.Connection, schema: str, report: Report,
                     by_number: dict[int, dict[str, int]], ann_ids: Mapping[int, Sequence[int]],
                     perturbations: Sequence[str], kmax: int) -> None:
    """Per perturbation: distances of the copies to their original, and how often ANN top-k finds them.

    Plus the distance from each original to its nearest image that is not one of its copies:
    a near-duplicate threshold (`vecsearch dupes --threshold`) belongs between the two.
    """
    import numpy as np

    s = sql.Identifier(schema)
    pairs = [(kinds["original"], kinds[name], name) for kinds in by_number.values() if "original" in kinds
             for name in perturbations if name in kinds]
    distance = {}
    if pairs:
        rows = conn.execute(sql.SQL(
            "SELECT p.a, p.b, a.embedding <=> b.embedding FROM unnest(%s::bigint[], %s::bigint[]) AS p(a, b) "
            "JOIN {s}.images a ON a.id = p.a JOIN {s}.images b ON b.id = p.b").format(s=s),
            [[a for a, _, _ in pairs], [b for _, b, _ in pairs]]).fetchall()
        distance = {(a, b): d for a, b, d in rows}
    for name in perturbations:
        mine = [(a, b) for a, b, kind in pairs if kind == name]
        d = np.array([distance[p] for p in mine if p in distance])
        hits = sum(1 for a, b in mine if b in ann_ids.get(a, [])[:kmax])
        report.details.append({
            "perturbation": name, "copies": len(mine),
            "distance_median": float(np.median(d)) if len(d) else None,
            "distance_max": float(d.max()) if len(d) else None,
            f"found_at_{kmax}": hits / len(mine) if mine else None,
            "description": PERTURBATIONS[name].description,
        })
    report.detail_columns = ["perturbation", "copies", "distance_median", "distance_max",
                             f"found_at_{kmax}", "description"]
    nearest_other = []
    for kinds in by_number.values():
        if "original" not in kinds:
            continue
        row = conn.execute(sql.SQL(
            "SELECT min(c.embedding <=> q.embedding) FROM {s}.images q, {s}.images c "
            "WHERE q.id = %s AND NOT c.id = ANY(%s)").format(s=s),
            [kinds["original"], list(kinds.values())]).fetchone()
        if row[0] is not None:
            nearest_other.append(row[0])
    all_copies = [d for d in distance.values()]
    if all_copies and nearest_other:
        far, near = max(all_copies), min(nearest_other)
        report.notes.append(
            f"copies lie at cosine distance <= {far:.4f} from their original; the nearest other image "
            f"at >= {near:.4f} (median {float(np.median(nearest_other)):.4f}). "
            + ("A `vecsearch dupes --threshold` between the two separates them on this set."
               if far < near else "No threshold separates them all on this set."))


def _query_record(q: int, name: Mapping[int, str], ann: Mapping[int, list[tuple[int, float]]],
                  exact: Mapping[int, list[tuple[int, float]]], **extra: Any) -> dict[str, Any]:
    return {"query": name[q], **extra, "ann": [[name[i], d] for i, d in ann[q]],
            "exact": [[name[i], d] for i, d in exact[q]]}


def labels(settings: Settings, folder: str | os.PathLike, embedder: Embedder, *,
           ks: Sequence[int] = (1, 5, 10), per_label: int | None = None, seed: int = 0,
           ef_search: int | None = None, progress: Progress | None = None) -> Report:
    """Precision@k of same-label neighbours, for a folder laid out as DIR/<label>/<images>.

    Every image (or `per_label` drawn per label, seeded) is embedded into a scratch schema and
    queries its k nearest; precision@k is the fraction of them sharing its label, averaged
    over all queries. Images directly in DIR (no label) are ignored.
    """
    import numpy as np

    from ..images import find_images

    started = time.perf_counter()
    ks = _check_ks(ks)
    if ef_search is not None:
        check_ef_search(ef_search)
    root = Path(folder).expanduser()
    found = find_images(root)
    by_label: dict[str, list[str]] = {}
    top = os.path.abspath(root)
    for c in found.files:
        relative = os.path.relpath(c.path, top).split(os.sep)
        if len(relative) > 1:
            by_label.setdefault(relative[0], []).append(c.path)
    if len(by_label) < 2:
        raise InvalidInput(f"{root} needs at least 2 sub-folders of images, one per label (the ImageFolder "
                           f"layout DIR/<label>/<image>); found {len(by_label)}")
    rng = np.random.default_rng(seed)
    report = Report("labels", _model_name(embedder), 0, 0, ks, ef_search, [], [], [], [],
                    skipped=list(found.failed))
    with tempfile.TemporaryDirectory(prefix="vecsearch-eval-") as tmp:
        work = Path(tmp)
        source_of = _link_labelled(by_label, per_label, rng, work)
        names = {f"{n:04d}": label for n, label in enumerate(sorted(by_label))}
        with db.connect(settings) as conn, scratch_schema(conn) as schema:
            report.ef_search = ef_search or db.database_ef_search(conn) or DEFAULT_EF_SEARCH
            ids = _embed_into_scratch(settings, conn, schema, work, embedder, progress, report.skipped)
            prefix = os.path.abspath(work)
            label_of = {id_: names[os.path.relpath(path, prefix).split(os.sep)[0]]
                        for path, id_ in ids.items()}
            name = {id_: os.path.relpath(source_of[path], top) for path, id_ in ids.items()}
            queries = sorted(label_of)
            report.images = report.queries = len(queries)
            kmax = ks[-1]
            ann, exact = _ann_and_exact(conn, schema, queries, kmax, ef_search, progress)
    report.per_query = [_query_record(q, name, ann, exact, label=label_of[q]) for q in queries]
    _label_metrics(report, ann, exact, label_of)
    if report.skipped:
        report.notes.append(f"{len(report.skipped)} files skipped (unreadable or failed to embed)")
    report.seconds = time.perf_counter() - started
    return report


def _link_labelled(by_label: Mapping[str, list[str]], per_label: int | None, rng,
                   work: Path) -> dict[str, str]:
    """Symbolic links to the chosen files under work/NNNN/ (NNNN: the label's number); {link: source}."""
    source_of: dict[str, str] = {}
    for n, (_label, paths) in enumerate(sorted(by_label.items())):
        if per_label is not None and len(paths) > per_label:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), per_label, replace=False))]
        (work / f"{n:04d}").mkdir()
        for i, path in enumerate(paths):
            link = work / f"{n:04d}" / f"{i:06d}{Path(path).suffix.lower()}"
            _link(path, link)
            source_of[os.path.abspath(link)] = path
    return source_of


def _label_metrics(report: Report, ann: Mapping, exact: Mapping, label_of: Mapping[int, str]) -> None:
    """Precision of same-label neighbours at each k (ANN and exact), and per label at the largest k."""
    queries, ks = sorted(label_of), report.ks
    ann_ids = {q: [i for i, _ in found] for q, found in ann.items()}
    exact_ids = {q: [i for i, _ in found] for q, found in exact.items()}
    ann_labels = {q: [label_of[i] for i in found] for q, found in ann_ids.items()}
    exact_labels = {q: [label_of[i] for i in found] for q, found in exact_ids.items()}
    report.columns = ["k", "ann_precision", "exact_precision", "ann_recall_vs_exact"]
    for k in ks:
        report.metrics.append({
            "k": k,
            "ann_precision": _mean([label_precision(ann_labels[q], label_of[q], k) for q in queries]),
            "exact_precision": _mean([label_precision(exact_labels[q], label_of[q], k) for q in queries]),
            "ann_recall_vs_exact": recall_against_exact(ann_ids, exact_ids, k),
        })
    counts: dict[str, int] = {}
    for label in label_of.values():
        counts[label] = counts.get(label, 0) + 1
    kmax = ks[-1]
    for label in sorted(counts):
        mine = [q for q in queries if label_of[q] == label]
        report.details.append({"label": label, "images": counts[label],
                               f"ann_precision_at_{kmax}": _mean([label_precision(ann_labels[q], label, kmax)
                                                                  for q in mine])})
    report.detail_columns = ["label", "images", f"ann_precision_at_{kmax}"]
    if min(counts.values()) <= kmax:
        report.notes.append(f"some labels have {min(counts.values())} images or fewer, so their "
                            f"precision@{kmax} cannot reach 1")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _link(source: str, target: Path) -> None:
    try:
        target.symlink_to(source)
    except OSError:  # no symlinks here (Windows without the privilege): copy
        shutil.copyfile(source, target)
