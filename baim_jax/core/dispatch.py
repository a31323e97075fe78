"""Which learner runs on which example, and where its rows sit (docs/design.md §2, Fig. 4).

For one input, what runs is its top-K learners plus the stages that feed them through kept
connections, transitively: a learner it does not pick may have to run only a prefix of its
stages (``needed_prefixes``). The stage positions of a learner, encoder then decoder, form one
chain; an example's *depth* at a learner is how many positions of that chain must run
(``chained_depth``: 0 when the learner is not needed, all of them when it is picked).

Each learner works on a buffer of ``R`` rows sorted by depth, deepest first, and position ``q``
of the chain runs on the first ``caps[q]`` rows only (``caps`` nonincreasing):

* dense layout (the reference): ``caps[q] = B``, every learner runs every position on every
  example, in batch order;
* capacity layout (the fast path, as vmoe): ``caps[q] = ceil(factor_q * B * K / N)``, one
  factor for every position or one per position, so that a feeder's rows stop at the stages it
  feeds from; a row that does not fit at a position it needs is *dropped* for that learner
  (counted), which changes the output. With no factor (``None``) every cap is B and nothing is
  ever dropped.

Compute at position ``q`` is ``N * caps[q]`` rows, i.e. grows with K (and the feeders' real
needs), not N.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Rows of each learner's buffer (a pytree; ``caps`` is static).

    Attributes:
      rows_of: ``[N, R]`` int, the example in each slot, deepest first (``B`` marks an empty
        slot).
      slot_of: ``[B + 1, N]`` int, the slot of each example in each learner's buffer (``R``
        where it has none; the last row, for the empty example, is all ``R``).
      dropped: scalar int, (example, learner) pairs that needed a position they did not fit.
      caps: rows run at each chained position (encoder positions, then decoder positions),
        nonincreasing, ``caps[0] == R``.
    """

    rows_of: jax.Array
    slot_of: jax.Array
    dropped: jax.Array
    caps: tuple[int, ...]


jax.tree_util.register_dataclass(Layout, data_fields=["rows_of", "slot_of", "dropped"],
                                 meta_fields=["caps"])


def capacity(batch: int, k: int, num_learners: int, factor: float | None) -> int:
    """Rows per learner buffer; ``B`` when ``factor`` is None (dropless)."""
    if factor is None:
        return batch
    if not factor > 0:
        raise ValueError(f"capacity_factor: must be > 0 or None, got {factor}")
    return int(min(batch, max(1, math.ceil(factor * batch * k / num_learners))))


def check_capacity_factor(factor: float | Sequence[float] | None, positions: int) -> None:
    """Refuses a list of capacity factors that is not one per stage position of the pool."""
    if factor is not None and not isinstance(factor, (int, float)) and len(factor) != positions:
        raise ValueError(f"capacity_factor: {len(factor)} factors given, the pool has "
                         f"{positions} stage positions")


def capacities(batch: int, k: int, num_learners: int,
               factor: float | Sequence[float] | None, positions: int) -> tuple[int, ...]:
    """Rows run at each of ``positions`` chained positions (see ``capacity``).

    Args:
      factor: None (B everywhere), one factor for every position, or one per position.

    Returns:
      ``positions`` caps, made nonincreasing (a deeper position never needs more rows than a
      shallower one: its rows are a subset).
    """
    check_capacity_factor(factor, positions)
    single = factor is None or isinstance(factor, (int, float))
    factors = [factor] * positions if single else factor
    caps = [capacity(batch, k, num_learners, f) for f in factors]
    return tuple(int(c) for c in np.minimum.accumulate(caps))


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


def chained_depth(prefixes: jax.Array) -> jax.Array:
    """``[B, N, 2] -> [B, N]``: positions of the encoder-then-decoder chain to run (a learner
    runs decoder positions only after its whole encoder, so the prefixes add up)."""
    return prefixes[..., 0] + prefixes[..., 1]


def dense_layout(batch: int, num_learners: int, positions: int) -> Layout:
    """Every learner at every position on every example, in batch order (the reference)."""
    rows = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32), (num_learners, batch))
    slots = jnp.broadcast_to(jnp.arange(batch + 1, dtype=jnp.int32)[:, None],
                             (batch + 1, num_learners))
    return Layout(rows, slots, jnp.zeros((), jnp.int32), (batch,) * positions)


def capacity_layout(depth: jax.Array, caps: Sequence[int]) -> Layout:
    """Sorts each learner's examples by depth, deepest first (ties in batch order), and keeps
    ``caps[0]`` of them; position ``q`` then runs on the first ``caps[q]`` slots.

    Args:
      depth: ``[B, N]`` int, chained positions to run (0: not needed).
      caps: rows run at each chained position, nonincreasing.
    """
    batch, num = depth.shape
    caps = tuple(int(c) for c in caps)
    positions, cap = len(caps), caps[0]
    example = jnp.arange(batch, dtype=jnp.int32)[:, None]
    key = jnp.where(depth > 0, positions - depth, positions + 1) * batch + example
    order = jnp.argsort(key, axis=0).astype(jnp.int32)                     # [B, N]
    learner = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), (batch, num))
    rank = jnp.zeros((batch, num), jnp.int32).at[order, learner].set(
        jnp.broadcast_to(example, (batch, num)))
    first = order[:cap]
    rows = jnp.where(jnp.take_along_axis(depth, first, axis=0) > 0, first, batch).T
    slot = jnp.where((depth > 0) & (rank < cap), rank, cap)
    slot_of = jnp.concatenate([slot, jnp.full((1, num), cap, jnp.int32)], axis=0)
    deepest_cap = jnp.asarray(caps, jnp.int32)[jnp.clip(depth - 1, 0, positions - 1)]
    dropped = jnp.sum((depth > 0) & (rank >= deepest_cap)).astype(jnp.int32)
    return Layout(rows, slot_of, dropped, caps)


def gather_rows(x: jax.Array, rows_of: jax.Array) -> jax.Array:
    """``x [B, ...] -> [N, R, ...]``; empty slots get zeros."""
    padded = jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)], axis=0)
    return padded[rows_of]


def gather_own_rows(x: jax.Array, rows_of: jax.Array) -> jax.Array:
    """``x [N, B, ...] -> [N, R, ...]``: each learner's own values of its rows (its latent
    noise, say); empty slots get zeros."""
    padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
    return padded[jnp.arange(x.shape[0])[:, None], rows_of]


def row_values(values: jax.Array, layout: Layout) -> jax.Array:
    """``values [N, R'] -> [B, N]``: each example's value in each learner's buffer, 0 where
    the learner did not run it (the inverse of ``gather_rows``, without combining)."""
    rows = values.shape[1]
    padded = jnp.concatenate([values, jnp.zeros_like(values[:, :1])], axis=1)
    learner = jnp.arange(values.shape[0])[None, :]
    return padded[learner, jnp.minimum(layout.slot_of[:-1], rows)]


def combine(values: jax.Array, weights: jax.Array, layout: Layout) -> jax.Array:
    """``sum_n weights[b, n] * values[n, slot_of[b, n]]`` by scattering from the buffers.

    Args:
      values: ``[N, R', ...]`` per-learner results on the first ``R' <= R`` slots (a position
        with a smaller cap); an example beyond them contributes nothing.
      weights: ``[B, N]``.
      layout: the layout the buffers follow.

    Returns:
      ``[B, ...]``.
    """
    batch = weights.shape[0]
    rows_of = layout.rows_of[:, :values.shape[1]]
    w = jnp.concatenate([weights, jnp.zeros((1, weights.shape[1]), weights.dtype)], axis=0)
    w_buf = w[rows_of, jnp.arange(weights.shape[1])[:, None]]
    contrib = values * w_buf.reshape(w_buf.shape + (1,) * (values.ndim - 2))
    flat = contrib.reshape(-1, *values.shape[2:])
    out = jax.ops.segment_sum(flat, rows_of.reshape(-1), num_segments=batch + 1)
    return out[:batch]


def surviving_weights(weights: jax.Array, selected: jax.Array, layout: Layout) -> jax.Array:
    """Gate weights renormalised over the selected learners that ran, in rows that lost one.

    A selected learner whose output stage did not fit its capacity is missing from the row's
    mixture; leaving its weight in place would score the row on less than a whole mixture and
    move its gate towards the dropped learner whatever that learner's loss. Rows that lost
    none keep their weights bit for bit; a row that lost all its learners gets zeros.

    Args:
      weights: ``[B, N]`` gate weights.
      selected: ``[B, N]`` bool, the gate's choice.
      layout: the layout the buffers follow (``caps[-1]``: rows of the output stage).

    Returns:
      ``[B, N]``.
    """
    ran = layout.slot_of[:-1] < layout.caps[-1]
    lost = jnp.any(selected & ~ran, axis=-1, keepdims=True)
    kept = jnp.where(ran, weights, 0.0)
    total = jnp.sum(kept, axis=-1, keepdims=True)
    return jnp.where(lost, kept / jnp.where(total > 0, total, 1.0), weights)
