"""The request lifecycle at an edge (paper Sec. III, step 7).

A request names a task, or carries images and lets the TSGate router choose each image's task.
The edge serves from its toolbox when it holds the model; otherwise it downloads the model from
the cloud's store (counting bytes and time), caches it and serves. A sensitive request takes
the model straight from the store and leaves nothing at the edge. Models the toolbox holds are
also kept in memory while they stay in the toolbox.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from baim_jax import checkpoint
from baim_jax.names import check_task_name
from baim_jax.service.store import ROUTER, ModelStore
from baim_jax.service.toolbox import Toolbox

MAX_NUM = 4096
MAX_IMAGES = 65536  # in one response: inputs, reconstructions and variations together


@dataclasses.dataclass(frozen=True)
class Request:
    """What a user asks of an edge.

    Attributes:
      task: the task's name; None lets the router choose per image (needs ``images``).
      images: ``[B, H, W, C]`` float32 in [0, 1] to reconstruct and vary, or None to sample.
      num: samples to draw (no images), or variations per image (at most ``MAX_NUM``;
        with images, ``len(images) * (2 + num)`` at most ``MAX_IMAGES``).
      sensitive: take the model straight from the store, never caching it at the edge.
      seed: the randomness of samples and variations.
    """

    task: str | None = None
    images: np.ndarray | None = None
    num: int = 64
    sensitive: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.task is None and self.images is None:
            raise ValueError("request: name a task or give images for the router to route")
        if self.task is not None:
            check_task_name(self.task)
        if isinstance(self.num, bool) or not isinstance(self.num, (int, np.integer)) or not (
                0 < self.num <= MAX_NUM):
            raise ValueError(f"num: {self.num!r} must be an integer in 1..{MAX_NUM}")
        if self.images is not None:
            x = self.images
            if not isinstance(x, np.ndarray) or x.ndim != 4 or not len(x):
                raise ValueError(f"images: expected a non-empty [batch, H, W, C] array, got "
                                 f"shape {np.shape(x)}")
            if len(x) * (2 + self.num) > MAX_IMAGES:
                raise ValueError(f"images: {len(x)} images with {self.num} variations each "
                                 f"make {len(x) * (2 + self.num)} images, more than one "
                                 f"response holds ({MAX_IMAGES}); send fewer or lower num")
            if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all() or (
                    x.min() < 0 or x.max() > 1):
                raise ValueError("images: values must be finite floats in [0, 1]")


@dataclasses.dataclass
class Response:
    """What the edge returns.

    Attributes:
      images: samples ``[num, H, W, C]``; with input images ``[B, 2 + num, H, W, C]``: each
        input, its reconstruction (posterior mean) and ``num`` variations (posterior samples).
      tasks: the task of each output row (sampled images share the request's task).
      sources: where each model used came from: ``"toolbox"``, ``"store"`` (downloaded and
        cached), ``"store, sensitive"``, ``"store, larger than the toolbox"``, ``"store, no
        toolbox"``; the router's key is ``"_router"``.
      bytes_downloaded: bytes read from the store.
      seconds: ``{"fetch", "compute", "total"}``.
      notes: anything the user should know (a damaged cached copy replaced, ...).
    """

    images: np.ndarray
    tasks: list[str]
    sources: dict[str, str]
    bytes_downloaded: int
    seconds: dict[str, float]
    notes: list[str]


def model_entry(store: ModelStore, key: str, toolbox: Toolbox | None = None,
                sensitive: bool = False) -> dict:
    """What a request for the model ``key`` is checked against (``image_shape``): the
    toolbox's entry for a model it holds (the store is not read), else the store's."""
    held = None if toolbox is None or sensitive else toolbox.contents().get(key)
    return held if held is not None and held["image_shape"] else store.entry(key)


def check_request(store: ModelStore, request: Request, toolbox: Toolbox | None = None) -> None:
    """Refuses a request that cannot be served (unknown task, no router, images of the wrong
    shape) before anything is fetched (see ``model_entry``)."""
    request.validate()
    entry = model_entry(store, request.task or ROUTER, toolbox, request.sensitive)
    if request.images is not None and list(request.images.shape[1:]) != entry["image_shape"]:
        raise ValueError(f"images: shape {tuple(request.images.shape)} does not fit the models, "
                         f"which take [batch, {', '.join(map(str, entry['image_shape']))}]")


class Edge:
    """An edge node serving requests.

    Args:
      store: the cloud's model store.
      toolbox: the edge's toolbox; None serves every request straight from the store.
    """

    def __init__(self, store: ModelStore, toolbox: Toolbox | None = None):
        self.store = store
        self.toolbox = toolbox
        self._memory: dict[str, tuple[int, object]] = {}

    def _model(self, key: str, sensitive: bool, out: dict):
        """Obtains a model and records where it came from in ``out``."""
        why = "sensitive" if sensitive else "no toolbox" if self.toolbox is None else None
        if (why is None and key not in self.toolbox.contents()
                and not self.toolbox.fits(self.store.entry(key)["bytes"])):
            why = "larger than the toolbox"
        if why is not None:
            entry, model = self.store.load(key)
            out["sources"][key] = f"store, {why}"
            out["bytes"] += entry["bytes"]
            return model
        held = self._memory.get(key)
        with self.toolbox.checkout(key, self.store,
                                   loaded=None if held is None else held[0]) as got:
            out["sources"][key] = got.source
            out["bytes"] += got.bytes_downloaded
            if got.note:
                out["notes"].append(f"{key}: {got.note}")
            if held is None or held[0] != got.revision:
                # The checkout has just checked every file against the manifest.
                held = (got.revision, checkpoint.load(got.path, check_digests=False))
                self._memory[key] = held
        return held[1]

    def _forget_evicted(self) -> None:
        contents = self.toolbox.contents() if self.toolbox is not None else {}
        for key in list(self._memory):
            if key not in contents or contents[key]["revision"] != self._memory[key][0]:
                del self._memory[key]

    def serve(self, request: Request) -> Response:
        """Serves one request (validated first; nothing is fetched for a bad one)."""
        check_request(self.store, request, self.toolbox)
        start = time.perf_counter()
        out = {"sources": {}, "bytes": 0, "notes": []}
        if request.task is not None:
            groups = {request.task: None if request.images is None
                      else np.arange(len(request.images))}
        else:
            router = self._model(ROUTER, request.sensitive, out)
            ids = np.asarray(router.route(request.images)["task"])
            groups = {router.tasks[t]: np.flatnonzero(ids == t) for t in np.unique(ids)}
        models = {t: self._model(t, request.sensitive, out) for t in groups}
        fetched = time.perf_counter()
        rng = jax.random.key(request.seed)
        if request.images is None:
            (task,) = groups
            images = np.asarray(models[task].sample(request.num, task=task, rng=rng))
            tasks = [task] * request.num
        else:
            images = np.zeros((len(request.images), 2 + request.num)
                              + request.images.shape[1:], np.float32)
            tasks = [""] * len(request.images)
            for task, rows in groups.items():
                images[rows] = _vary(models[task], request.images[rows], task, request.num, rng)
                for r in rows:
                    tasks[r] = task
        done = time.perf_counter()
        self._forget_evicted()
        return Response(images, tasks, out["sources"], out["bytes"],
                        {"fetch": fetched - start, "compute": done - fetched,
                         "total": done - start}, out["notes"])


def _vary(model, x: np.ndarray, task: str, num: int, rng: jax.Array) -> np.ndarray:
    """``[B, 2 + num, H, W, C]``: inputs, reconstructions, then ``num`` posterior variations."""
    rows = [x, np.asarray(model.reconstruct(x, task=task)["mean"])]
    for key in jax.random.split(rng, num):
        rows.append(np.asarray(model.reconstruct(x, task=task, rng=key)["mean"]))
    return np.stack(rows, axis=1)
