"""The run's measures of sample quality (docs/design.md §6 and §8): FID of a model's samples
against held-out real images, in the space of the dataset's feature network.

Fixed choices, stated in every report: the reference is the grayscale real test images (not
binarised); a model's samples are its mean images; a BAIM draws as many samples of each task
as the reference holds images of it; the floor is real held-out against real training images.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from baim_jax.core.spec import GenerativeModel
from baim_jax.evaluation import features
from baim_jax.evaluation.data import Split
from baim_jax.evaluation.fid import Extractor, fid

_LOADED: dict[Path, tuple[Extractor, dict]] = {}


def feature_space(cache: Path, dataset: str, train: Split, test: Split, *, num_classes: int,
                  epochs: int, seed: int) -> tuple[Extractor, dict]:
    """The feature extractor of ``dataset`` (trained on ``train`` once, cached in ``cache``)
    and its record (name, test accuracy)."""
    key = Path(cache).absolute() / dataset
    if key not in _LOADED:
        net, record = features.load_or_train(cache, dataset, train.images, train.labels,
                                             test.images, test.labels,
                                             num_classes=num_classes, epochs=epochs, seed=seed)
        _LOADED[key] = (features.extractor(net), record)
    return _LOADED[key]


def samples_like(model: GenerativeModel, real: Split, key: jax.Array) -> np.ndarray:
    """Samples of ``model`` matching ``real``: per task as many as ``real`` has images of it
    (a one-task model or an edge model: as many as ``real`` holds)."""
    if len(model.tasks) == 1:
        return np.asarray(model.sample(len(real.images), task=model.tasks[0], rng=key))
    out = []
    for t, name in enumerate(model.tasks):
        n = int(np.sum(real.tasks == t))
        if n:
            out.append(np.asarray(model.sample(n, task=name, rng=jax.random.fold_in(key, t))))
    return np.concatenate(out)


def model_fid(model: GenerativeModel, real: Split, extract: Extractor, seed: int) -> float:
    """FID of ``model``'s samples against the real images ``real``."""
    return fid(real.images, samples_like(model, real, jax.random.key(seed)), extract)
