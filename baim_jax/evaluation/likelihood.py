"""Held-out likelihood of any model kind (docs/design.md §6): the test loss (the negative bound
of §3b, with its parts) and the importance-weighted NLL (``test_nll``), one estimator for the
BAIM, task models, edge models, FedAvg's and the central model.

Both draw their noise from a fixed key by batch and draw, so every evaluation of a run uses the
same noise: epochs and models compare without the draws' own scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baim_jax.core import bound, edge_model
from baim_jax.core.baim import sample_rows
from baim_jax.evaluation.data import Split

BOUND_SAMPLES = 4
IW_SAMPLES = 64


def _batches(model, data: Split, batch: int):
    """``(start, images, task, n)`` of each batch, its first ``n`` rows real.

    A model of several tasks routes by the data's task ids, a model of one task (task model,
    edge model) takes every image as its own. Every batch has ``batch`` rows, or, in a split
    smaller than that, the power of two above the split's size (``sample_rows``), at most
    ``batch``: short batches are padded with copies of their last row, so that one compiled
    evaluation serves every batch and splits of similar sizes (compiling another costs more
    than one batch's compute). Every row's noise depends only on its batch's key and its own
    row (``bound``), never on the batch's size, so the real rows score as they would alone.
    """
    total = len(data.images)
    rows = min(batch, sample_rows(total))
    for i in range(0, total, batch):
        n = min(batch, total - i)
        take = np.concatenate([np.arange(i, i + n), np.full(rows - n, i + n - 1)])
        yield i, data.images[take], data.tasks[take] if len(model.tasks) > 1 else 0, n


def _draw_keys(key: jax.Array, n: int) -> jax.Array:
    """``[n]`` keys, ``fold_in(key, s)`` for the draws ``s = 0..n-1`` of one batch."""
    return jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(n))


def image_bounds(model, data: Split, *, batch: int = 500, samples: int = BOUND_SAMPLES,
                 key: jax.Array | None = None) -> dict[str, np.ndarray]:
    """The negative bound of every image and its parts, ``{"nelbo", "rec", "kl", "gate_kl"}``
    each ``[n]`` nats: the mean of ``samples`` one-draw estimates (unbiased)."""
    key = jax.random.key(0) if key is None else key
    out = {p: [] for p in bound.PARTS}
    for i, x, task, n in _batches(model, data, batch):
        draws = model.bounds(x, task=task, rngs=_draw_keys(jax.random.fold_in(key, i), samples))
        for p in bound.PARTS:
            out[p].append(np.asarray(draws[p], np.float64)[:, :n].mean(axis=0))
    return {p: np.concatenate(v) if v else np.zeros(0) for p, v in out.items()}


def _mixture_log_likelihood(log_weights, x, task, key, k: int):
    log_w, log_pi = log_weights(x, task, _draw_keys(key, k))
    return bound.mixture_log_likelihood(log_w, log_pi)


@nnx.jit(static_argnums=(4,), graph=False)
def _model_iw(model, x, task, key, k: int):
    return _mixture_log_likelihood(model.log_weights, x, task, key, k)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _learner_iw(spec, params, x, task, key, k: int):
    return _mixture_log_likelihood(functools.partial(edge_model.learner_log_weights, spec, params),
                                   x, task, key, k)


def iw_log_likelihood(model, x: jax.Array, task: jax.Array, key: jax.Array, k: int
                      ) -> jax.Array:
    """``log p(x | task)`` estimated from ``k`` draws of ``model.log_weights`` (keys
    ``fold_in(key, 0..k-1)``), ``[B]``, compiled once per model structure. An edge model's
    task is part of its structure but not of the estimate, so edge models compile once per
    learner spec."""
    if model.kind == "edge":
        return _learner_iw(model.learner_spec, model.arrays(), x, task, key, k)
    return _model_iw(model, x, task, key, k)


def image_nll(model, data: Split, *, k: int = IW_SAMPLES, batch: int = 250,
              key: jax.Array | None = None) -> np.ndarray:
    """Importance-weighted negative log-likelihood ``-log p(x | t)`` of every image, ``[n]``
    nats: k posterior draws for every learner of the image's squad
    (``bound.mixture_log_likelihood``), a stochastic upper bound of the NLL that tightens as
    k grows (Burda et al. 2016)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be a positive integer, got {k!r}")
    key = jax.random.key(1) if key is None else key
    out = []
    for i, x, task, n in _batches(model, data, batch):
        x = jnp.asarray(x, jnp.float32)
        ids = model.task_ids(task, x.shape[0])
        out.append(-np.asarray(iw_log_likelihood(model, x, ids, jax.random.fold_in(key, i), k),
                               np.float64)[:n])
    return np.concatenate(out) if out else np.zeros(0)


def test_loss(model, data: Split) -> float:
    """Mean negative bound (nats per image) of ``data`` (``image_bounds``)."""
    return float(image_bounds(model, data)["nelbo"].mean())


def per_class(values: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean of a per-image measure per class label (docs/design.md §8: with non-IID edges one
    rare class can dominate a task's score, so the classes are reported too)."""
    return {str(int(c)): float(values[labels == c].mean()) for c in np.unique(labels)}
