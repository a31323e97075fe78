"""Edge training (paper Sec. III, step 1): every edge trains its own model on its local data.

All edges train at once: their heterogeneous learners live in one padded pool (``core.pool``,
leading axis = edge) and every step runs all of them on a batch of their own data. The edge
axis is sharded over a mesh axis ``edge`` (``jit`` with ``NamedSharding``), so the same code
runs on one device, on N simulated CPU devices and on accelerators. Unequal data sizes are
handled as fedjax does: each edge's shard is padded to the largest, every batch carries a row
mask, and an edge whose epoch has ended sits out the remaining steps (its update is masked,
optimiser state included). Adam is elementwise with a per-edge step count, and an edge's data
order and noise depend only on (seed, epoch, step, its index), so what an edge learns does not
depend on the other edges: their models or their data (tested).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from baim_jax.core import bound, learners
from baim_jax.core.pool import Member, PoolLayout, run_pool


class TrainState(NamedTuple):
    """Stacked edge parameters and per-edge optimiser state (leading axis: edge)."""

    params: dict
    opt_state: optax.OptState


def edge_mesh(num_edges: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ``("edge",)`` over the largest number of devices that divides ``num_edges``."""
    devices = list(devices or jax.devices())
    size = max(d for d in range(1, len(devices) + 1) if num_edges % d == 0)
    return Mesh(np.array(devices[:size]), ("edge",), axis_types=(AxisType.Auto,))


def epoch_plan(sizes: Sequence[int], batch_size: int, seed: int, epoch: int):
    """Batches of one epoch for every edge.

    Each edge visits a fresh permutation of its shard in batches of ``batch_size``; the last
    batch may be short (masked rows). Edges with fewer batches sit out the last steps.

    Returns:
      ``(idx [S, E, B] int, mask [S, E, B] bool, active [S, E] bool)``, ``S`` the largest
      number of batches of any edge.
    """
    batches = [math.ceil(n / batch_size) for n in sizes]
    steps = max(batches)
    idx = np.zeros((steps, len(sizes), batch_size), np.int32)
    mask = np.zeros((steps, len(sizes), batch_size), bool)
    for e, n in enumerate(sizes):
        order = np.random.default_rng([seed, epoch, e]).permutation(n)
        for s in range(batches[e]):
            chunk = order[s * batch_size:(s + 1) * batch_size]
            idx[s, e, :len(chunk)] = chunk
            mask[s, e, :len(chunk)] = True
    return idx, mask, mask.any(axis=2)


def _nelbo(layout: PoolLayout, params: dict, x: jax.Array, mask: jax.Array, rng: jax.Array):
    """Per-edge mean negative ELBO ``[E]`` of ``x [E, B, H, W, C]`` over the unmasked rows.

    Edge e's latent noise is ``bound.latent_noise(fold_in(rng, e), [0], ...)``, what its model
    draws alone (``EdgeModel``): it depends on neither the other edges nor the pool's padded
    latent size.
    """
    eps = jax.vmap(lambda e: bound.latent_noise(jax.random.fold_in(rng, e), jnp.zeros(1, jnp.int32),
                                                x.shape[1], layout.latent)[0])(
        jnp.arange(x.shape[0]))
    buf = run_pool(layout, params, x, eps)
    weight = mask.astype(x.dtype)
    return jnp.sum((buf["rec"] + buf["kl"]) * weight, axis=1) / jnp.maximum(
        jnp.sum(weight, axis=1), 1.0)


def train_step(layout: PoolLayout, tx: optax.GradientTransformation, state: TrainState,
               images: jax.Array, idx: jax.Array, mask: jax.Array, active: jax.Array,
               rng: jax.Array) -> tuple[TrainState, jax.Array]:
    """One step of every edge.

    Args:
      images: ``[E, n_max, H, W, C]`` each edge's padded shard (stays on the devices).
      idx, mask: ``[E, B]`` rows of this step and which of them are real.
      active: ``[E]`` edges that take this step.

    Returns:
      the new state and the per-edge training loss ``[E]``.
    """
    x = jax.vmap(lambda im, i: im[i])(images, idx)

    def loss(params):
        per_edge = _nelbo(layout, params, x, mask, rng)
        return jnp.sum(per_edge), per_edge

    grads, per_edge = jax.grad(loss, has_aux=True)(state.params)
    with jax.numpy_dtype_promotion("standard"):  # optax: float ** int32 step count
        updates, opt_state = jax.vmap(tx.update)(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(params, opt_state)

    def keep(n, o):
        return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(keep, new, state), per_edge


class EdgeTrainer:
    """Trains E edge learners at once, sharded over the mesh axis ``edge``.

    Args:
      specs: ``[E]`` learner specs (one kind, image shape and likelihood).
      shards: ``[E]`` image arrays ``[n_e, H, W, C]``, each non-empty.
      batch_size, learning_rate: local training hyper-parameters.
      seed: data order and noise.
      params: optional starting parameters per edge (else fresh, drawn from ``seed``).
      devices: devices of the mesh (default: all).
    """

    def __init__(self, specs: Sequence[learners.LearnerSpec], shards: Sequence[np.ndarray], *,
                 batch_size: int, learning_rate: float, seed: int,
                 params: Sequence[learners.Params] | None = None,
                 devices: Sequence[jax.Device] | None = None):
        if len(specs) != len(shards):
            raise ValueError(f"edges: {len(specs)} specs for {len(shards)} data shards")
        for e, shard in enumerate(shards):
            if len(shard) == 0:
                raise ValueError(f"edges[{e}]: no data")
        self.specs = list(specs)
        self.layout = PoolLayout([Member(s, 0) for s in specs])
        self.sizes = [len(s) for s in shards]
        self.batch_size, self.seed = batch_size, seed
        self.mesh = edge_mesh(len(specs), devices)
        self.sharding = NamedSharding(self.mesh, PartitionSpec("edge"))
        padded = np.zeros((len(shards), max(self.sizes)) + tuple(shards[0].shape[1:]), np.float32)
        for e, shard in enumerate(shards):
            padded[e, :len(shard)] = shard
        self.images = jax.device_put(padded, self.sharding)
        self.tx = optax.adam(learning_rate)
        if params is None:
            key = jax.random.key(seed)
            params = [learners.init_learner(s, jax.random.fold_in(key, e))
                      for e, s in enumerate(specs)]
        self.state = self._fresh(params)
        self._step = jax.jit(functools.partial(train_step, self.layout, self.tx),
                             donate_argnums=0)

    @property
    def steps_per_epoch(self) -> int:
        return max(math.ceil(n / self.batch_size) for n in self.sizes)

    def _place(self, tree):
        return jax.device_put(tree, self.sharding)

    def _fresh(self, params: Sequence[learners.Params]) -> TrainState:
        stacked, _ = self.layout.stack(list(params))
        with jax.numpy_dtype_promotion("standard"):
            opt_state = jax.vmap(self.tx.init)(stacked)
        return self._place(TrainState(stacked, opt_state))

    def state_leaves(self) -> list:
        """The training state as a flat list of arrays (for checkpoints)."""
        return jax.tree.leaves(self.state)

    def load_state(self, leaves: list) -> None:
        """Restores ``state_leaves()`` output, placed on the mesh."""
        self.state = self._place(jax.tree.unflatten(jax.tree.structure(self.state), leaves))

    def reset(self, params: Sequence[learners.Params]) -> None:
        """Starts again from ``params`` with a fresh optimiser (a FedAvg round)."""
        self.state = self._fresh(params)

    def run_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
        """One local epoch of every edge. Returns the per-edge mean training loss ``[E]``."""
        idx, mask, active = epoch_plan(self.sizes, self.batch_size, self.seed, epoch)
        key = jax.random.fold_in(jax.random.key(self.seed), epoch)
        losses = []  # read back once, after the epoch: no host sync per step
        for s in range(len(idx)):
            self.state, loss = self._step(self.state, self.images,
                                          *self._place((idx[s], mask[s], active[s])),
                                          jax.random.fold_in(key, s))
            losses.append(loss)
            if on_step is not None:
                on_step()
        total = np.zeros(len(self.sizes))
        for loss, act in zip(jax.device_get(losses), active):
            total += loss * act
        return total / np.maximum(active.sum(axis=0), 1)

    def params(self) -> list[learners.Params]:
        """Each edge's unpadded parameters (host arrays)."""
        return self.layout.unstack(self.state.params)


@functools.lru_cache(maxsize=None)
def step_flops(spec: learners.LearnerSpec, batch_size: int) -> float:
    """FLOPs of one local training step of one edge with ``spec`` (XLA's cost analysis; the
    learning rate, a constant of the step, changes none)."""
    layout = PoolLayout([Member(spec, 0)])
    tx = optax.adam(1e-3)
    stacked, _ = layout.stack([learners.init_learner(spec, jax.random.key(0))])
    with jax.numpy_dtype_promotion("standard"):
        state = jax.eval_shape(lambda p: TrainState(p, jax.vmap(tx.init)(p)), stacked)
    shape = (1, batch_size) + spec.image_shape
    args = (jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct((1, batch_size), jnp.int32),
            jax.ShapeDtypeStruct((1, batch_size), jnp.bool_),
            jax.ShapeDtypeStruct((1,), jnp.bool_), jax.random.key(0))
    return compiled_flops(jax.jit(functools.partial(train_step, layout, tx)).lower(state, *args))


def compiled_flops(lowered: jax.stages.Lowered) -> float:
    """FLOPs of a lowered computation, from XLA's cost analysis of the compiled code."""
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0))
