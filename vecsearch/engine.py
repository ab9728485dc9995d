"""Where and how the network runs: the device (CUDA, Apple's MPS, the CPU), the precision, traced
or eager, and the batch size, chosen for the machine at hand and for the amount of work.

The vectors must not depend on that choice: a reduced precision (bf16 or fp16 autocast) is used
only while it keeps every vector it is checked on within MIN_COSINE of the fp32 reference, and
only where it is faster; otherwise fp32. Same network, same weights, so the model record does not
change.

Deciding costs time (timing each precision, tracing and freezing the network: seconds of CPU), so
it is paid only where the work repays it (`plan`, `measuring_pays`), and a measurement is kept in
VECSEARCH_HOME/engine.json (`Cache`), keyed by everything the speeds depend on (`cache_key`), for
later processes to reuse without timing anything. A choice that this process did not measure is
still checked: its first batch is compared with fp32 on a sample, when that costs less than the
choice saves. Only torch is imported, inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import InvalidInput

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# A reduced precision is kept only if every vector it is checked on is this close to fp32.
MIN_COSINE = 0.9999
# Reduced precisions worth trying on each device, fastest first where known.
CANDIDATES = {"cuda": ("fp16", "bf16"), "mps": ("fp16",), "cpu": ("bf16",)}
# Images per forward when --batch-size is not given: a GPU needs large batches to be busy.
BATCH_SIZES = {"cuda": 128, "mps": 64, "cpu": 16}
# CPU flags of native bf16 arithmetic. Without them bf16 autocast is emulated: 4x slower than fp32
# on an AVX2-only EPYC (docs/benchmarks.md), so it is not even tried there unless asked for.
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
# Before anything is measured on this machine (docs/benchmarks.md, an EPYC with avx512_bf16):
PRIOR_SPEEDUP = 2.0  # eager reduced precision against fp32, per image
PRIOR_TRACE_GAIN = 0.2  # share of the eager per-image time that tracing and freezing saves
PRIOR_TRACE_SETUP = 48  # tracing and freezing, in eager images' worth of time
GUARD_SAMPLE = 2  # images of a first batch run again in fp32 to check a choice not measured here
CACHE_FILE = "engine.json"
CACHE_ENTRIES = 16  # machines, models and batch sizes remembered (the oldest go first)


def check_choice(device: str, precision: str) -> None:
    """InvalidInput for a device or precision vecsearch does not know (before any slow work)."""
    index = device.removeprefix("cuda:")
    if device not in DEVICES and not (device.startswith("cuda:") and index.isascii() and index.isdigit()):
        raise InvalidInput(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), not {device!r}")
    if precision not in PRECISIONS:
        raise InvalidInput(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def pick_device(name: str = "auto") -> Any:
    """The torch.device to run on: `auto` is CUDA, then Apple's MPS, then the CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda: no CUDA device is available here; use --device auto or cpu")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise InvalidInput("--device mps: Apple's GPU (MPS) is not available here; use --device auto or cpu")
    return device


def batch_size_for(device_type: str) -> int:
    return BATCH_SIZES.get(device_type, BATCH_SIZES["cpu"])


def candidates(device_type: str, precision: str) -> tuple[str, ...]:
    """The reduced precisions to try: none for fp32, the one asked for, or the device's (auto)."""
    if precision == "fp32":
        return ()
    if precision != "auto":
        return (precision,)
    return CANDIDATES.get(device_type, ())


def cpu_identity() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags (Linux's /proc/cpuinfo; elsewhere the platform's name only)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0].splitlines()  # the first processor's block
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first)}
        return info.get("model name", platform.processor()), frozenset(info.get("flags", "").split())
    except OSError:
        return platform.processor() or platform.machine(), frozenset()


def native_reduced(device_type: str) -> bool:
    """Whether the device computes its reduced precisions natively (a GPU; a CPU with bf16 flags)."""
    return device_type != "cpu" or bool(cpu_identity()[1] & set(NATIVE_BF16))


def autocast_dtype(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# -- what was measured, what runs ------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One timing run on a first batch (seconds per image), kept for later processes."""

    precision: str  # the fastest reduced precision that kept the vectors, else "fp32"
    fp32_s: float = 0.0
    eager_s: float = 0.0  # `precision`, eager autocast (fp32_s for fp32)
    traced_s: float | None = None  # `precision`, traced and frozen (None: not tried, or refused)
    setup_s: float | None = None  # tracing and freezing it, once per process
    min_cosine: float = 1.0
    tried: tuple[tuple[str, str], ...] = ()  # (precision, why it was refused)

    @classmethod
    def from_dict(cls, data: dict) -> Measured:
        """ValueError/TypeError/KeyError for anything but what `asdict` wrote."""
        m = cls(**{**data, "tried": tuple((str(p), str(why)) for p, why in data.get("tried", ()))})
        times = [m.fp32_s, m.eager_s, m.min_cosine, *(t for t in (m.traced_s, m.setup_s) if t is not None)]
        if m.precision not in PRECISIONS[1:] or not all(isinstance(t, int | float) and t >= 0 for t in times):
            raise ValueError(f"not a measurement: {data}")
        if m.precision != "fp32" and not (m.eager_s > 0 and m.min_cosine >= MIN_COSINE):
            raise ValueError(f"not a usable measurement: {data}")
        return m


def prior(precision: str) -> Measured:
    """What an unmeasured reduced precision is assumed to give (never traced: set-up unknown)."""
    return Measured(precision, fp32_s=1.0, eager_s=1 / PRIOR_SPEEDUP)


@dataclass(frozen=True)
class Choice:
    """What this process runs, and what it rests on."""

    precision: str  # "fp32", "bf16" or "fp16"
    device: str
    traced: bool = False  # traced and frozen (batch norms folded), else eager autocast
    min_cosine: float = 1.0  # of its vectors to fp32's, where checked
    speedup: float = 1.0  # fp32 time / its time, per image
    tried: tuple[tuple[str, str], ...] = ()  # (precision, why it was refused)
    basis: str = "measured on the first batch"

    def describe(self) -> str:
        if self.precision == "fp32":
            why = "; ".join(f"{p} refused: {reason}" for p, reason in self.tried)
            return f"torch fp32 on {self.device}" + (f" ({why})" if why else "")
        how = "traced and frozen" if self.traced else "eager"
        speed = "" if self.basis.startswith("not timed") else f"{self.speedup:.2f}x fp32 "
        return (f"torch {self.precision} autocast, {how}, on {self.device} ({speed}{self.basis}, "
                f"cosine to fp32 >= {self.min_cosine:.5f})")


def plan(measured: Measured, images: int, device: str, *, guarded: bool = False,
         basis: str = "measured on the first batch") -> Choice:
    """The engine for `images` images: traced only when they repay its set-up; with `guarded`
    (a choice this process did not measure), a reduced precision only when what it saves repays
    the fp32 sample that checks it. Otherwise fp32."""
    if measured.precision == "fp32":
        return Choice("fp32", device, tried=measured.tried)
    per_image, traced = measured.eager_s, False
    if (measured.traced_s is not None and measured.setup_s is not None
            and images * (measured.eager_s - measured.traced_s) > measured.setup_s):
        per_image, traced = measured.traced_s, True
    if guarded and images * (measured.fp32_s - per_image) <= GUARD_SAMPLE * measured.fp32_s:
        return Choice("fp32", device, basis=basis)
    return Choice(measured.precision, device, traced, measured.min_cosine, measured.fp32_s / per_image,
                  measured.tried, basis)


def measuring_pays(images: int, batch: int) -> bool:
    """Whether a timing run (about one extra batch in fp32) is repaid by the prior gain."""
    return images * (1 - 1 / PRIOR_SPEEDUP) > 2 * batch


def tracing_may_pay(images: int) -> bool:
    """Whether to try tracing at all, before its set-up and gain are known here."""
    return images * PRIOR_TRACE_GAIN > PRIOR_TRACE_SETUP


def refusal(min_cosine: float, fp32_s: float, reduced_s: float) -> str | None:
    """Why a reduced precision must not be used after this measurement, or None when it may."""
    if min_cosine < MIN_COSINE:
        return f"cosine to fp32 {min_cosine:.5f} < {MIN_COSINE}"
    if reduced_s >= fp32_s:
        return f"not faster here ({reduced_s:.3f} s vs {fp32_s:.3f} s per image for fp32)"
    return None


Forward = Callable[[Any, str, bool], Any]  # (x, precision, traced) -> L2-normalised float32 vectors


def measure(forward: Forward, x: Any, options: tuple[str, ...], images: int) -> tuple[Measured, dict]:
    """Time the first batch `x` in fp32 and eager in each of `options` (after a 2-image warm-up
    each), keep the fastest that passes `refusal`; trace and freeze it too when `images` may
    repay that. Returns the measurement and the vectors of `x` by (precision, traced)."""
    n = len(x)

    def timed(precision: str, traced: bool) -> tuple[Any, float]:
        forward(x[:2], precision, traced)  # first calls pay kernel set-up (and tracing)
        started = time.perf_counter()
        vectors = _synced(forward(x, precision, traced))
        return vectors, (time.perf_counter() - started) / n

    reference, fp32_s = timed("fp32", False)
    vectors = {("fp32", False): reference}
    best, tried = Measured("fp32", fp32_s, fp32_s), []
    for p in options:
        try:
            got, seconds = timed(p, False)
        except RuntimeError as e:  # an op without a kernel for this dtype on this device
            tried.append((p, str(e).strip().splitlines()[0][:120]))
            continue
        cosine = _min_cosine(reference, got)
        why = refusal(cosine, fp32_s, seconds)
        if why:
            tried.append((p, why))
        elif seconds < best.eager_s:
            best, vectors[p, False] = Measured(p, fp32_s, seconds, min_cosine=cosine), got
    if best.precision != "fp32" and tracing_may_pay(images):
        started = time.perf_counter()
        try:
            forward(x[:2], best.precision, True)
            setup = time.perf_counter() - started
            got, seconds = timed(best.precision, True)
            cosine = _min_cosine(reference, got)
            if refusal(cosine, best.eager_s, seconds) is None:
                best, vectors[best.precision, True] = replace(best, traced_s=seconds, setup_s=setup), got
        except RuntimeError:  # the tracer or this backend refuses an op: eager it is
            pass
    return replace(best, tried=tuple(tried)), vectors


def _min_cosine(a: Any, b: Any) -> float:
    return float((a * b).sum(dim=1).min())


def _synced(vectors: Any) -> Any:
    if vectors.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return vectors


# -- the cache -------------------------------------------------------------------------------


def cache_key(device: Any, record: Any, batch_size: int) -> dict:
    """Everything a measurement depends on: the GPU's name or the CPU's model and flags, torch,
    the threads it uses, the model record (its weights' checksum included) and the batch size."""
    import torch

    if device.type == "cuda":
        hardware = f"cuda: {torch.cuda.get_device_name(device)}"
    elif device.type == "mps":
        hardware = f"mps: {platform.machine()} {platform.mac_ver()[0]}"
    else:
        model, flags = cpu_identity()
        digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16]
        hardware = f"cpu: {model}, flags sha256 {digest}"
    return {"hardware": hardware, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": asdict(record), "batch_size": batch_size}


class Cache:
    """Measurements of earlier processes in HOME/engine.json. A file that cannot be read or
    written is ignored with one warning (per process), never an error: the engine is then
    measured or guessed again. Written atomically (a temporary file renamed over it)."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / CACHE_FILE
        self._warned = False

    def _warn(self, what: str, error: object) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"engine cache {self.path}: {what} ({error}); ignored", stacklevel=4)

    def _entries(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ValueError("no list of entries")
            return entries
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._warn("cannot be read", e)
            return []

    def get(self, key: dict) -> Measured | None:
        for entry in self._entries():
            if entry.get("key") == key:
                try:
                    return Measured.from_dict(entry["measured"])
                except (ValueError, TypeError, KeyError) as e:
                    self._warn("holds a damaged entry", e)
                    return None
        return None

    def put(self, key: dict, measured: Measured) -> None:
        entries = [e for e in self._entries() if e.get("key") != key]
        entries.append({"key": key, "measured": asdict(measured),
                        "at": datetime.now(UTC).isoformat(timespec="seconds")})
        text = json.dumps({"entries": entries[-CACHE_ENTRIES:]}, indent=1)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".engine-", suffix=".json", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            self._warn("cannot be written", e)
