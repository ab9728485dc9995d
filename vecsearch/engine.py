"""Where and how the network runs: the device (CUDA, Apple's MPS, the CPU), the precision, and the
batch size, chosen for the machine at hand.

The vectors must not depend on that choice: a reduced precision (bf16 or fp16 autocast) is used
only when, on the first batch where it runs, it keeps every vector within MIN_COSINE of the fp32
reference and is faster; otherwise fp32. Same network, same weights, so the model record does not
change. Only torch is imported, inside the functions that need it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# A reduced precision is kept only if every vector of the first batch is this close to fp32.
MIN_COSINE = 0.9999
# Reduced precisions worth trying on each device, fastest first where known.
CANDIDATES = {"cuda": ("fp16", "bf16"), "mps": ("fp16",), "cpu": ("bf16",)}
# Images per forward when --batch-size is not given: a GPU needs large batches to be busy.
BATCH_SIZES = {"cuda": 128, "mps": 64, "cpu": 16}


def check_choice(device: str, precision: str) -> None:
    """InvalidInput for a device or precision vecsearch does not know (before any slow work)."""
    if device not in DEVICES and not device.startswith("cuda:"):
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


def autocast_dtype(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


@dataclass(frozen=True)
class Choice:
    """The precision kept after the first-batch check, and what the check measured."""

    precision: str  # "fp32", "bf16" or "fp16"
    device: str
    min_cosine: float = 1.0  # of the kept precision's vectors to fp32's, on the first batch
    speedup: float = 1.0  # fp32 time / kept time, on the first batch
    tried: tuple[tuple[str, str], ...] = ()  # (precision, why it was refused)

    def describe(self) -> str:
        if self.precision == "fp32":
            why = "; ".join(f"{p} refused: {reason}" for p, reason in self.tried)
            return f"torch fp32 on {self.device}" + (f" ({why})" if why else "")
        return (f"torch {self.precision} autocast, traced and frozen, on {self.device} ({self.speedup:.2f}x "
                f"fp32 on the first batch, cosine to fp32 >= {self.min_cosine:.5f})")


def refusal(min_cosine: float, fp32_s: float, reduced_s: float) -> str | None:
    """Why a reduced precision must not be used after this measurement, or None when it may."""
    if min_cosine < MIN_COSINE:
        return f"cosine to fp32 {min_cosine:.5f} < {MIN_COSINE}"
    if reduced_s >= fp32_s:
        return f"not faster here ({reduced_s:.2f} s vs {fp32_s:.2f} s for fp32)"
    return None


def choose(forward: Callable[[Any, str], Any], x: Any, device: str, precision: str) -> tuple[Choice, Any]:
    """Run the first batch `x` in fp32 and in each candidate precision; keep the fastest candidate
    that passes `refusal`, else fp32. `forward(x, precision)` returns L2-normalised float32
    vectors. Returns the choice and the kept precision's vectors for `x`."""
    device_type = device.split(":")[0]
    options = candidates(device_type, precision)
    if not options:
        return Choice("fp32", device), forward(x, "fp32")
    forward(x[:2], "fp32")  # first calls pay kernel set-up and autotuning
    reference, fp32_s = _timed(forward, x, "fp32")
    best, best_vectors, best_s, tried = None, reference, fp32_s, []
    for p in options:
        try:
            forward(x[:2], p)
            vectors, seconds = _timed(forward, x, p)
        except RuntimeError as e:  # an op without a kernel for this dtype on this device
            tried.append((p, str(e).strip().splitlines()[0][:120]))
            continue
        cosine = float((reference * vectors).sum(dim=1).min())
        why = refusal(cosine, fp32_s, seconds)
        if why:
            tried.append((p, why))
        elif seconds < best_s:
            best, best_vectors, best_s = Choice(p, device, cosine, fp32_s / seconds), vectors, seconds
    return best or Choice("fp32", device, tried=tuple(tried)), best_vectors


def _timed(forward: Callable[[Any, str], Any], x: Any, precision: str) -> tuple[Any, float]:
    """The vectors, and the better of two timings (one run alone is at the mercy of a busy machine)."""
    import torch

    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        vectors = forward(x, precision)
        if vectors.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return vectors, best
