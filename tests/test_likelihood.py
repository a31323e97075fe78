"""Held-out likelihood: the test loss (Monte Carlo negative bound on fixed draws) and the
importance-weighted NLL, each against the learner computed alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp

from baim_jax.core import bound, learners, losses
from baim_jax.core.baim import BAIM, BAIMConfig
from baim_jax.core.edge_model import EdgeModel
from baim_jax.evaluation import likelihood
from baim_jax.evaluation.data import Split


def _split(n, seed=1):
    x = np.asarray(jax.random.uniform(jax.random.key(seed), (n, 8, 8, 1)))
    return Split(x, np.arange(n, dtype=np.int32) % 3, (np.arange(n) % 2).astype(np.int32))


def _alone(edge, x, key):
    """The learner alone on one draw from ``key``: ``(rec + kl, log weight)`` ``[B]``."""
    spec, params = edge.learner_spec, edge.arrays()
    eps = bound.latent_noise(key, jnp.zeros(1, jnp.int32), len(x), spec.latent)[0]
    out = learners.learner_forward(spec, params, x, eps)
    rec = losses.nll(out["out"], jnp.zeros(()), x, spec.likelihood)
    kl = losses.kl_standard_normal(out["mean"], out["logvar"], jnp.ones(spec.latent, bool))
    z, mean, var = out["z"], out["mean"], jnp.exp(out["logvar"])
    log_q = jnp.sum(-0.5 * (z - mean) ** 2 / var - 0.5 * jnp.log(2 * jnp.pi * var), -1)
    log_p = jnp.sum(-0.5 * z ** 2 - 0.5 * jnp.log(2 * jnp.pi), -1)
    return np.asarray(rec + kl, np.float64), np.asarray(-rec + log_p - log_q, np.float64)


def test_test_loss_is_a_monte_carlo_negative_bound_on_fixed_draws():
    """Each image's loss is the mean over draws s of -log p(x | z_s) + KL with z_s = mu +
    sigma * eps_s from its posterior (computed here with the learner alone), the draws coming
    from key 0 folded by batch start and draw; not the posterior-mean value."""
    data = _split(6)
    edge = EdgeModel(mlp([8], 3, [8]), "a", seed=0)
    x = jnp.asarray(data.images)
    want = [_alone(edge, x, jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), s))[0]
            for s in range(3)]
    got = likelihood.image_bounds(edge, data, samples=3)
    np.testing.assert_allclose(got["nelbo"], np.mean(want, axis=0), rtol=1e-5)
    np.testing.assert_allclose(got["rec"] + got["kl"] + got["gate_kl"], got["nelbo"], rtol=1e-6)
    np.testing.assert_array_equal(got["gate_kl"], 0.0)
    np.testing.assert_array_equal(got["nelbo"], likelihood.image_bounds(edge, data, samples=3)[
        "nelbo"])
    posterior_mean = np.asarray(edge.forward(x)["nelbo"])
    assert np.abs(got["nelbo"] - posterior_mean).max() > 1e-3
    model = BAIM.assemble([mlp([8], 3, [8])] * 2, [0, 1], ["a", "b"], BAIMConfig(k=1, h=0))
    assert likelihood.image_bounds(model, data)["nelbo"].shape == (6,)


def test_iw_nll_of_an_edge_model_is_iwae_of_the_learner_alone():
    """``-log (1/k) sum_s p(x | z_s) p(z_s) / q(z_s | x)`` with the draws of key 1 folded by
    batch start and draw index, the densities written out here from their definitions. k = 11
    draws run as a step of ``bound.DRAWS_AT_ONCE`` = 8 and a remainder of 3."""
    data = _split(5)
    edge = EdgeModel(mlp([8], 3, [8]), "a", seed=2)
    x = jnp.asarray(data.images)
    key = jax.random.fold_in(jax.random.key(1), 0)
    log_w = np.stack([_alone(edge, x, jax.random.fold_in(key, s))[1] for s in range(11)])
    want = -(np.logaddexp.reduce(log_w, axis=0) - np.log(11))
    assert bound.DRAWS_AT_ONCE == 8
    np.testing.assert_allclose(likelihood.image_nll(edge, data, k=11), want, rtol=1e-5)
    bounds = likelihood.image_bounds(edge, data, samples=8)["nelbo"]
    assert np.mean(likelihood.image_nll(edge, data, k=64)) < np.mean(bounds)


def test_a_padded_last_batch_scores_its_images_as_alone(monkeypatch):
    """5 images in batches of 4: the last batch (1 image) is padded to 4 rows, and its image
    scores as the model scores it in a batch of its own under the same key (key 0 or 1 folded
    by the batch start 4, then by the draw): padding changes no image's noise. A split smaller
    than the batch pads to the power of two above its size, at most the batch: 3 images to 4,
    5 to 8 in batches of 500 or 8, 5 to 6 in batches of 6."""
    data = _split(5)
    x, tasks = jnp.asarray(data.images[4:]), data.tasks[4:]
    model = BAIM.assemble([mlp([8], 3, [8])] * 4, [0, 0, 1, 1], ["a", "b"],
                          BAIMConfig(k=2, h=1))
    edge = EdgeModel(mlp([8], 3, [8]), "a", seed=0)
    for m, task in ((model, tasks), (edge, None)):
        want = np.mean([m.bound(x, task=task, rng=jax.random.fold_in(
            jax.random.fold_in(jax.random.key(0), 4), s))["nelbo"] for s in range(2)], axis=0)
        got = likelihood.image_bounds(m, data, batch=4, samples=2)["nelbo"]
        assert got.shape == (5,)
        np.testing.assert_allclose(got[4:], want, rtol=1e-5)
        ids = m.task_ids(task if task is not None else 0, 1)
        alone = likelihood.iw_log_likelihood(m, x, ids, jax.random.fold_in(jax.random.key(1), 4),
                                             5)
        np.testing.assert_allclose(likelihood.image_nll(m, data, k=5, batch=4)[4:], -alone,
                                   rtol=1e-5)
    rows = []
    bounds = EdgeModel.bounds
    monkeypatch.setattr(EdgeModel, "bounds", lambda self, x, **kw: rows.append(len(x)) or bounds(
        self, x, **kw))
    likelihood.image_bounds(edge, data, batch=4, samples=1)
    likelihood.image_bounds(edge, _split(3), batch=4, samples=1)
    for batch in (500, 8, 6):
        likelihood.image_bounds(edge, data, batch=batch, samples=1)
    assert rows == [4, 4, 4, 8, 8, 6]


def test_per_class_means_and_bad_k():
    values = np.array([1.0, 2.0, 3.0, 5.0])
    assert likelihood.per_class(values, np.array([0, 1, 0, 1])) == {"0": 2.0, "1": 3.5}
    with pytest.raises(ValueError, match="k: must be a positive integer"):
        likelihood.image_nll(EdgeModel(mlp([8], 3, [8]), "a"), _split(2), k=0)
