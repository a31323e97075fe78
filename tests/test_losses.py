"""Likelihoods and KL (docs/design.md §3), hand-worked: nats per image, summed over pixels."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from baim_jax.core import losses


def test_bernoulli_nll_hand_worked_and_stable_at_large_logits():
    # One image of 1 x 5 x 1 pixels. Targets binarise at 0.5: x = .2 .9 .6 1 0 -> t = 0 1 1 1 0.
    # Per pixel -log p = softplus(a) if t = 0, softplus(-a) if t = 1:
    #   a = 0, t = 0: log 2 = 0.693147;  a = 2, t = 1: log(1 + e^-2) = 0.126928;
    #   a = -3, t = 1: log(1 + e^3) = 3.048587;  a = +-50 on the right side: e^-50, about 0.
    logits = jnp.array([0.0, 2.0, -3.0, 50.0, -50.0]).reshape(1, 1, 5, 1)
    x = jnp.array([0.2, 0.9, 0.6, 1.0, 0.0]).reshape(1, 1, 5, 1)
    expected = math.log(2) + math.log1p(math.exp(-2)) + math.log1p(math.exp(3))
    chex.assert_trees_all_close(losses.bernoulli_nll(logits, x), jnp.array([expected]),
                                rtol=1e-6)
    # Far on the wrong side the loss is the logit itself, and the gradient stays finite.
    wrong = losses.bernoulli_nll(jnp.full((1, 1, 1, 1), -80.0), jnp.ones((1, 1, 1, 1)))
    chex.assert_trees_all_close(wrong, jnp.array([80.0]))
    grad = jax.grad(lambda a: losses.bernoulli_nll(a, x).sum())(logits)
    # d/da = sigmoid(a) - t: 0.5, sigmoid(2) - 1, sigmoid(-3) - 1, about 0, about 0.
    sig = 1 / (1 + np.exp(-np.array([0.0, 2.0, -3.0, 50.0, -50.0])))
    chex.assert_trees_all_close(grad.ravel(), jnp.asarray(sig - np.array([0, 1, 1, 1, 0])),
                                atol=1e-6)


def test_gaussian_nll_hand_worked_with_a_scale_per_leading_row():
    # Two images of 2 x 1 x 1 pixels, mean 0.5. Row 0: log_scale 0, x = 0.5 and 1.5, so
    # z = 0 and 1: 0.5 (0 + 1) + 2 * 0.5 log(2 pi) = 0.5 + log(2 pi) = 2.337877.
    # Row 1: log_scale log 2, x = 0.5 and 2.5, z = 0 and 1 again: 2.337877 + 2 log 2.
    mean = jnp.full((2, 2, 1, 1), 0.5)
    x = jnp.array([[0.5, 1.5], [0.5, 2.5]]).reshape(2, 2, 1, 1)
    got = losses.gaussian_nll(mean, jnp.array([0.0, math.log(2)]), x)
    base = 0.5 + math.log(2 * math.pi)
    chex.assert_trees_all_close(got, jnp.array([base, base + 2 * math.log(2)]), rtol=1e-6)


def test_kl_counts_only_the_real_latent_coordinates():
    # KL(N(m, e^lv) || N(0, 1)) = 0.5 (e^lv + m^2 - 1 - lv): m = 1, lv = 0 gives 0.5;
    # m = 0, lv = log 2 gives 0.5 (2 - 1 - log 2) = 0.153426; the third coordinate is padding.
    mean = jnp.array([[1.0, 0.0, 7.0]])
    logvar = jnp.array([[0.0, math.log(2), 3.0]])
    got = losses.kl_standard_normal(mean, logvar, jnp.array([[True, True, False]]))
    chex.assert_trees_all_close(got, jnp.array([0.5 + 0.5 * (1 - math.log(2))]), rtol=1e-6)
