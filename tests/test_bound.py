"""The BAIM's bound, likelihood and sampler (docs/design.md §3b): hand-worked cases of the pure
functions, then a BAIM whose decoders are linear-Gaussian, so that log p(x | t) is known in
closed form, checked against its bound, its importance-weighted estimate and its samples."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp
from flax import nnx
from reference import randomize_connections, reference_paths

from baim_jax.core import bound
from baim_jax.core import connections as C
from baim_jax.core.baim import BAIM, BAIMConfig
from baim_jax.core.learners import LearnerSpec
from baim_jax.core.pool import Member
from baim_jax.evaluation import likelihood
from baim_jax.evaluation.data import Split

# ------------------------------------------------------------------------ hand-worked cases

def test_log_prior_is_a_softmax_within_each_squad():
    # logits (0, ln 3 | 1, 1 | 5), squads [0, 0, 1, 1, feeder]:
    #   squad 0: e^0 / (1 + 3) = 1/4, 3/4;  squad 1: 1/2, 1/2;  the feeder is never drawn.
    logits = jnp.array([0.0, np.log(3.0), 1.0, 1.0, 5.0], jnp.float32)
    got = bound.log_prior(logits, jnp.array([0, 0, 1, 1, -1], jnp.int32))
    np.testing.assert_allclose(np.exp(np.asarray(got)), [0.25, 0.75, 0.5, 0.5, 0.0], atol=1e-6)


def test_gate_kl_hand_cases():
    # pi = (1/4, 3/4 | 1/2, 1/2).
    #   w = pi on squad 0:        KL = 0.
    #   w = (1, 0) on squad 0:    KL = 1 * log(1 / (1/4)) = log 4 (0 log 0 = 0 for the other).
    #   w = (1/2, 1/2) on squad 0: KL = 1/2 log(2) + 1/2 log(2/3).
    #   w = (1/2, 1/2) on squad 1: KL = 0.
    log_pi = jnp.log(jnp.array([0.25, 0.75, 0.5, 0.5], jnp.float32))
    w = jnp.array([[0.25, 0.75, 0, 0], [1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]],
                  jnp.float32)
    np.testing.assert_allclose(np.asarray(bound.gate_kl(w, log_pi)),
                               [0.0, np.log(4), 0.5 * np.log(2) + 0.5 * np.log(2 / 3), 0.0],
                               atol=1e-6)


def test_draw_learners_inverts_the_cdf_in_learner_order():
    # pi (0, 1/4, 0, 3/4, 0): cdf (0, 1/4, 1/4, 1, 1). A uniform u picks the first learner
    # whose cdf exceeds u: u < 1/4 -> 1, u >= 1/4 -> 3 (learners of pi 0 never: their cdf step
    # is empty); u = 1 - 1e-7 still picks 3, never a trailing learner of pi 0.
    pi = jnp.array([0, 0.25, 0, 0.75, 0], jnp.float32)
    u = jnp.array([0.0, 0.2, 0.25, 0.5, 1 - 1e-7], jnp.float32)
    np.testing.assert_array_equal(np.asarray(bound.draw_learners(pi, u)), [1, 1, 3, 3, 3])


def test_mixture_log_likelihood_hand_case():
    # One row, k = 2 draws, learners (a, b, c) with c outside the squad:
    #   weights of a: (1, 3) -> mean 2;  of b: (2, 6) -> mean 4;  pi = (1/4, 3/4, -).
    #   log p = log(1/4 * 2 + 3/4 * 4) = log 3.5.
    log_w = jnp.log(jnp.array([[[1.0, 2.0, 0.0]], [[3.0, 6.0, 0.0]]], jnp.float32))
    log_pi = jnp.log(jnp.array([[0.25, 0.75, 0.0]], jnp.float32))
    np.testing.assert_allclose(float(bound.mixture_log_likelihood(log_w, log_pi)[0]),
                               np.log(3.5), rtol=1e-6)


def _three_learners(connections):
    """Three MLP learners with a hidden decoder stage (decoder stage 0: z -> 3, stage 1:
    3 -> image), one squad, the given connections."""
    members = [Member(mlp([4], 2, [3]), 0) for _ in range(3)]
    return BAIM(members, ["t"], BAIMConfig(k=1, h=1), rngs=nnx.Rngs(0), conns=connections)


def test_consumed_latents_follow_decoder_connections_transitively():
    # dec (2, stage 0) -> (0, stage 0): learner 0's decoder input mixes in z_2;
    # dec (0, stage 1) -> (1, stage 1): learner 1's output stage reads learner 0's hidden
    #   features, computed from z_0 and (through the first connection) z_2;
    # enc (1, stage 1) -> (2, stage 1): an encoder connection, which shapes q only.
    #   C(0) = {0, 2}, C(1) = {0, 1, 2}, C(2) = {2}.
    conns = [C.Connection("dec", 2, 0, 0, 0), C.Connection("dec", 0, 1, 1, 1),
             C.Connection("enc", 1, 1, 2, 1)]
    model = _three_learners(conns)
    np.testing.assert_array_equal(np.asarray(model.consumed()),
                                  [[1, 0, 1], [1, 1, 1], [0, 0, 1]])
    # Pruning the first connection cuts z_2 out of paths 0 and 1.
    first = [g_idx for g_idx, g in enumerate(model.conns.groups) if 0 in g.index][0]
    model.kept[first][...] = jnp.zeros_like(model.kept[first][...])
    np.testing.assert_array_equal(np.asarray(model.consumed()),
                                  [[1, 0, 0], [1, 1, 0], [0, 0, 1]])


def test_a_feeder_whose_latent_reaches_the_selected_decoder_adds_its_kl():
    """K = 1, learner 0 selected; a kept decoder connection from learner 1 feeds it, so the
    bound's KL is KL_0 + KL_1 (each from the learner's own posterior); pruned, KL_0 alone."""
    conns = [C.Connection("dec", 1, 0, 0, 0)]
    model = _three_learners(conns)
    randomize_connections(model, 0, 0.5)
    x = jax.random.uniform(jax.random.key(1), (5, 8, 8, 1))
    selected = jnp.zeros((5, 3), bool).at[:, 0].set(True)
    task = jnp.zeros(5, jnp.int32)
    paths = reference_paths(model, x, jnp.zeros((3, 5, 2)))
    kl = [np.asarray(0.5 * jnp.sum(jnp.exp(p["logvar"]) + p["mean"] ** 2 - 1 - p["logvar"], -1))
          for p in paths]
    out = model.forward(x, task, selected=selected)
    np.testing.assert_allclose(np.asarray(out["kl"]), kl[0] + kl[1], rtol=1e-5)
    assert float(jnp.min(out["gate_kl"])) >= 0
    model.kept[0][...] = jnp.zeros_like(model.kept[0][...])
    np.testing.assert_allclose(np.asarray(model.forward(x, task, selected=selected)["kl"]), kl[0],
                               rtol=1e-5)


# ---------------------------------------------------------------- a linear-Gaussian BAIM

IMAGE = (2, 2, 1)
LATENTS = (1, 2, 1)


def _linear_gaussian(k: int, latent: str = "own") -> BAIM:
    """Three learners of one squad, each decoder a single linear map z -> mean with a learned
    pixel scale; decoder connections from every learner's z to every other's decoder input,
    encoder connections too; a non-uniform prior pi."""
    specs = [LearnerSpec("mlp", IMAGE, (3,), d, (), "gaussian") for d in LATENTS]
    model = BAIM.assemble(specs, [0, 0, 0], ["t"], BAIMConfig(k=k, h=0, latent=latent))
    randomize_connections(model, 7, 0.6)
    model.learners["log_scale"][...] = jnp.array([-0.4, -0.2, -0.6], jnp.float32)
    model.prior[...] = jnp.array([0.4, -0.3, 0.1], jnp.float32)
    for var in model.learners["enc"][-1].values():   # q near the prior: light-tailed weights
        var[...] = 0.1 * var[...]
    model.learners["dec"][0]["kernel"][...] = 0.5 * model.learners["dec"][0]["kernel"][...]
    return model


def _decoders(model: BAIM) -> list[dict]:
    """Per learner n: ``(W_n [d_n, D], b_n [D], sigma_n)`` and the kept decoder projections
    ``P[m] [d_m, d_n]`` into it (float64)."""
    tree = model.export_tree()
    out = []
    for n in range(model.layout.size):
        dec = tree["learners"][n]["dec"][0]
        out.append({"W": np.asarray(dec["kernel"], np.float64).reshape(LATENTS[n], -1),
                    "b": np.asarray(dec["bias"], np.float64).ravel(),
                    "sigma": float(np.exp(tree["learners"][n]["log_scale"])), "P": {}})
    for c, kernel, kept in zip(model.conns.connections, tree["connections"], model.kept_flat()):
        if kept and c.tower == "dec":
            out[c.tgt]["P"][c.src] = np.asarray(kernel, np.float64)
    return out


def _path_maps(model: BAIM, dec: list[dict], n: int) -> dict[int, np.ndarray]:
    """``mean_n(z) = b_n + sum_{m in C(n)} z_m G_m``: the maps ``G_m [d_m, D]``. Shared
    latents: feeder m decodes ``z_n`` cut or zero-padded to ``d_m`` (``z_n I[d_n, d_m]``), so
    ``C(n) = {n}`` and ``G_n = W_n + sum_m I[d_n, d_m] P_m W_n``."""
    own = {m: p @ dec[n]["W"] for m, p in dec[n]["P"].items()}
    if model.config.latent == "shared":
        d = dec[n]["W"].shape[0]
        return {n: dec[n]["W"] + sum(np.eye(d, len(g)) @ g for g in own.values())}
    return {n: dec[n]["W"], **own}


def _exact_log_likelihood(model: BAIM, x: np.ndarray) -> np.ndarray:
    """``log p(x | t) = log sum_n pi_n N(x; b_n, A_n A_n^T + sigma_n^2 I)`` per row (float64)."""
    dec = _decoders(model)
    pi = np.exp(np.asarray(model.log_prior(), np.float64))
    flat = x.reshape(len(x), -1).astype(np.float64)
    dim = flat.shape[1]
    terms = []
    for n in range(model.layout.size):
        a = np.concatenate(list(_path_maps(model, dec, n).values()), axis=0).T      # [D, sum d]
        cov = a @ a.T + dec[n]["sigma"] ** 2 * np.eye(dim)
        diff = flat - dec[n]["b"]
        _, logdet = np.linalg.slogdet(cov)
        maha = np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff)
        terms.append(np.log(pi[n]) - 0.5 * (dim * np.log(2 * np.pi) + logdet + maha))
    return np.logaddexp.reduce(np.stack(terms), axis=0)


def _expected_negative_bound(model: BAIM, x: np.ndarray) -> np.ndarray:
    """``-sum_n w_n (E_q[log p_n(x | z)] - sum_{m in C(n)} KL_m + log pi_n - log w_n)`` in
    closed form (float64), with q's means and variances from the loop reference."""
    dec = _decoders(model)
    log_pi = np.asarray(model.log_prior(), np.float64)
    paths = reference_paths(model, jnp.asarray(x), jnp.zeros((3, len(x), max(LATENTS))))
    mean = [np.asarray(p["mean"], np.float64) for p in paths]
    var = [np.exp(np.asarray(p["logvar"], np.float64)) for p in paths]
    kl = [0.5 * np.sum(v + m ** 2 - 1 - np.log(v), axis=1) for m, v in zip(mean, var)]
    w = np.asarray(model.route(jnp.asarray(x), jnp.zeros(len(x), jnp.int32)).weights, np.float64)
    flat = x.reshape(len(x), -1).astype(np.float64)
    dim = flat.shape[1]
    total = np.zeros(len(x))
    for n in range(model.layout.size):
        maps = _path_maps(model, dec, n)
        mu = dec[n]["b"] + sum(mean[m] @ g for m, g in maps.items())
        spread = sum(var[m] @ (g ** 2) for m, g in maps.items())                 # [B, D]
        s2 = dec[n]["sigma"] ** 2
        rec = 0.5 * dim * np.log(2 * np.pi * s2) + np.sum((flat - mu) ** 2 + spread, 1) / (2 * s2)
        term = rec + sum(kl[m] for m in maps) - log_pi[n] + np.log(np.where(w[:, n] > 0,
                                                                             w[:, n], 1.0))
        total += np.where(w[:, n] > 0, w[:, n] * term, 0.0)
    return total


def _points(n: int = 6) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(11), (n, *IMAGE)), np.float32)


@pytest.mark.parametrize("k,latent", [(1, "own"), (2, "own"), (2, "shared")])
def test_bound_is_below_the_exact_likelihood_and_is_what_the_model_reports(k, latent):
    """(a) The expected negative bound, in closed form, is >= -log p(x | t) at every point;
    the model's one-draw bounds average to it (4000 independent draws a point: every row of
    a batch draws its own noise)."""
    model = _linear_gaussian(k, latent)
    x = _points()
    exact = -_exact_log_likelihood(model, x)
    expected = _expected_negative_bound(model, x)
    assert np.all(expected >= exact), (expected, exact)
    draws = 4000
    rows = jnp.asarray(np.repeat(x, draws, axis=0))
    got = np.asarray(model.bound(rows, task="t", rng=jax.random.key(3))["nelbo"],
                     np.float64).reshape(len(x), draws)
    sem = got.std(axis=1) / np.sqrt(draws)
    np.testing.assert_array_less(np.abs(got.mean(axis=1) - expected), 5 * sem + 1e-3)


@pytest.mark.parametrize("latent", ["own", "shared"])
def test_several_draws_at_once_are_the_draws_one_at_a_time(latent):
    """``bounds`` runs the gate and encoders once for all keys; each key's row is what
    ``bound`` gives for that key alone (decoder and encoder connections, K = 2)."""
    model, x = _linear_gaussian(2, latent), _points()
    keys = jax.random.split(jax.random.key(5), 3)
    several = model.bounds(x, task="t", rngs=keys)
    for s, key in enumerate(keys):
        one = model.bound(x, task="t", rng=key)
        for part in ("nelbo", "rec", "kl", "gate_kl"):
            np.testing.assert_allclose(several[part][s], one[part], rtol=1e-5, atol=1e-5)
    assert not np.allclose(several["nelbo"][0], several["nelbo"][1])


@pytest.mark.parametrize("latent", ["own", "shared"])
def test_importance_weighted_nll_approaches_the_exact_nll(latent):
    """(b) More importance samples, a tighter estimate: averaged over 24 points and 4 keys,
    the gap to the exact NLL shrinks from k = 1 to 8 to 64, and at k = 1024 it is within 0.02
    nats of zero (a stochastic upper bound of the NLL, up to its Monte Carlo error)."""
    model = _linear_gaussian(2, latent)
    x = _points(24)
    data = Split(x, np.zeros(len(x), np.int32), np.zeros(len(x), np.int32))
    exact = -_exact_log_likelihood(model, x)
    gaps = [np.mean([likelihood.image_nll(model, data, k=k, key=jax.random.key(s)) - exact
                     for s in range(4)]) for k in (1, 8, 64, 1024)]
    assert gaps[0] > gaps[1] > gaps[2] - 0.02 and gaps[1] > 0.05, gaps
    assert abs(gaps[3]) < 0.02, gaps


@pytest.mark.parametrize("latent", ["own", "shared"])
def test_samples_have_the_model_s_mean_and_covariance(latent):
    """(c) Ancestral samples: learner n is drawn with probability pi_n, and given n the
    decoder means have mean b_n and covariance A_n A_n^T (every consumed latent an independent
    N(0, I)), each within 5 standard errors of 20000 draws."""
    model = _linear_gaussian(2, latent)
    dec = _decoders(model)
    pi = np.exp(np.asarray(model.log_prior(), np.float64))
    n = 20000
    drawn = model.draw(n, task="t", rng=jax.random.key(5))
    out = np.asarray(drawn["out"], np.float64).reshape(n, -1)
    learner = np.asarray(drawn["learner"])
    freq = np.bincount(learner, minlength=3) / n
    np.testing.assert_array_less(np.abs(freq - pi), 5 * np.sqrt(pi * (1 - pi) / n))
    for j in range(3):
        rows = out[learner == j]
        a = np.concatenate(list(_path_maps(model, dec, j).values()), axis=0).T
        cov = a @ a.T
        count = len(rows)
        np.testing.assert_array_less(np.abs(rows.mean(0) - dec[j]["b"]),
                                     5 * np.sqrt(np.diag(cov) / count) + 1e-6)
        se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / count)
        np.testing.assert_array_less(np.abs(np.cov(rows.T) - cov), 5 * se + 1e-6)


@pytest.mark.parametrize("latent", ["own", "shared"])
def test_task_model_equals_the_baim_in_bound_likelihood_and_samples(mlp_specs, latent):
    """Partition loses nothing of the generative model: for a fixed key, a task model's
    bound, importance-weighted NLL and samples are the BAIM's for that task."""
    from baim_jax.core.partition import partition

    model = BAIM.assemble(mlp_specs, [0, 1, 0, 1], ["a", "b"],
                          BAIMConfig(k=2, h=1, latent=latent))
    randomize_connections(model, 2, 0.3)
    model.prior[...] = jnp.array([0.3, -0.2, 0.5, 0.1], jnp.float32)
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1))
    data = Split(np.asarray(x), np.zeros(6, np.int32), np.zeros(6, np.int32))
    task_model = partition(model, "a")
    key = jax.random.key(4)
    chex.assert_trees_all_close(task_model.bound(x, rng=key), model.bound(x, task="a", rng=key),
                                rtol=1e-5)
    np.testing.assert_allclose(likelihood.image_nll(task_model, data, k=8),
                               likelihood.image_nll(model, data, k=8), rtol=1e-5)
    got, want = task_model.draw(9, task=None, rng=key), model.draw(9, task="a", rng=key)
    chex.assert_trees_all_close(got["images"], want["images"], atol=1e-6)
    squad = [n for n, m in enumerate(model.layout.members) if m.squad == 0]
    np.testing.assert_array_equal(np.asarray(squad)[np.asarray(got["learner"])],
                                  np.asarray(want["learner"]))
