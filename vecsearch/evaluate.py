"""Retrieval quality on the user's own images: `vecsearch eval perturb` and `vecsearch eval labels`.

Both experiments embed their images into a scratch schema (`vecsearch_eval_*`, a copy of the
public tables, dropped at the end), never into the user's `images` table, then ask every query
image for its neighbours twice: through the HNSW index (halfvec candidates re-ranked by the
exact distance, as `vecsearch similar` does) and by the exact scan. Library functions return a
`Report`; the CLI renders it as a table, JSON or a plot, and the web app can do the same.

Metrics, per query, then averaged over queries (macro average):
- precision@k = relevant images among the k nearest / k;
- recall@k    = relevant images among the k nearest / all relevant images;
- F1@k        = 2 P R / (P + R) of that query (0 when both are 0);
- ANN recall@k against exact = |ANN top k & exact top k| / k.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from . import db, server
from .config import Settings
from .errors import InvalidInput, VecsearchError
from .limits import DEFAULT_EF_SEARCH
from .query import check_ef_search

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from .embed import Embedder

SCRATCH_PREFIX = "vecsearch_eval_"
# Working copies are made from the original scaled to fit this many pixels: the model sees
# 224 x 224 after resizing anyway, and full-size PNGs of 12-megapixel photos are slow to write.
WORK_PX = 1024
# (stage, done, total): "prepare", "embed", "query".
Progress = Callable[[str, int, int], None]


# -- metrics (pure functions, on ids) --------------------------------------------------------


def precision_recall_f1(retrieved: Sequence[Any], relevant: Collection[Any], k: int
                        ) -> tuple[float, float, float]:
    """precision@k, recall@k and F1@k of one ranked list (fewer than k retrieved count as misses)."""
    if k < 1:
        raise ValueError("k must be >= 1")
    hits = len(set(retrieved[:k]) & set(relevant))
    precision = hits / k
    recall = hits / len(relevant) if relevant else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return precision, recall, f1


def mean_precision_recall_f1(results: Mapping[Any, Sequence[Any]], relevant: Mapping[Any, Collection[Any]],
                             k: int) -> tuple[float, float, float]:
    """Means over queries (the keys of `results`) of precision@k, recall@k and F1@k."""
    if not results:
        raise ValueError("no queries")
    scores = [precision_recall_f1(results[q], relevant[q], k) for q in results]
    return tuple(sum(s[i] for s in scores) / len(scores) for i in range(3))  # type: ignore[return-value]


def recall_against_exact(ann: Mapping[Any, Sequence[Any]], exact: Mapping[Any, Sequence[Any]],
                         k: int) -> float:
    """Mean over queries of |ANN top k & exact top k| / k (the usual ANN recall@k)."""
    if not ann:
        raise ValueError("no queries")
    return sum(len(set(ann[q][:k]) & set(exact[q][:k])) / k for q in ann) / len(ann)


def label_precision(retrieved_labels: Sequence[str], label: str, k: int) -> float:
    """Fraction of the k nearest whose label is the query's (fewer than k retrieved count as misses)."""
    return sum(1 for x in retrieved_labels[:k] if x == label) / k


# -- perturbations ---------------------------------------------------------------------------


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    keep = rng.uniform(0.6, 0.8)
    cw, ch = max(1, int(w * keep)), max(1, int(h * keep))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), _resampling().BICUBIC)


def _rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(10, 25) * rng.choice([-1, 1])
    return img.rotate(angle, _resampling().BICUBIC, expand=False)


def _color(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    import numpy as np
    from PIL import Image, ImageEnhance

    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.6, 1.4))
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.uniform(-0.05, 0.05) * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    from PIL import ImageFilter

    return img.filter(ImageFilter.GaussianBlur(max(img.size) * rng.uniform(0.01, 0.02)))


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    from PIL import Image

    w, h = img.size
    small = img.resize((max(1, w // 2), max(1, h // 2)), _resampling().BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=int(rng.integers(20, 41)))
    buf.seek(0)
    return Image.open(buf)


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    import numpy as np
    from PIL import Image

    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0, rng.uniform(10, 20), a.shape)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")


def _flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.mirror(img)


def _resampling():
    from PIL import Image

    return Image.Resampling


@dataclass(frozen=True)
class Perturbation:
    name: str
    description: str
    apply: Callable[[Image.Image, np.random.Generator], Image.Image]


PERTURBATIONS = {p.name: p for p in [
    Perturbation("crop", "random crop keeping 60-80% of each side, resized back to full size", _crop),
    Perturbation("rotate", "rotation by 10-25 degrees either way, same size, black corners", _rotate),
    Perturbation("color", "colour jitter: brightness, contrast, saturation x0.6-1.4 each, hue +-0.05 turn",
                 _color),
    Perturbation("blur", "Gaussian blur, radius 1-2% of the longer side", _blur),
    Perturbation("jpeg", "halved in size, re-encoded as JPEG at quality 20-40", _jpeg),
    Perturbation("noise", "Gaussian pixel noise, sigma 10-20 (of 255)", _noise),
    Perturbation("flip", "mirrored left-right", _flip),
]}
DEFAULT_PERTURBATIONS = ("crop", "rotate", "color", "blur", "jpeg")


def perturbed(img: Image.Image, name: str, seed: int, index: int) -> Image.Image:
    """`img` (RGB) perturbed by PERTURBATIONS[name], reproducibly for (seed, index, name)."""
    import numpy as np

    kind = list(PERTURBATIONS).index(name)
    return PERTURBATIONS[name].apply(img, np.random.default_rng([seed, index, kind])).convert("RGB")


# -- reports ---------------------------------------------------------------------------------


@dataclass
class Report:
    """What an experiment measured: one metrics row per k, plus per-group details."""

    experiment: str
    model: str
    images: int  # embedded into the scratch schema
    queries: int
    ks: list[int]
    ef_search: int
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


def plot_available() -> None:
    """Raise a one-line error naming the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise VecsearchError("--plot needs matplotlib, which is not installed: pip install "
                             "'vecsearch[plot]' (or pip install matplotlib)") from None


def plot(report: Report, path: Path) -> None:
    """One curve per metric against k (ANN solid, exact dashed), written as a PNG."""
    plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours = {}
    for column in report.columns[1:]:
        method, _, metric = column.partition("_")
        colour = colours.setdefault(metric, f"C{len(colours)}")
        # exact: wide, dashed, hollow markers underneath, so equal ANN curves do not hide them
        if method == "exact":
            style = dict(linestyle="--", linewidth=3, alpha=0.5, marker="s", markersize=9,
                         markerfacecolor="none")
        else:
            style = dict(linestyle="-", linewidth=1.5, marker="o", markersize=4)
        ax.plot(report.ks, [row[column] for row in report.metrics], color=colour,
                label=column.replace("_", " "), zorder=1 if method == "exact" else 2, **style)
    ax.set_xlabel("k")
    ax.set_xticks(report.ks)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"vecsearch eval {report.experiment}: {report.queries} queries, {report.images} images\n"
                 f"{report.model}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- scratch schema --------------------------------------------------------------------------


@contextmanager
def scratch_schema(conn: psycopg.Connection) -> Iterator[str]:
    """A new schema holding empty copies of the public vecsearch tables, dropped on exit.

    Every table, index (under the same names: a load that drops and rebuilds
    `images_embedding_hnsw` with `search_path = scratch, public` must find the scratch one)
    and storage option is copied. Schemas left by killed runs on this machine are dropped first.
    """
    drop_stale_scratch_schemas(conn)
    name = f"{SCRATCH_PREFIX}{_host_tag()}_{os.getpid()}_{secrets.token_hex(4)}"
    schema = sql.Identifier(name)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            tables = conn.execute(
                "SELECT c.relname, c.reloptions FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> 'alembic_version'"
            ).fetchall()
            for table, options in tables:
                conn.execute(sql.SQL("CREATE TABLE {}.{} (LIKE public.{} INCLUDING ALL)").format(
                    schema, sql.Identifier(table), sql.Identifier(table)))
                if options:
                    conn.execute(sql.SQL("ALTER TABLE {}.{} SET ({})").format(
                        schema, sql.Identifier(table), sql.SQL(", ").join(sql.SQL(o) for o in options)))
                _copy_index_names(conn, name, table)
        yield name
    finally:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))


def _copy_index_names(conn: psycopg.Connection, schema: str, table: str) -> None:
    def indexes(nspname: str) -> dict[str, str]:
        rows = conn.execute(
            "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s AND t.relname = %s",
            [nspname, table]).fetchall()
        # The definition without its own name and table, as a key.
        return {(d.startswith("CREATE UNIQUE"), d.split(" USING ", 1)[1]): n for n, d in rows}

    public, scratch = indexes("public"), indexes(schema)
    for definition, wanted in public.items():
        have = scratch.get(definition)
        if have is None:
            raise VecsearchError(f"the scratch copy of {table} lacks the index {wanted}")
        if have != wanted:
            conn.execute(sql.SQL("ALTER INDEX {}.{} RENAME TO {}").format(
                sql.Identifier(schema), sql.Identifier(have), sql.Identifier(wanted)))


def _host_tag() -> str:
    """Six hex digits of this machine's name: a pid only says something about its own host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def drop_stale_scratch_schemas(conn: psycopg.Connection) -> list[str]:
    """Drop the scratch schemas of evals on this machine that were killed (their process gone)."""
    mine = f"{SCRATCH_PREFIX}{_host_tag()}_"
    stale = []
    for (name,) in conn.execute("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)",
                                [mine]).fetchall():
        pid = name.removeprefix(mine).split("_", 1)[0]
        if pid.isdigit() and not server.pid_alive(int(pid)):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
            stale.append(name)
    return stale


# -- neighbours in the scratch schema --------------------------------------------------------


def neighbours(conn: psycopg.Connection, schema: str, ids: Sequence[int], k: int, *, exact: bool,
               ef_search: int = DEFAULT_EF_SEARCH, chunk: int = 256) -> dict[int, list[tuple[int, float]]]:
    """The k nearest (id, distance) of each id, itself excluded, exact or through the HNSW index.

    The ANN way is `vecsearch similar`'s: max(k, ef_search) candidates from the index on
    `embedding::halfvec(2048)`, re-ranked by the exact distance. The index is used even on a
    small table (enable_seqscan off), so the ANN figures measure the index.
    """
    candidates = k if exact else max(k, ef_search)
    order = sql.SQL("c.embedding <=> q.embedding, c.id" if exact else f"c.{db.ANN_EXPR} <=> q.{db.ANN_EXPR}")
    query = sql.SQL("""
        SELECT q.id, n.id, n.distance
        FROM {s}.images q
        CROSS JOIN LATERAL (
            SELECT c.id, c.embedding <=> q.embedding AS distance
            FROM {s}.images c
            WHERE c.id <> q.id
            ORDER BY {order}
            LIMIT %(limit)s
        ) n
        WHERE q.id = ANY(%(ids)s)
    """).format(s=sql.Identifier(schema), order=order)
    out: dict[int, list[tuple[int, float]]] = {int(i): [] for i in ids}
    with conn.transaction():
        conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        conn.execute(f"SET LOCAL hnsw.ef_search = {int(candidates)}")
        conn.execute(f"SET LOCAL enable_seqscan = {'on' if exact else 'off'}")
        for start in range(0, len(ids), chunk):
            batch = [int(i) for i in ids[start:start + chunk]]
            for qid, nid, distance in conn.execute(query, {"ids": batch, "limit": candidates}, prepare=False):
                out[qid].append((nid, distance))
    for found in out.values():
        found.sort(key=lambda pair: (pair[1], pair[0]))
        del found[k:]
    return out


# -- the experiments -------------------------------------------------------------------------


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > 1000:
        raise InvalidInput(f"k values must be between 1 and 1000, not {ks}")
    return ks


def _embed_into_scratch(settings: Settings, conn: psycopg.Connection, schema: str, folder: Path,
                        embedder: Embedder, progress: Progress | None,
                        skipped: list[tuple[str, str]]) -> dict[str, int]:
    """Load `folder` into the scratch schema; return {absolute path: id}; failures go to `skipped`."""
    from .load import load

    def on_load(done: int, total: int) -> None:
        if progress:
            progress("embed", done, total)

    summary = load(settings, folder, embedder, schema=schema, progress=on_load if progress else None)
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
            seed: int = 0, ef_search: int = DEFAULT_EF_SEARCH, progress: Progress | None = None) -> Report:
    """The perturbation-recovery experiment: can each original find its own perturbed copies?

    `originals` images are drawn (seeded) from `folder`; each gets one copy per perturbation.
    Originals and copies are embedded into a scratch schema; each original queries its k
    nearest, and its own copies are the relevant ones. Precision@k is at most
    len(perturbations) / k for k above the number of copies.
    """
    import numpy as np

    from .images import find_images, open_image

    started = time.perf_counter()
    ks = _check_ks(ks)
    check_ef_search(ef_search)
    unknown = [p for p in perturbations if p not in PERTURBATIONS]
    if unknown or not perturbations:
        raise InvalidInput(f"unknown perturbation {', '.join(unknown) or '(none given)'}: choose from "
                           f"{', '.join(PERTURBATIONS)}")
    perturbations = list(dict.fromkeys(perturbations))
    if originals < 2:
        raise InvalidInput("--originals must be at least 2 (an original is judged against the others)")
    found = find_images(folder)
    files = [c.path for c in found.files]
    skipped = list(found.failed)
    order = np.random.default_rng(seed).permutation(len(files))
    report = Report("perturb", _model_name(embedder), 0, 0, ks, ef_search, [], [], [], [], skipped=skipped)
    with tempfile.TemporaryDirectory(prefix="vecsearch-eval-") as tmp:
        work = Path(tmp)
        chosen: list[tuple[int, str]] = []  # (index, source path)
        for i in order:
            if len(chosen) == originals:
                break
            try:
                img = open_image(files[i], draft=WORK_PX)
            except VecsearchError as e:
                skipped.append((files[i], str(e)))
                continue
            n = len(chosen)
            chosen.append((n, files[i]))
            suffix = Path(files[i]).suffix.lower() or ".img"
            shutil.copyfile(files[i], work / f"{n:05d}_original{suffix}")
            img.thumbnail((WORK_PX, WORK_PX))
            for name in perturbations:
                copy = perturbed(img, name, seed, n)
                copy.save(work / f"{n:05d}_{name}.png")
            if progress:
                progress("prepare", len(chosen), min(originals, len(files)))
        if len(chosen) < 2:
            raise InvalidInput(f"{folder} has {len(chosen)} readable image(s): eval perturb needs at least 2")
        if len(chosen) < originals:
            report.notes.append(f"only {len(chosen)} readable images in the folder: {len(chosen)} originals")
        with db.connect(settings) as conn, scratch_schema(conn) as schema:
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
            if progress:
                progress("query", 0, 2)
            ann = neighbours(conn, schema, queries, kmax, exact=False, ef_search=ef_search)
            if progress:
                progress("query", 1, 2)
            exact = neighbours(conn, schema, queries, kmax, exact=True)
            if progress:
                progress("query", 2, 2)
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
           ef_search: int = DEFAULT_EF_SEARCH, progress: Progress | None = None) -> Report:
    """Precision@k of same-label neighbours, for a folder laid out as DIR/<label>/<images>.

    Every image (or `per_label` drawn per label, seeded) is embedded into a scratch schema and
    queries its k nearest; precision@k is the fraction of them sharing its label, averaged
    over all queries. Images directly in DIR (no label) are ignored.
    """
    import numpy as np

    from .images import find_images

    started = time.perf_counter()
    ks = _check_ks(ks)
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
        # Symbolic links to the chosen files under <label>/: the label is the first path part.
        source_of: dict[str, str] = {}
        for n, (_label, paths) in enumerate(sorted(by_label.items())):
            if per_label is not None and len(paths) > per_label:
                paths = [paths[i] for i in sorted(rng.choice(len(paths), per_label, replace=False))]
            (work / f"{n:04d}").mkdir()
            for i, path in enumerate(paths):
                link = work / f"{n:04d}" / f"{i:06d}{Path(path).suffix.lower()}"
                _link(path, link)
                source_of[os.path.abspath(link)] = path
        names = {f"{n:04d}": label for n, label in enumerate(sorted(by_label))}
        with db.connect(settings) as conn, scratch_schema(conn) as schema:
            ids = _embed_into_scratch(settings, conn, schema, work, embedder, progress, report.skipped)
            prefix = os.path.abspath(work)
            label_of = {id_: names[os.path.relpath(path, prefix).split(os.sep)[0]]
                        for path, id_ in ids.items()}
            name = {id_: os.path.relpath(source_of[path], top) for path, id_ in ids.items()}
            queries = sorted(label_of)
            report.images = report.queries = len(queries)
            kmax = ks[-1]
            ann = neighbours(conn, schema, queries, kmax, exact=False, ef_search=ef_search)
            exact = neighbours(conn, schema, queries, kmax, exact=True)
    ann_ids = {q: [i for i, _ in found] for q, found in ann.items()}
    exact_ids = {q: [i for i, _ in found] for q, found in exact.items()}
    report.per_query = [_query_record(q, name, ann, exact, label=label_of[q]) for q in queries]
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
    if report.skipped:
        report.notes.append(f"{len(report.skipped)} files skipped (unreadable or failed to embed)")
    report.seconds = time.perf_counter() - started
    return report


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _link(source: str, target: Path) -> None:
    try:
        target.symlink_to(source)
    except OSError:  # no symlinks here (Windows without the privilege): copy
        shutil.copyfile(source, target)
