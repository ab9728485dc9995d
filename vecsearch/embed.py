"""The embedder: torchvision ResNet50 without its classifier, 2048-d L2-normalised vectors.

The only module that imports torch/torchvision, and only inside functions: constructing an
Embedder is cheap (it validates its arguments and computes its model record), the network is
built on first use. So `vecsearch load` of an unchanged folder never imports torch at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from PIL import Image

from . import engine, models
from .errors import InvalidInput, NotFound, SchemaMismatch, WeightsUnavailable, first_line
from .images import model_input, open_image

DOWNLOAD_TIMEOUT = 30  # seconds without data before a download is given up
FILE_PREFIX = "file:sha256="
# torchvision's ResNet50_Weights.IMAGENET1K_V2.url (tests/test_embed.py keeps them equal).
DEFAULT_WEIGHTS_URL = f"https://download.pytorch.org/models/resnet50-{models.DEFAULT_WEIGHTS_SHA256_PREFIX}.pth"


class RandomWeightsWarning(UserWarning):
    """`--weights random`: the vectors come from an untrained network."""


def _set_threads(torch) -> None:
    """One intra-op thread per CPU this process may run on: torch counts the machine's cores,
    which in a container or under taskset can be more than it is given (and then thrash)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return
    if torch.get_num_threads() > usable:
        torch.set_num_threads(usable)


def _sha256_file(path: Path) -> str:
    from .images import sha256_of

    with open(path, "rb") as f:
        return sha256_of(f)


class Embedder:
    """ResNet50 (fc = identity) in eval mode, inference_mode, channels_last.

    weights: "default" (torchvision's IMAGENET1K_V2, downloaded once into TORCH_HOME), a path to
    a local state-dict file (air-gapped machines), or "random" (seeded, zero_init_residual: for
    smoke tests and CI only; warns, and is recorded as another model).
    """

    def __init__(self, weights: str = "default", device: str = "auto",
                 batch_size: int | None = None, precision: str = "auto", *,
                 home: Path | None = None, recheck: bool = False) -> None:
        """device: auto (CUDA, then Apple's MPS, then the CPU), cpu, cuda[:N] or mps.
        precision: auto (a reduced precision where it keeps the vectors and its gain repays
        checking it, see vecsearch/engine.py), fp32 (the reference), bf16 or fp16 (measured).
        batch_size: images per forward (default: the device's, engine.BATCH_SIZES).
        home: where `auto` keeps its measurement (VECSEARCH_HOME; None: nothing kept);
        recheck: measure again even if one is kept."""
        if batch_size is not None and batch_size < 1:
            raise InvalidInput(f"--batch-size must be at least 1, not {batch_size}")
        engine.check_choice(device, precision)
        self.weights = weights
        self.device_name = device
        self._batch_size = batch_size
        self.precision = precision
        self.home, self.recheck = home, recheck
        self.expected: int | None = None  # images this process will embed, when known (expect)
        self.choice: engine.Choice | None = None  # set by the first batch
        self._frozen_models: dict = {}
        self._model = None
        self._device = None
        self._weights_file: Path | None = None
        if weights == "default":
            label = models.DEFAULT_WEIGHTS
        elif weights == "random":
            label = models.RANDOM_WEIGHTS
            warnings.warn("--weights random: an untrained, seeded network for smoke tests and CI; "
                          "its neighbours and distances mean little", RandomWeightsWarning, stacklevel=2)
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise NotFound(f"weights file {path} does not exist: give a ResNet50 state dict "
                               "(`--weights FILE`), `--weights default` or `--weights random`")
            self._weights_file = path.resolve()
            digest = _sha256_file(self._weights_file)
            # torchvision's own checkpoint file is the default model, wherever it came from.
            label = (models.DEFAULT_WEIGHTS if digest.startswith(models.DEFAULT_WEIGHTS_SHA256_PREFIX)
                     else FILE_PREFIX + digest)
        self.record = models.record_for(label)

    @classmethod
    def from_record(cls, record: models.ModelRecord, weights: str | None = None, *,
                    device: str = "auto", batch_size: int | None = None, precision: str = "auto",
                    home: Path | None = None) -> Embedder:
        """The embedder that produced a database whose model record is `record`.

        A record made with a weights file needs that file again (`weights`); its sha256 must match.
        """
        if weights is None:
            if record.weights == models.DEFAULT_WEIGHTS:
                weights = "default"
            elif record.weights == models.RANDOM_WEIGHTS:
                weights = "random"
            elif record.weights.startswith(FILE_PREFIX):
                raise InvalidInput(
                    f"the database was embedded with a weights file (sha256 "
                    f"{record.weights[len(FILE_PREFIX):][:16]}...): pass that file with `--weights FILE`")
            else:
                raise SchemaMismatch(f"the database's vectors were made by {record.describe()}, "
                                     "which this vecsearch cannot compute: reload with `--reembed`")
        embedder = cls(weights, device=device, batch_size=batch_size, precision=precision, home=home)
        if embedder.record != record:
            raise SchemaMismatch(models.mismatch_message(record, embedder.record))
        return embedder

    # -- the network ---------------------------------------------------------------------------

    def prepare(self) -> Embedder:
        """Build the network now (import torch, fetch or read the weights). Idempotent."""
        if self._model is not None:
            return self
        import torch

        from . import resnet

        device = engine.pick_device(self.device_name)
        _set_threads(torch)
        if self.weights == "random":
            # zero_init_residual spreads embeddings out (plain random init maps every image into
            # a cone of cosine >= 0.997).
            model = resnet.seeded(models.RANDOM_SEED)
        else:  # the weights first: a failed download should not wait for a network build
            state = self._default_state_dict() if self._weights_file is None else self._file_state_dict()
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            model = resnet.for_weights()  # no random initialisation: the weights are assigned
            try:
                model.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as e:
                source = self._weights_file or "the downloaded file"
                first = str(e).strip().splitlines()[1:2] or [str(e)]
                raise WeightsUnavailable(f"{source} is not a torchvision ResNet50 state dict "
                                         f"({first[0].strip()})") from e
        model.eval().requires_grad_(False)
        self._model = model.to(device, memory_format=torch.channels_last)
        self._device = device
        mean = torch.tensor(models.MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(models.STD, device=device).view(1, 3, 1, 1) * 255
        self._mean, self._std = mean, std
        return self

    def _default_state_dict(self) -> dict:
        import torch.hub

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # a blocked network fails instead of hanging
        try:
            with contextlib.redirect_stdout(sys.stderr):  # torch.hub prints "Downloading..." on stdout
                return torch.hub.load_state_dict_from_url(DEFAULT_WEIGHTS_URL, progress=sys.stderr.isatty(),
                                                          check_hash=True, weights_only=True)
        except Exception as e:
            reason = str(getattr(e, "reason", None) or e).strip().splitlines()[0] or type(e).__name__
            cache = Path(torch.hub.get_dir()) / "checkpoints" / DEFAULT_WEIGHTS_URL.rsplit("/", 1)[1]
            raise WeightsUnavailable(
                f"the pretrained ResNet50 weights ({models.DEFAULT_WEIGHTS}) could not be downloaded "
                f"from {DEFAULT_WEIGHTS_URL} ({reason}): copy that file to {cache}, or pass `--weights FILE` "
                "(a local copy of it), or `--weights random` for a smoke test (its neighbours mean little)"
            ) from e
        finally:
            socket.setdefaulttimeout(previous)

    def _file_state_dict(self) -> dict:
        import torch

        try:
            state = torch.load(self._weights_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsUnavailable(f"cannot read weights file {self._weights_file}: "
                                     f"{first_line(e)}") from e
        for key in ("state_dict", "model"):  # common checkpoint wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise WeightsUnavailable(f"{self._weights_file} holds no state dict")
        return {k.removeprefix("module."): v for k, v in state.items()}

    @property
    def device(self) -> str:
        self.prepare()
        return str(self._device)

    @property
    def on_gpu(self) -> bool:
        """Whether the network runs on a GPU; False until prepared (a load forks its decode
        workers before the model is built)."""
        return self._device is not None and self._device.type != "cpu"

    @property
    def batch_size(self) -> int:
        """As given, else the device's default (the CPU's until the network is built)."""
        if self._batch_size is not None:
            return self._batch_size
        return engine.batch_size_for(self._device.type if self._device is not None else "cpu")

    def state_dict(self) -> dict:
        """The network's parameters (fc excluded): save with torch.save for `--weights FILE`."""
        return self.prepare()._model.state_dict()

    # -- embedding -----------------------------------------------------------------------------

    def expect(self, images: int) -> None:
        """How many images this process is about to embed (a load's new files): what decides
        whether timing the engines and tracing the network repay their set-up. Unset, the
        first call's own count is used (a search by file: one image, no set-up worth paying)."""
        self.expected = images

    def embed_arrays(self, pixels: np.ndarray) -> np.ndarray:
        """n x 224 x 224 x 3 uint8 (from images.model_input) -> n x 2048 float32, L2-normalised."""
        import torch

        self.prepare()
        out = np.empty((len(pixels), models.DIM), dtype=np.float32)
        gpu = self._device.type != "cpu"
        for start in range(0, len(pixels), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(pixels[start:start + self.batch_size]))
            if gpu and self._device.type == "cuda":
                chunk = chunk.pin_memory()  # page-locked: the copy below runs asynchronously
            with torch.inference_mode():
                # NHWC -> NCHW view: already channels_last in memory, no copy.
                x = chunk.to(self._device, non_blocking=gpu).permute(0, 3, 1, 2).float()
                x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
                if self.choice is None:
                    features = self._choose(x, max(self.expected or 0, len(pixels) - start))
                else:
                    features = self._forward(x, self.choice.precision, self.choice.traced)
            out[start:start + len(chunk)] = features.cpu().numpy()
        return out

    def _forward(self, x, precision: str, traced: bool = False):
        import torch

        dtype = engine.autocast_dtype(precision)
        if dtype is None:  # the fp32 reference: the eager network, exactly as built
            features = self._model(x)
        else:
            with torch.autocast(self._device.type, dtype=dtype):
                features = (self._frozen(precision, x) if traced else self._model)(x)
        return torch.nn.functional.normalize(features.float(), dim=1)

    def _frozen(self, precision: str, x):
        """The network traced and frozen under autocast for a reduced precision: batch norms
        folded into the convolutions and the backend's fusions, a quarter faster than eager
        autocast on a CPU (docs/benchmarks.md), same weights. The eager network if tracing fails."""
        import torch

        if precision not in self._frozen_models:
            try:
                with warnings.catch_warnings(), torch.autocast(self._device.type,
                                                               dtype=engine.autocast_dtype(precision)):
                    warnings.simplefilter("ignore")  # the tracer's notes are for its own developers
                    model = torch.jit.freeze(torch.jit.trace(self._model, x[:2]))
            except Exception:  # an op the tracer or this backend does not take: eager autocast
                model = self._model
            self._frozen_models[precision] = model
        return self._frozen_models[precision]

    @property
    def active_precision(self) -> str:
        """The precision the first batch chose ("fp32" until then)."""
        return self.choice.precision if self.choice else "fp32"

    def _choose(self, x, images: int):
        """The first batch decides the engine for `images` images (vecsearch/engine.py): a kept
        measurement (checked on a sample), else a new one where the images repay timing, else
        the device's reduced precision at once where it is native (checked), else fp32."""
        device, kind = str(self._device), self._device.type
        options = engine.candidates(kind, self.precision)
        if self.precision == "auto" and not engine.native_reduced(kind):
            options = ()  # emulated bf16 on this CPU: slower than fp32, not worth a timing run
        if not options:
            self.choice = engine.Choice("fp32", device)
            return self._forward(x, "fp32")
        cache = key = None
        if self.precision == "auto" and self.home is not None:
            cache = engine.Cache(self.home)
            key = engine.cache_key(self._device, self.record, self.batch_size)
            kept = None if self.recheck else cache.get(key)
            if kept is not None:
                basis = f"as measured earlier, kept in {engine.CACHE_FILE}"
                choice = engine.plan(kept, images, device, guarded=True, basis=basis)
                return self._checked(x, choice, cache, key)
        if self.precision == "auto" and not self.recheck and not engine.measuring_pays(images, len(x)):
            basis = f"not timed: {images} images do not repay it"
            guess = engine.plan(engine.prior(options[0]), images, device, guarded=True, basis=basis)
            return self._checked(x, guess, cache, key)
        measured, vectors = engine.measure(self._forward, x, options, images)
        if cache is not None:
            cache.put(key, measured)
        self.choice = engine.plan(measured, images, device)
        if self.precision != "auto" and self.choice.precision == "fp32":
            reasons = "; ".join(why for _, why in self.choice.tried)
            warnings.warn(f"--precision {self.precision}: {reasons}; using fp32", stacklevel=3)
        return vectors[self.choice.precision, self.choice.traced]

    def _checked(self, x, choice: engine.Choice, cache: engine.Cache | None, key: dict | None):
        """Run a choice not measured in this process, compared with fp32 on a sample of the batch.
        One that moves the vectors is dropped (the cache then records fp32) with a warning."""
        if choice.precision == "fp32":
            self.choice = choice
            return self._forward(x, "fp32")
        features = self._forward(x, choice.precision, choice.traced)
        sample = features[:engine.GUARD_SAMPLE]
        cosine = float((self._forward(x[:len(sample)], "fp32") * sample).sum(dim=1).min())
        if cosine >= engine.MIN_COSINE:
            self.choice = dataclasses.replace(choice, min_cosine=min(choice.min_cosine, cosine))
            return features
        why = f"cosine to fp32 {cosine:.5f} < {engine.MIN_COSINE} on a sample of the first batch"
        self.choice = engine.Choice("fp32", choice.device, tried=((choice.precision, why),))
        if cache is not None:
            cache.put(key, engine.Measured("fp32", tried=self.choice.tried))
        warnings.warn(f"the {choice.precision} engine ({choice.basis}) no longer keeps the vectors: "
                      f"{why}; dropped, using fp32", stacklevel=4)
        return self._forward(x, "fp32")

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB Pillow images (as from images.open_image) -> n x 2048 float32, L2-normalised."""
        out = np.empty((len(images), models.DIM), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            out[start:start + len(chunk)] = self.embed_arrays(np.stack([model_input(i) for i in chunk]))
        return out

    def embed_file(self, path: str | os.PathLike) -> np.ndarray:
        """One image file, decoded exactly as `vecsearch load` decodes it -> (2048,) float32."""
        return self.embed_images([open_image(path)])[0]


# -- parallel decoding -------------------------------------------------------------------------


class _Mapped:
    """A map-style dataset: item i is fn(items[i]), computed in a DataLoader worker."""

    def __init__(self, items: Sequence[Any], fn: Callable[[Any], Any]) -> None:
        self.items, self.fn = items, fn

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.fn(self.items[i])


def _as_list(batch: list) -> list:
    return batch


def default_workers(gpu: bool = False) -> int:
    """Decode processes: all cores but the one the main process feeds the model from, at most 8
    on a CPU (the network needs cores too) and 16 for a GPU (which decoding must keep fed)."""
    return min(16 if gpu else 8, max(1, (os.cpu_count() or 2) - 1))


def map_batches(fn: Callable[[Any], Any], items: Sequence[Any], *, batch_size: int,
                workers: int) -> Iterator[list]:
    """[fn(x) for x in items] in order, in lists of `batch_size`, computed by `workers` processes.

    A torch DataLoader: each worker prepares up to two batches ahead, so decoding runs while the
    caller embeds and writes the previous batch, and memory stays bounded by batches in flight.
    The workers start (fork) in this call, before the caller starts any thread of its own.
    `fn` must return picklable values (numpy arrays, not tensors: no torch in the workers).
    workers=0 maps in this process (no overlap; for debugging).
    """
    if workers <= 0:
        return (list(map(fn, items[start:start + batch_size])) for start in range(0, len(items), batch_size))
    from torch.utils.data import DataLoader

    loader = DataLoader(_Mapped(items, fn), batch_size=batch_size, num_workers=workers,
                        collate_fn=_as_list, prefetch_factor=2, shuffle=False,
                        worker_init_fn=functools.partial(_worker_init, os.getpid()))
    return _drain(iter(loader))


def _worker_init(parent: int, worker_id: int) -> None:
    """Bind a forked decode worker's life to its parent's, and give it no share of its sockets.

    A forked worker holds copies of every socket the parent had open, its database sessions
    included: were it to outlive a SIGKILLed parent, the server would keep that session (and the
    advisory lock of the HNSW rebuild) alive. So its copies are pointed at /dev/null (the numbers
    stay taken, nothing reaches the server through them), and the kernel kills it when its parent
    dies (Linux: PR_SET_PDEATHSIG; elsewhere torch's own watchdog notices within seconds).
    """
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    _detach_sockets()


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _detach_sockets() -> None:
    import stat

    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd")]
    except OSError:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        if fd <= 2 or fd == null:
            continue
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


def _drain(iterator: Iterator[list]) -> Iterator[list]:
    try:
        yield from iterator
    finally:
        del iterator  # the last reference: its workers shut down now, also on an early exit


# -- the embedder of the recorded model, built on first use and kept --------------------------


def embed_images_with(embedder: Embedder) -> models.EmbedImages:
    """An EmbedImages (record, decoded images -> vectors) of one built embed.Embedder, refusing
    a database whose vectors another model made (Embedders.embed_images is the other kind)."""

    def embed_images(record: models.ModelRecord, images: Sequence[Any]) -> np.ndarray:
        if embedder.record != record:
            raise SchemaMismatch(models.mismatch_message(record, embedder.record))
        return embedder.embed_images(images)

    return embed_images


def recorded_model_embedder(weights: str | None = None, *, embedder: Any = None, device: str = "auto",
                            precision: str = "auto", home: Path | None = None) -> models.EmbedImages:
    """The EmbedImages of the recorded model: `embedder`'s (it must be that model), else this
    process's Embedders for `weights` and the engine (built on first use, then cached)."""
    if embedder is not None:
        return embed_images_with(embedder)
    return embedders(weights, device, precision, home).embed_images


def file_embedder(conn: psycopg.Connection, weights: str | None = None, *, embedder: Any = None,
                  device: str = "auto", precision: str = "auto", home: Path | None = None
                  ) -> Callable[[Path], np.ndarray]:
    """A function embedding image files with the recorded model (recorded_model_embedder's)."""
    embed_images = recorded_model_embedder(weights, embedder=embedder, device=device,
                                           precision=precision, home=home)

    def embed_file(path: Path) -> np.ndarray:
        if not Path(path).is_file():
            raise NotFound(f"no such image file: {path}")
        record = models.require_recorded(conn)
        return embed_images(record, [open_image(Path(path))])[0]

    return embed_file


class Embedders:
    """The embedder of the model a database records, built on first use (torch is imported then,
    and building takes seconds) and kept. One forward pass at a time: a ResNet50 forward already
    uses every core. A database re-embedded with another model meanwhile gets that model on the
    next call. `weights`: where the recorded model's weights come from (None: its own source);
    `device`, `precision`, `home`: its engine (embed.Embedder's).
    """

    def __init__(self, weights: str | None = None, device: str = "auto", precision: str = "auto",
                 home: Path | None = None) -> None:
        self.weights = weights
        self.engine = {"device": device, "precision": precision, "home": home}
        self._lock = threading.Lock()
        self._record: Any = None
        self._embedder: Any = None

    def embed_images(self, record: Any, images: Sequence[Any]) -> np.ndarray:
        """Decoded images (images.open_image) -> n x 2048 vectors of the model `record` names."""
        with self._lock:
            if self._embedder is None or record != self._record:
                self._embedder = Embedder.from_record(record, weights=self.weights, **self.engine)
                self._record = record
            return self._embedder.embed_images(images)


@functools.lru_cache(maxsize=4)
def embedders(weights: str | None = None, device: str = "auto", precision: str = "auto",
              home: Path | None = None) -> Embedders:
    """This process's Embedders for a weights source and engine (the CLI's; the web app keeps its own)."""
    return Embedders(weights, device, precision, home)
