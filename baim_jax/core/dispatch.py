"""Which learner runs on which example, and where its rows sit (DESIGN.md Sec. 2, Fig. 4).

For one input, what runs is its top-K learners plus the stages that feed them through kept
connections, transitively (``needed``). Each learner then works on a buffer of ``R`` rows:

* dense layout (the reference): ``R = B``, every learner runs on every example;
* capacity layout (the fast path, as vmoe): ``R = C = ceil(capacity_factor * B * K / N)``
  rows per learner, filled in batch order with the examples that need it; an example that
  does not fit is *dropped* for that learner (counted), which changes the output. With
  ``capacity_factor=None`` the capacity is B and nothing is ever dropped.

Compute on the buffers is ``N * C`` rows per stage, i.e. grows with K, not N.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Layout(NamedTuple):
    """Rows of each learner's buffer.

    Attributes:
      rows_of: ``[N, R]`` int, the example in each slot (``B`` marks an empty slot).
      slot_of: ``[B + 1, N]`` int, the slot of each example in each learner's buffer (``R``
        where it has none; the last row, for the empty example, is all ``R``).
      dropped: scalar int, (example, learner) pairs that were needed but did not fit.
    """

    rows_of: jax.Array
    slot_of: jax.Array
    dropped: jax.Array


def capacity(batch: int, k: int, num_learners: int, factor: float | None) -> int:
    """Rows per learner buffer; ``B`` when ``factor`` is None (dropless)."""
    if factor is None:
        return batch
    if factor <= 0:
        raise ValueError(f"capacity_factor: must be > 0 or None, got {factor}")
    return int(min(batch, max(1, math.ceil(factor * batch * k / num_learners))))


def needed_prefixes(active: jax.Array, conn: dict[str, np.ndarray], kept: jax.Array,
                    depths: tuple[int, int]) -> jax.Array:
    """How many positions of each tower every learner must run, per example.

    A kept connection ``(m, i) -> (n, j)`` whose target stage runs needs m's first ``i``
    positions of that tower (they produce ``a[m, i]``) and, in the decoder tower, m's whole
    encoder (for z_m). Iterated to the fixed point (at most ``enc + dec`` positions deep).

    Args:
      active: ``[B, N]`` bool, the gate's choice (all their stages run).
      conn: flat connection arrays (``src``, ``tgt``, ``tower``, ``i``, ``j``), ``[P]`` each.
      kept: ``[P]`` bool.
      depths: positions in the encoder and decoder towers.

    Returns:
      ``[B, N, 2]`` int: encoder and decoder positions to run.
    """
    enc_depth, dec_depth = depths
    need = jnp.stack([jnp.where(active, enc_depth, 0), jnp.where(active, dec_depth, 0)], -1)
    if len(conn["src"]) == 0:
        return need
    src, tgt, tower, i, j = (jnp.asarray(conn[k]) for k in ("src", "tgt", "tower", "i", "j"))
    num = active.shape[1]
    for _ in range(enc_depth + dec_depth):
        fires = (need[:, tgt, tower] > j) & kept
        enc_req = jnp.where(fires, jnp.where(tower == 0, i, enc_depth), 0)
        dec_req = jnp.where(fires & (tower == 1), i, 0)
        new = jnp.stack([jax.ops.segment_max(r.T, src, num_segments=num).T
                         for r in (enc_req, dec_req)], -1)
        need = jnp.maximum(need, new)
    return need


def needed(active: jax.Array, conn: dict[str, np.ndarray], kept: jax.Array,
           depths: tuple[int, int]) -> jax.Array:
    """``[B, N]`` bool: the learners with any stage to run for each example
    (see ``needed_prefixes``)."""
    return needed_prefixes(active, conn, kept, depths)[..., 0] > 0


def dense_layout(batch: int, num_learners: int) -> Layout:
    """Every learner on every example (the reference)."""
    rows = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32), (num_learners, batch))
    slots = jnp.broadcast_to(jnp.arange(batch + 1, dtype=jnp.int32)[:, None],
                             (batch + 1, num_learners))
    return Layout(rows, slots, jnp.zeros((), jnp.int32))


def capacity_layout(need: jax.Array, cap: int) -> Layout:
    """Fills each learner's ``cap`` slots in batch order with the examples that need it.

    Args:
      need: ``[B, N]`` bool.
      cap: slots per learner.
    """
    batch, num = need.shape
    pos = jnp.cumsum(need, axis=0, dtype=jnp.int32) - 1
    placed = need & (pos < cap)
    slot = jnp.where(placed, pos, cap)
    learner = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), (batch, num))
    example = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, num))
    rows = jnp.full((num, cap + 1), batch, jnp.int32).at[learner, slot].set(example)[:, :cap]
    slot_of = jnp.concatenate([slot, jnp.full((1, num), cap, jnp.int32)], axis=0)
    return Layout(rows, slot_of, jnp.sum(need & ~placed).astype(jnp.int32))


def gather_rows(x: jax.Array, rows_of: jax.Array) -> jax.Array:
    """``x [B, ...] -> [N, R, ...]``; empty slots get zeros."""
    padded = jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)], axis=0)
    return padded[rows_of]


def combine(values: jax.Array, weights: jax.Array, layout: Layout) -> jax.Array:
    """``sum_n weights[b, n] * values[n, slot_of[b, n]]`` by scattering from the buffers.

    Args:
      values: ``[N, R, ...]`` per-learner results.
      weights: ``[B, N]``.
      layout: the layout the buffers follow.

    Returns:
      ``[B, ...]``.
    """
    batch = weights.shape[0]
    w = jnp.concatenate([weights, jnp.zeros((1, weights.shape[1]), weights.dtype)], axis=0)
    w_buf = w[layout.rows_of, jnp.arange(weights.shape[1])[:, None]]
    contrib = values * w_buf.reshape(w_buf.shape + (1,) * (values.ndim - 2))
    flat = contrib.reshape(-1, *values.shape[2:])
    out = jax.ops.segment_sum(flat, layout.rows_of.reshape(-1), num_segments=batch + 1)
    return out[:batch]
