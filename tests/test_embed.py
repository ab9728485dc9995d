"""The embedder: torchvision's own preprocessing and network, weights options, model records."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import make_image, run_cli

from vecsearch import engine, models
from vecsearch.embed import Embedder, RandomWeightsWarning
from vecsearch.errors import InvalidInput, NotFound, SchemaMismatch, WeightsUnavailable
from vecsearch.images import model_input, open_image
from vecsearch.load import load


def test_preprocessing_record_is_torchvision_weights_own_transforms():
    from torchvision.models import ResNet50_Weights
    from torchvision.transforms import InterpolationMode

    preset = ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert preset.resize_size == [models.RESIZE] and preset.crop_size == [models.CROP]
    assert preset.mean == list(models.MEAN) and preset.std == list(models.STD)
    assert preset.interpolation == InterpolationMode.BILINEAR
    assert ResNet50_Weights.IMAGENET1K_V2.url.endswith(f"-{models.DEFAULT_WEIGHTS_SHA256_PREFIX}.pth")


def _reference_network() -> torch.nn.Module:
    """A plain torchvision ResNet50 built the way NOTES.md describes the test model."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    network = resnet50(weights=None, zero_init_residual=True)
    network.fc = torch.nn.Identity()
    return network.eval()


def test_batched_pipeline_equals_a_plain_single_image_reference(settings, conn, embedder, tmp_path):
    """Batching, channels_last, the box resize and worker decoding change nothing that matters."""
    from torchvision.models import ResNet50_Weights

    folder = tmp_path / "p"
    paths = [make_image(folder / "a.jpg", 1, (640, 480)), make_image(folder / "b.png", 2, (200, 333)),
             make_image(folder / "c.webp", 3, (90, 90), fmt="WEBP"),
             make_image(folder / "d.png", 4, (1200, 40)), make_image(folder / "e.gif", 5, (300, 300))]
    load(settings, folder, embedder, workers=1)
    stored = {p: v.to_numpy() for p, v in conn.execute("SELECT path, embedding FROM images")}
    network, preset = _reference_network(), ResNet50_Weights.IMAGENET1K_V2.transforms()
    reference = []
    with torch.no_grad():
        for path in paths:
            x = preset(open_image(path)).unsqueeze(0)  # torchvision's own transforms, one image
            reference.append(torch.nn.functional.normalize(network(x), dim=1)[0].numpy())
    for path, ref in zip(paths, reference, strict=True):
        assert float(np.dot(stored[str(path)], ref)) > 0.999, path
    assert float(np.dot(embedder.embed_file(paths[0]), reference[0])) > 0.999
    # The seeded random network spreads images out (a plain random init puts all in a 0.997 cone).
    gram = np.stack(reference) @ np.stack(reference).T
    assert gram[~np.eye(len(paths), dtype=bool)].max() < 0.995


def test_draft_decoding_moves_embeddings_little(embedder, tmp_path, capsys):
    """How far JPEG draft() (DCT-domain downscale) moves a vector from a full-size decode."""
    cosines = []
    for i in range(2):
        path = make_image(tmp_path / f"{i}.jpg", 20 + i, (1600, 1200))
        drafted = embedder.embed_file(path)
        full = embedder.embed_images([open_image(path, draft=None)])[0]
        cosines.append(float(np.dot(drafted, full)))
    with capsys.disabled():
        print(f"\ndraft vs full decode, 1600x1200 JPEGs, random weights: cosine distance "
              f"max {1 - min(cosines):.5f}, mean {1 - np.mean(cosines):.5f}")
    assert 1 - min(cosines) < 0.01


def test_default_weights_unreachable_fail_fast_with_the_options(settings, conn, tmp_path):
    """No download possible (a proxy on a closed port stands in for a blocked network)."""
    folder = tmp_path / "p"
    make_image(folder / "a.png", 1)
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    result = run_cli("load", str(folder), env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert errors[0].startswith("error: the pretrained ResNet50 weights (IMAGENET1K_V2) could not be "
                                "downloaded from https://download.pytorch.org/"), result.stderr
    assert "`--weights FILE`" in errors[0] and "`--weights random`" in errors[0]
    assert "Traceback" not in result.stderr
    # Nothing was written: no rows, and no model recorded for weights that never came.
    assert conn.execute("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM embedding_model)"
                        ).fetchone() == (0, 0)


def test_weights_file_and_records(embedder, tmp_path):
    weights = tmp_path / "resnet50.pth"
    torch.save(embedder.state_dict(), weights)
    from_file = Embedder(weights=str(weights))
    digest = from_file.record.weights.removeprefix("file:sha256=")
    assert len(digest) == 64 and from_file.record.dim == 2048
    assert from_file.record.name == embedder.record.name == "torchvision.models.resnet50"
    assert embedder.record.weights == "random(seed=0)"
    # Rebuilding the embedder of a database: the file must be given again, and be the same file.
    with pytest.raises(InvalidInput, match="--weights FILE"):
        Embedder.from_record(from_file.record)
    assert Embedder.from_record(from_file.record, weights=str(weights)).record == from_file.record
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in embedder.state_dict().items()}, other)
    with pytest.raises(SchemaMismatch, match="--reembed"):
        Embedder.from_record(from_file.record, weights=str(other))
    with pytest.warns(RandomWeightsWarning):
        assert Embedder.from_record(embedder.record).weights == "random"
    assert Embedder.from_record(models.record_for("IMAGENET1K_V2")).weights == "default"
    with pytest.raises(SchemaMismatch):
        Embedder.from_record(models.ModelRecord("open_clip", "laion", "{}", 512))
    # A file that is no ResNet50 state dict fails with a reason when the network is built.
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsUnavailable, match="not a torchvision ResNet50 state dict"):
        Embedder(weights=str(tmp_path / "bad.pth")).prepare()
    with pytest.raises(NotFound, match="does not exist"):
        Embedder(weights=str(tmp_path / "missing.pth"))
    for bad in ({"batch_size": 0}, {"device": "tpu"}, {"precision": "fp8"}):
        with pytest.raises(InvalidInput):
            Embedder(weights="random", **bad)


def test_model_record_is_kept_and_a_different_one_refused(conn, embedder):
    assert models.recorded_model(conn) is None
    models.ensure_model(conn, embedder.record)
    models.ensure_model(conn, embedder.record)  # same: nothing to do
    assert models.recorded_model(conn) == embedder.record
    other = models.record_for("IMAGENET1K_V2")
    # An empty table has no vectors to mix: the record is simply replaced.
    models.ensure_model(conn, other)
    assert models.recorded_model(conn) == other
    conn.execute("INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
                 "VALUES ('/x.jpg', 'ab', 1, 1, 1, 'JPEG', now(), %s)", [np.ones(2048, np.float32)])
    with pytest.raises(SchemaMismatch) as info:
        models.ensure_model(conn, embedder.record)
    assert "weights IMAGENET1K_V2, not torchvision.models.resnet50, weights random(seed=0)" in str(info.value)
    assert "`--reembed`" in str(info.value)
    models.ensure_model(conn, embedder.record, reembed=True)
    assert models.recorded_model(conn) == embedder.record


def test_bf16_is_kept_only_when_close_to_fp32_and_faster(embedder, tmp_path):
    pixels = np.stack([model_input(open_image(make_image(tmp_path / f"{i}.png", i))) for i in range(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        fp32 = Embedder(weights="random", precision="fp32", batch_size=2).embed_arrays(pixels)
        fast = Embedder(weights="random", precision="bf16", batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast.embed_arrays(pixels)
    check = fast.choice
    if fast.active_precision == "bf16":
        assert check.min_cosine >= engine.MIN_COSINE and check.speedup > 1 and not caught
        assert (got * fp32).sum(axis=1).min() >= engine.MIN_COSINE
    else:  # a CPU without fast bf16: said so, and the vectors are fp32's
        assert "using fp32" in str(caught[-1].message)
        assert np.allclose(got, fp32, atol=1e-5)
    # The rule itself: both conditions, each named when it fails.
    assert engine.refusal(0.99995, 2.0, 1.0) is None
    assert "cosine to fp32 0.99980 < 0.9999" in engine.refusal(0.9998, 2.0, 1.0)
    assert "not faster here" in engine.refusal(0.99999, 1.0, 1.5)


def test_importing_the_cli_and_load_modules_does_not_import_torch():
    code = ("import sys, vecsearch.cli, vecsearch.load, vecsearch.images, vecsearch.models, vecsearch.embed;"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_network_is_torchvisions_resnet50_without_its_head_and_without_torchvision():
    """vecsearch/resnet.py: torchvision's modules, names and seeded initialisation, fc left out;
    the default weights' URL is torchvision's; building the network never imports torchvision."""
    from torchvision.models import ResNet50_Weights, resnet50

    from vecsearch import embed, resnet

    torch.manual_seed(0)
    reference = resnet50(weights=None, zero_init_residual=True).state_dict()
    ours = resnet.seeded(0).state_dict()
    assert list(ours) == [k for k in reference if not k.startswith("fc.")]
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert embed.DEFAULT_WEIGHTS_URL == ResNet50_Weights.IMAGENET1K_V2.url
    code = ("import sys, warnings; warnings.simplefilter('ignore'); from vecsearch.embed import Embedder;"
            "Embedder('random').prepare(); print('torchvision' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
