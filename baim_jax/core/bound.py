"""The BAIM as a latent-variable model: its latents, its bound and its sampler's draws
(docs/design.md §3b). Small pure functions; the BAIM, task models and edge models use them.

For task t, learner n of squad t models ``p_n(x) = E_{z_C(n)}[p_n(x | z_C(n))]``, where
``C(n)`` holds n and every learner whose decoder features reach n's decoder through kept
connections (transitively); each consumed latent has its own prior N(0, I) and its own
posterior with its own noise. The task's model is the mixture ``p(x | t) = sum_n pi_n p_n(x)``
and, with the LSGate weights ``w(x)`` as ``q(n | x)``,

    log p(x | t) >= sum_n w_n (ELBO_n + log pi_n - log w_n),
    ELBO_n = E_q[log p_n(x | z_C(n))] - sum_{m in C(n)} KL(q_m || N(0, I)).

With ``latent = "shared"`` every decoder on n's path decodes n's own latent instead (cut or
zero-padded to its size, ``shared_latents``): ``C(n) = {n}``, one KL per path.

Axes: B rows, N learners, L the pool's latent size, k importance samples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from baim_jax.core import dispatch

PARTS = ("nelbo", "rec", "kl", "gate_kl")  # a bound and its parts: nelbo = rec + kl + gate_kl
DRAWS_AT_ONCE = 8  # importance draws vectorised per loop step (benchmarks/likelihood_cost.py)


def map_draws(draw, rngs: jax.Array):
    """``jax.lax.map(draw, rngs)``: one draw per key, ``DRAWS_AT_ONCE`` of them vectorised a
    step. The values are a plain ``lax.map``'s; on XLA:CPU that (one draw a step, no batch
    axis) ran 4x slower (benchmarks/likelihood_cost.py).

    Args:
      draw: a key to a pytree of arrays (one importance draw); rngs: ``[k]`` keys.
    """
    return jax.lax.map(draw, rngs, batch_size=min(DRAWS_AT_ONCE, rngs.shape[0]))


def latent_noise(key: jax.Array, streams: jax.Array, batch: int, size: int) -> jax.Array:
    """Independent standard normal noise of every learner, ``[N, batch, size]``.

    Entry ``[n, b, d]`` depends only on ``(key, streams[n], d, b)``: a learner's noise does not
    depend on the other learners, on the pool's padded latent size or (``jax.random`` draws by
    position) on the number of rows drawn, so a task model draws exactly the BAIM's noise for
    the same learners.

    Args:
      key: a PRNG key.
      streams: ``[N]`` int, each learner's noise stream (``pool.PoolLayout.streams``).
      batch, size: rows and latent coordinates.
    """
    def column(stream, d):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, stream), d),
                                 (batch,))

    cols = jax.vmap(jax.vmap(column, (None, 0)), (0, None))(
        jnp.asarray(streams), jnp.arange(size))                     # [N, size, batch]
    return jnp.swapaxes(cols, 1, 2)


def consumed(conn: dict[str, np.ndarray], kept: jax.Array, depths: tuple[int, int],
             num: int) -> jax.Array:
    """``C`` as a matrix: ``[N, N]`` bool, row n marks the latents learner n's path consumes.

    ``z_m`` is consumed by n's path when m's whole encoder must run for n, which only kept
    decoder connections ask for (an encoder connection from position i needs m's first i < E
    encoder positions; ``dispatch.needed_prefixes``). The diagonal is True.

    Args:
      conn: flat connection arrays (``ConnectionSet.flat_arrays``); kept: ``[P]`` bool.
      depths: positions of the encoder and decoder towers; num: N.
    """
    need = dispatch.needed_prefixes(jnp.eye(num, dtype=bool), conn, kept, depths)
    return need[..., 0] == depths[0]


def shared_latents(z: jax.Array, source: jax.Array, mask: jax.Array) -> jax.Array:
    """The decoders' inputs when a path shares its latent: learner m decodes
    ``z[source[r], r]`` on row r, cut or zero-padded to m's latent size, ``[N, R, L]``.

    Args:
      z: ``[N, R, L]`` every learner's latent (zero beyond its own size).
      source: ``[R]`` int, the learner whose path each row computes.
      mask: ``[N, L]`` bool, each learner's real latent coordinates.
    """
    return jnp.where(mask[:, None, :], z[source, jnp.arange(z.shape[1])][None], 0.0)


def log_prior(logits: jax.Array, segment_of: jax.Array) -> jax.Array:
    """``log pi_n``: a softmax of ``logits [N]`` within each learner's squad, ``[N]``
    (-inf for a feeder, ``segment_of == -1``, which the mixture never draws)."""
    same = segment_of[:, None] == segment_of[None, :]                        # [N, N]
    norm = jax.nn.logsumexp(jnp.where(same, logits[None, :], -jnp.inf), axis=1)
    return jnp.where(segment_of >= 0, logits - norm, -jnp.inf)


def gate_kl(weights: jax.Array, log_pi: jax.Array) -> jax.Array:
    """``KL(w || pi) = sum_n w_n (log w_n - log pi_n)`` per row, ``[B]`` nats (0 log 0 = 0).

    Args:
      weights: ``[B, N]`` the gate's weights, rows summing to 1 over the selected learners.
      log_pi: ``[N]`` or ``[B, N]`` the prior's log-probabilities.
    """
    on = weights > 0
    safe = jnp.where(on, weights, 1.0)
    lp = jnp.where(on, jnp.broadcast_to(log_pi, weights.shape), 0.0)
    return jnp.sum(jnp.where(on, weights * (jnp.log(safe) - lp), 0.0), axis=-1)


def mixture_log_likelihood(log_w: jax.Array, log_pi: jax.Array) -> jax.Array:
    """The importance-weighted estimate of ``log p(x | t)``, ``[B]``.

    Every learner of the row's squad gets the same k draws of its path's latents from the
    posteriors (stratified over the learner choice), so the estimate
    ``log sum_n pi_n (1/k) sum_s exp(log_w[s, b, n])`` is a stochastic lower bound that tends
    to ``log p(x | t)`` as k grows.

    Args:
      log_w: ``[k, B, N]`` ``log p_n(x | z_s) + sum_{m in C(n)} (log p(z_m) - log q(z_m | x))``
        per draw s (-inf for learners outside the row's squad).
      log_pi: ``[B, N]`` the prior's log-probabilities over the row's squad.
    """
    k = log_w.shape[0]
    per_learner = jax.nn.logsumexp(log_w, axis=0) - math.log(k)              # [B, N]
    terms = jnp.where(jnp.isfinite(log_pi), log_pi + per_learner, -jnp.inf)
    return jax.nn.logsumexp(terms, axis=-1)


def draw_learners(pi: jax.Array, u: jax.Array) -> jax.Array:
    """Learners drawn from ``pi [N]`` by inverting its CDF at uniforms ``u [n]``, ``[n]`` int.

    Inverting in learner order (zeros outside the squad) makes a task model, whose squad
    keeps the BAIM's order, draw the BAIM's learners for the same uniforms.
    """
    cdf = jnp.cumsum(pi)
    last = jnp.max(jnp.where(pi > 0, jnp.arange(pi.shape[0]), 0))
    pick = jnp.sum(cdf[None, :] <= u[:, None] * cdf[-1], axis=-1)
    return jnp.minimum(pick, last).astype(jnp.int32)
