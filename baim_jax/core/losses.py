"""Likelihoods, KL and the two ways of combining learners (DESIGN.md Sec. 3).

* mixture (default): ``sum_n w_n (reconstruction_n + KL_n)``, the gated mixture bound;
* blend: reconstruction of the weighted output ``sum_n w_n out_n`` plus ``sum_n w_n KL_n``.

All terms are in nats per image (summed over pixels and latent coordinates).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

COMBINES = ("mixture", "blend")


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
    """``-log p(binarize(x) | logits) = softplus(a) - t a``, summed over ``[H, W, C]``."""
    a, t = _pixels(logits), _pixels(binarize(x))
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


def pixel_mean(out: jax.Array, likelihood: str) -> jax.Array:
    """The mean image in [0, 1] from raw stage output (logits or Gaussian means)."""
    return jax.nn.sigmoid(out) if likelihood == "bernoulli" else jnp.clip(out, 0.0, 1.0)


def nll(out: jax.Array, log_scale: jax.Array, x: jax.Array, likelihood: str) -> jax.Array:
    """``-log p(x | out)`` ``[...]`` nats for raw output ``out [..., H, W, C]`` (logits or
    Gaussian means; ``log_scale`` broadcasts against the leading axes, unused by Bernoulli)."""
    if likelihood == "bernoulli":
        return bernoulli_nll(out, x)
    return gaussian_nll(out, log_scale, x)


def blend_parts(out: jax.Array, likelihood: str) -> jax.Array:
    """What the blend weighs, per learner, from raw output ``[N, R, *image]``.

    Bernoulli: ``sigmoid(out)`` and ``sigmoid(-out)`` stacked on a new last axis, so that the
    weighted probability of either pixel value keeps its own precision (``1 - p`` rounds to 0
    in float32 once the logit passes about 17). Gaussian: the raw means, unclipped (clipping
    would change the likelihood and stop its gradient outside [0, 1]).
    """
    if likelihood == "bernoulli":
        return jnp.stack([jax.nn.sigmoid(out), jax.nn.sigmoid(-out)], axis=-1)
    return out


def blend_nll(parts: jax.Array, scale: jax.Array, x: jax.Array, likelihood: str) -> jax.Array:
    """Reconstruction term of the blend (DESIGN.md Sec. 3), ``[B]`` nats.

    Args:
      parts: the gate-weighted ``blend_parts`` of the selected learners, ``[B, *image, 2]``
        (Bernoulli: weighted probabilities of 1 and of 0) or ``[B, *image]`` (Gaussian means).
      scale: ``[B]`` the weighted pixel standard deviation (Gaussian).
      x: ``[B, H, W, C]`` images in [0, 1].
    """
    if likelihood == "bernoulli":
        t = _pixels(binarize(x))
        tiny = jnp.finfo(parts.dtype).tiny
        log_p1 = jnp.log(jnp.maximum(_pixels(parts[..., 0]), tiny))
        log_p0 = jnp.log(jnp.maximum(_pixels(parts[..., 1]), tiny))
        return -jnp.sum(t * log_p1 + (1.0 - t) * log_p0, axis=-1)
    return gaussian_nll(parts, jnp.log(scale), x)
