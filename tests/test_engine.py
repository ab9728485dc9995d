"""Where and how the network runs: device selection, the first-batch precision check, batch sizes.

CI has no GPU: CUDA and MPS are exercised by making torch report them, the check by a forward
whose speed and accuracy the test sets, and the CPU engine for real.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from conftest import make_image, run_cli

from vecsearch import engine
from vecsearch.embed import Embedder, RandomWeightsWarning
from vecsearch.errors import InvalidInput
from vecsearch.images import model_input, open_image


def _device_table(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"),
                                                       (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, expected):
    _device_table(monkeypatch, cuda, mps)
    assert engine.pick_device("auto").type == expected
    assert engine.batch_size_for(expected) == {"cuda": 128, "mps": 64, "cpu": 16}[expected]
    assert engine.candidates(expected, "auto") == {"cuda": ("fp16", "bf16"), "mps": ("fp16",),
                                                   "cpu": ("bf16",)}[expected]


def test_asking_for_a_missing_device_or_an_unknown_choice_is_one_line(monkeypatch):
    _device_table(monkeypatch, False, False)
    with pytest.raises(InvalidInput, match="no CUDA device is available here"):
        engine.pick_device("cuda")
    with pytest.raises(InvalidInput, match="MPS"):
        engine.pick_device("mps")
    for device, precision in (("tpu", "auto"), ("cpu", "fp8")):
        with pytest.raises(InvalidInput):
            engine.check_choice(device, precision)
    result = run_cli("load", "/nonexistent", "--device", "tpu")
    assert result.returncode == 1 and result.stderr.startswith("error: --device must be one of")


def _fake_forward(seconds: dict[str, float], noise: dict[str, float], fail: tuple[str, ...] = ()):
    base = torch.nn.functional.normalize(torch.rand(8, 64), dim=1)

    def forward(x, precision):
        if precision in fail:
            raise RuntimeError(f"no {precision} kernel for this op\nmore detail")
        time.sleep(seconds[precision])
        v = base[:len(x)] + noise[precision] * torch.randn(len(x), 64)
        return torch.nn.functional.normalize(v, dim=1)

    return forward


def test_a_reduced_precision_is_kept_only_if_close_and_faster():
    x = torch.zeros(8, 3)
    fast_close = _fake_forward({"fp32": 0.02, "fp16": 0.005, "bf16": 0.01},
                               {"fp32": 0, "fp16": 1e-4, "bf16": 1e-4})
    choice, vectors = engine.choose(fast_close, x, "cuda", "auto")
    assert choice.precision == "fp16" and choice.speedup > 1.5 and choice.min_cosine >= engine.MIN_COSINE
    assert "fp16 autocast, traced and frozen, on cuda" in choice.describe()

    far = _fake_forward({"fp32": 0.02, "fp16": 0.005, "bf16": 0.005}, {"fp32": 0, "fp16": 0.05, "bf16": 0.05})
    choice, _ = engine.choose(far, x, "cuda", "auto")
    assert choice.precision == "fp32" and all("cosine to fp32" in why for _, why in choice.tried)

    slow = _fake_forward({"fp32": 0.005, "bf16": 0.02}, {"fp32": 0, "bf16": 1e-5})
    choice, _ = engine.choose(slow, x, "cpu", "auto")
    assert choice.precision == "fp32" and "not faster here" in choice.tried[0][1]

    broken = _fake_forward({"fp32": 0.005, "fp16": 0.001}, {"fp32": 0, "fp16": 0}, fail=("fp16",))
    choice, _ = engine.choose(broken, x, "mps", "auto")
    assert choice.precision == "fp32" and choice.tried == (("fp16", "no fp16 kernel for this op"),)

    choice, _ = engine.choose(fast_close, x, "cuda", "fp32")  # the reference, forced: nothing tried
    assert choice.precision == "fp32" and choice.tried == ()


def test_the_cpu_engine_keeps_the_vectors_within_cosine_0_9999_of_fp32(embedder, tmp_path):
    pixels = np.stack([model_input(open_image(make_image(tmp_path / f"{i}.png", 40 + i))) for i in range(6)])
    reference = embedder.embed_arrays(pixels)  # the session embedder is the fp32 reference
    assert embedder.active_precision == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        auto = Embedder(weights="random", batch_size=6)
    vectors = auto.embed_arrays(pixels)
    assert auto.choice is not None and auto.choice.device == "cpu"
    assert auto.batch_size == 6
    assert (vectors * reference).sum(axis=1).min() >= engine.MIN_COSINE
    # Later batches run in the kept precision, without checking again.
    choice = auto.choice
    again = auto.embed_arrays(pixels)
    assert auto.choice is choice and (again * reference).sum(axis=1).min() >= engine.MIN_COSINE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        assert Embedder(weights="random").batch_size == engine.BATCH_SIZES["cpu"]  # the device's default


def test_load_names_the_engine_and_the_limiting_stage(settings, tmp_path):
    folder = tmp_path / "pics"
    for i in range(6):
        make_image(folder / f"{i}.png", 60 + i, (64, 64))
    result = run_cli("load", str(folder), "--weights", "random", "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert "engine: torch " in result.stderr and "on cpu" in result.stderr
    assert "rate limited by " in result.stderr
