"""Likelihoods and latent densities of the learners (docs/design.md §3b).

All terms are in nats per image (summed over pixels and latent coordinates).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def binarize(x: jax.Array) -> jax.Array:
    """Fixed-threshold binarisation (the Bernoulli target)."""
    return (x > 0.5).astype(x.dtype)


def _pixels(v: jax.Array) -> jax.Array:
    """``[..., H, W, C] -> [..., H W C]``: losses are computed on flat pixels (measured on a
    2-core CPU: about 10% of a BAIM grad step saved against image-shaped terms summed over
    three axes, one of them of size 1)."""
    return v.reshape(*v.shape[: v.ndim - 3], -1)


@jax.custom_jvp
def softplus(a: jax.Array) -> jax.Array:
    """``log(1 + e^a)`` as ``max(a, 0) + log1p(exp(-|a|))`` (stable), with the exact
    derivative ``sigmoid(a)`` everywhere (the subgradients of max and abs would give 0 at
    ``a = 0``). Faster here than ``jax.nn.softplus``."""
    return jnp.maximum(a, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(a)))


@softplus.defjvp
def _softplus_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    return softplus(a), jax.nn.sigmoid(a) * da


def bernoulli_nll(logits: jax.Array, x: jax.Array) -> jax.Array:
    """``-log p(binarize(x) | logits) = softplus(a) - t a``, summed over ``[H, W, C]``.

    The barrier keeps the sum over one flat pixel axis: without it XLA moves the reshape of
    a pool's concatenated image-shaped outputs past the sum, and XLA:CPU fuses a sum over
    ``(H, W, C)`` that took half the time of the case-study BAIM's bound.
    """
    a, t = jax.lax.optimization_barrier((_pixels(logits), _pixels(binarize(x))))
    return jnp.sum(softplus(a) - t * a, axis=-1)


def gaussian_nll(mean: jax.Array, log_scale: jax.Array, x: jax.Array) -> jax.Array:
    """``-log N(x | mean, exp(log_scale)^2)``, summed over ``[H, W, C]``.

    ``log_scale`` broadcasts against the leading (batch) axes of ``mean``.
    """
    ls = log_scale.reshape(log_scale.shape + (1,))
    z = (_pixels(x) - _pixels(mean)) * jnp.exp(-ls)
    return jnp.sum(0.5 * z * z + ls + 0.5 * math.log(2 * math.pi), axis=-1)


def kl_standard_normal(mean: jax.Array, logvar: jax.Array, mask: jax.Array) -> jax.Array:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` over the real (``mask``) coordinates.

    Args:
      mean, logvar: ``[..., L]``; mask: bool, broadcasting against them.

    Returns:
      ``[...]`` nats.
    """
    kl = 0.5 * (jnp.exp(logvar) + mean * mean - 1.0 - logvar)
    return jnp.sum(jnp.where(mask, kl, 0.0), axis=-1)


def log_density_ratio(eps: jax.Array, z: jax.Array, logvar: jax.Array,
                      mask: jax.Array) -> jax.Array:
    """``log q(z | x) - log N(z; 0, I)`` of a reparameterised draw ``z = mean + std * eps``,
    summed over the real (``mask``) coordinates of ``[..., L]``; ``[...]`` nats."""
    ratio = 0.5 * (z * z - eps * eps - logvar)
    return jnp.sum(jnp.where(mask, ratio, 0.0), axis=-1)


def pixel_mean(out: jax.Array, likelihood: str) -> jax.Array:
    """The mean image in [0, 1] from raw stage output (logits or Gaussian means)."""
    return jax.nn.sigmoid(out) if likelihood == "bernoulli" else jnp.clip(out, 0.0, 1.0)


def nll(out: jax.Array, log_scale: jax.Array, x: jax.Array, likelihood: str) -> jax.Array:
    """``-log p(x | out)`` ``[...]`` nats for raw output ``out [..., H, W, C]`` (logits or
    Gaussian means; ``log_scale`` broadcasts against the leading axes, unused by Bernoulli)."""
    if likelihood == "bernoulli":
        return bernoulli_nll(out, x)
    return gaussian_nll(out, log_scale, x)
