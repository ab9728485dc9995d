"""Where and how the network runs: device selection, the first-batch precision check, batch sizes.

CI has no GPU: CUDA and MPS are exercised by making torch report them, the check by a forward
whose speed and accuracy the test sets, and the CPU engine for real.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import invoke_cli, make_image

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
    result = invoke_cli("load", "/nonexistent", "--device", "tpu")
    assert result.returncode == 1 and result.stderr.startswith("error: --device must be one of")


class FakeClock:
    """engine's `time`: advanced by the fake forwards, so no decision rests on a sleep."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(engine, "time", fake)
    return fake


def _fake_forward(clock: FakeClock, seconds: dict, noise: dict, fail: tuple[str, ...] = (),
                  calls: list | None = None):
    """A forward taking `seconds[precision]` (or `seconds[precision, traced]`) per image on the
    fake clock, its vectors fp32's (a function of x) plus `noise[precision]`."""

    def forward(x, precision, traced=False):
        if calls is not None:
            calls.append((precision, traced, len(x)))
        if precision in fail:
            raise RuntimeError(f"no {precision} kernel for this op\nmore detail")
        clock.now += len(x) * seconds.get((precision, traced), seconds[precision])
        base = x.reshape(len(x), -1)[:, :2048].float() + 1
        generator = torch.Generator().manual_seed(len(x))
        v = base + noise.get(precision, 0) * torch.randn(base.shape, generator=generator)
        return torch.nn.functional.normalize(v, dim=1)

    return forward


def test_a_reduced_precision_is_kept_only_if_close_and_faster(clock):
    x = torch.rand(8, 3, 4, 4)
    fast_close = _fake_forward(clock, {"fp32": 0.02, "fp16": 0.005, "bf16": 0.01},
                               {"fp16": 1e-4, "bf16": 1e-4})
    measured, vectors = engine.measure(fast_close, x, ("fp16", "bf16"), images=8)
    assert measured.precision == "fp16" and measured.min_cosine >= engine.MIN_COSINE
    assert measured.fp32_s == pytest.approx(0.02) and measured.eager_s == pytest.approx(0.005)
    assert measured.traced_s is None and set(vectors) == {("fp32", False), ("fp16", False)}
    choice = engine.plan(measured, 8, "cuda")
    assert choice.speedup == pytest.approx(4)
    assert "fp16 autocast, eager, on cuda (4.00x fp32" in choice.describe()

    far = _fake_forward(clock, {"fp32": 0.02, "fp16": 0.005, "bf16": 0.005}, {"fp16": 0.05, "bf16": 0.05})
    measured, _ = engine.measure(far, x, ("fp16", "bf16"), images=8)
    assert measured.precision == "fp32" and all("cosine to fp32" in why for _, why in measured.tried)

    slow = _fake_forward(clock, {"fp32": 0.005, "bf16": 0.02}, {"bf16": 1e-5})
    measured, _ = engine.measure(slow, x, ("bf16",), images=8)
    assert measured.precision == "fp32" and "not faster here" in measured.tried[0][1]

    broken = _fake_forward(clock, {"fp32": 0.005, "fp16": 0.001}, {}, fail=("fp16",))
    measured, _ = engine.measure(broken, x, ("fp16",), images=8)
    assert measured.tried == (("fp16", "no fp16 kernel for this op"),)
    described = engine.plan(measured, 8, "mps").describe()
    assert described == "torch fp32 on mps (fp16 refused: no fp16 kernel for this op)"


def test_tracing_is_tried_and_used_only_where_the_images_repay_it(clock):
    x = torch.rand(16, 3, 4, 4)
    calls = []
    # Tracing (the first traced call) costs 2 s; traced images then take 0.01 s instead of 0.02.
    seconds = {"fp32": 0.05, "bf16": 0.02, ("bf16", True): 0.01}
    forward = _fake_forward(clock, seconds, {"bf16": 1e-5}, calls=calls)

    def tracing(x, precision, traced=False):
        if traced and not any(c[1] for c in calls):
            clock.now += 2.0
        return forward(x, precision, traced)

    measured, vectors = engine.measure(tracing, x, ("bf16",), images=100)
    assert measured.traced_s is None and not any(traced for _, traced, _ in calls)  # 100 cannot repay it
    measured, vectors = engine.measure(tracing, x, ("bf16",), images=1000)
    assert measured.traced_s == pytest.approx(0.01) and measured.setup_s == pytest.approx(2.02)
    assert ("bf16", True) in vectors
    # From the same measurement: traced for 1000 images, eager for 150 (150 x 0.01 s < 2.02 s).
    assert engine.plan(measured, 1000, "cpu").traced
    eager = engine.plan(measured, 150, "cpu")
    assert eager.precision == "bf16" and not eager.traced and eager.speedup == pytest.approx(2.5)
    # A choice not measured here is checked on a 2-image fp32 sample: worth it only for more images.
    assert engine.plan(measured, 1, "cpu", guarded=True).precision == "fp32"
    assert engine.plan(measured, 16, "cpu", guarded=True).precision == "bf16"
    assert engine.plan(engine.prior("bf16"), 4, "cpu", guarded=True).precision == "fp32"
    assert engine.plan(engine.prior("bf16"), 5, "cpu", guarded=True).precision == "bf16"
    assert not engine.measuring_pays(64, 16) and engine.measuring_pays(100, 16)


def _native_bf16(monkeypatch, model: str = "Test CPU") -> None:
    monkeypatch.setattr(engine, "cpu_identity", lambda: (model, frozenset({"avx2", "avx512_bf16"})))


def _fake_embedder(embedder, monkeypatch, clock, home, calls, noise=1e-5, **options):
    """A real Embedder (the session's network) whose forward is the fake one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        fake = Embedder(weights="random", home=home, **options)
    fake._model, fake._device, fake._mean, fake._std = (embedder._model, embedder._device,
                                                       embedder._mean, embedder._std)
    seconds = {"fp32": 0.05, "bf16": 0.02, ("bf16", True): 0.015}
    monkeypatch.setattr(fake, "_forward", _fake_forward(clock, seconds, {"bf16": noise}, calls=calls))
    return fake


PIXELS = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), np.uint8)


def _timed_fp32(calls) -> bool:
    """Whether a full batch ran in fp32 (a timing run), not just the 2-image check."""
    return any(p == "fp32" and n > engine.GUARD_SAMPLE for p, _, n in calls)


def test_the_engine_measurement_is_kept_reused_and_measured_again_when_its_key_changes(
        embedder, monkeypatch, clock, tmp_path):
    _native_bf16(monkeypatch)
    calls = []
    first = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls)
    first.expect(300)
    first.embed_arrays(PIXELS)
    assert first.choice.precision == "bf16" and first.choice.basis == "measured on the first batch"
    assert _timed_fp32(calls)
    kept = json.loads((tmp_path / engine.CACHE_FILE).read_text())["entries"]
    assert len(kept) == 1 and kept[0]["measured"]["precision"] == "bf16"
    assert kept[0]["key"]["batch_size"] == 16 and kept[0]["key"]["torch"] == torch.__version__
    assert kept[0]["key"]["model"]["weights"] == "random(seed=0)" and "Test CPU" in kept[0]["key"]["hardware"]

    calls.clear()  # another process, same machine and model: reused, not timed, still checked
    second = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls)
    second.expect(300)
    second.embed_arrays(PIXELS)
    assert second.choice.precision == "bf16" and "kept in engine.json" in second.choice.describe()
    assert not _timed_fp32(calls) and ("fp32", False, engine.GUARD_SAMPLE) in calls

    for change in ({"batch_size": 8}, {"model": "Other CPU"}, {"recheck": True}):
        calls.clear()
        if "model" in change:
            _native_bf16(monkeypatch, change.pop("model"))
        again = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls, **change)
        again.expect(300)
        again.embed_arrays(PIXELS)
        assert _timed_fp32(calls), change
    assert len(json.loads((tmp_path / engine.CACHE_FILE).read_text())["entries"]) == 3


def test_small_work_runs_at_once_without_timing(embedder, monkeypatch, clock, tmp_path):
    _native_bf16(monkeypatch)
    calls = []
    one = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls)
    one.embed_arrays(PIXELS[:1])  # a search by file: fp32, nothing timed
    assert one.choice.precision == "fp32" and calls == [("fp32", False, 1)]
    calls.clear()
    few = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls)
    few.expect(40)
    few.embed_arrays(PIXELS)  # eager bf16 at once, checked on a 2-image fp32 sample
    assert few.choice.precision == "bf16" and not few.choice.traced and "not timed" in few.choice.describe()
    assert calls == [("bf16", False, 16), ("fp32", False, engine.GUARD_SAMPLE)]
    assert not (tmp_path / engine.CACHE_FILE).exists()  # nothing was measured, nothing is kept
    # A CPU without native bf16 runs fp32 at once, whatever the amount of work.
    monkeypatch.setattr(engine, "cpu_identity", lambda: ("Old CPU", frozenset({"avx2"})))
    calls.clear()
    old = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls)
    old.expect(5000)
    old.embed_arrays(PIXELS)
    assert old.choice.precision == "fp32" and calls == [("fp32", False, 16)]


def test_a_kept_choice_that_moves_the_vectors_is_dropped_with_one_warning(embedder, monkeypatch, clock,
                                                                           tmp_path):
    _native_bf16(monkeypatch)
    calls = []
    good = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls)
    good.expect(300)
    good.embed_arrays(PIXELS)
    assert good.choice.precision == "bf16"
    # Same key, but now bf16 moves the vectors (say, other weights behind the same record).
    bad = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls, noise=0.05)
    bad.expect(300)
    reference = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls, precision="fp32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = bad.embed_arrays(PIXELS)
        bad.embed_arrays(PIXELS)
    assert len(caught) == 1 and "no longer keeps the vectors" in str(caught[0].message)
    assert bad.choice.precision == "fp32" and np.allclose(got, reference.embed_arrays(PIXELS))
    kept = json.loads((tmp_path / engine.CACHE_FILE).read_text())["entries"][0]["measured"]
    assert kept["precision"] == "fp32" and "cosine to fp32" in kept["tried"][0][1]
    calls.clear()  # the next process trusts fp32 without timing or warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after = _fake_embedder(embedder, monkeypatch, clock, tmp_path, calls)
        after.expect(300)
        after.embed_arrays(PIXELS)
    assert after.choice.precision == "fp32" and calls == [("fp32", False, 16)]


@pytest.mark.parametrize("damage", ["not json {", '{"entries": 3}', '{"entries": [1]}', "bad entry",
                                    "unwritable"])
def test_a_damaged_or_unwritable_cache_is_ignored_with_one_warning(embedder, monkeypatch, clock, tmp_path,
                                                                   damage):
    _native_bf16(monkeypatch)
    home = tmp_path / "home"
    home.mkdir()
    if damage == "unwritable":
        home = tmp_path / "a-file"  # its engine.json can be neither read nor written, even as root
        home.write_text("")
    elif damage == "bad entry":
        first = _fake_embedder(embedder, monkeypatch, clock, home, [])
        first.expect(300)
        first.embed_arrays(PIXELS)
        data = json.loads((home / engine.CACHE_FILE).read_text())
        data["entries"][0]["measured"]["eager_s"] = "fast"
        (home / engine.CACHE_FILE).write_text(json.dumps(data))
    else:
        (home / engine.CACHE_FILE).write_text(damage)
    calls = []
    fake = _fake_embedder(embedder, monkeypatch, clock, home, calls)
    fake.expect(300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fake.embed_arrays(PIXELS)
    assert [str(w.message).split(":")[0] for w in caught] == [f"engine cache {home / engine.CACHE_FILE}"]
    assert fake.choice.precision == "bf16" and _timed_fp32(calls)  # measured again instead
    if damage != "unwritable":  # rewritten whole
        kept = json.loads((home / engine.CACHE_FILE).read_text())["entries"]
        assert kept[-1]["measured"]["precision"] == "bf16"


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
    result = invoke_cli("load", str(folder), "--weights", "random", "--workers", "0", "--recheck-engine")
    assert result.returncode == 0, result.stderr
    assert "engine: torch " in result.stderr and "on cpu" in result.stderr
    assert "rate limited by " in result.stderr
    # `search` takes load's engine options; a bad one fails in one line before any model work.
    result = invoke_cli("search", str(folder / "0.png"), "-k", "2", "--precision", "fp32", "--device", "cpu",
                     "--format", "paths")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 2 and str(folder / "0.png") not in result.stdout
    result = invoke_cli("search", str(folder / "0.png"), "--precision", "fp8")
    assert result.returncode == 1 and result.stderr.startswith("error: --precision must be one of")
