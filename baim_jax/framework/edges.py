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

With a local validation shard per edge and a patience, each edge stops once its validation
loss has not improved for ``patience`` epochs and keeps its best parameters (docs/design.md
§1): its update is masked from then on, as for an edge whose epoch has ended.
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

from baim_jax.core import bound, learners, optim
from baim_jax.core.pool import Member, PoolLayout, run_pool


class TrainState(NamedTuple):
    """Stacked edge parameters and per-edge optimiser state (leading axis: edge)."""

    params: dict
    opt_state: optax.OptState


class EarlyStop(NamedTuple):
    """Each edge's early stopping (leading axis: edge).

    Attributes:
      best: stacked parameters of each edge's best epoch by its validation loss.
      loss: ``[E]`` that best validation loss (inf before the first epoch).
      best_epoch: ``[E]`` the epoch (1-based) it was reached at, 0 before.
      epochs: ``[E]`` epochs each edge has trained.
    """

    best: dict
    loss: jax.Array
    best_epoch: jax.Array
    epochs: jax.Array


VALIDATION_DRAWS = 4  # latent draws averaged per validation image (the same draws every epoch)


def local_validation(shard: np.ndarray, fraction: float, seed: int, edge: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)``: a random ``fraction`` (at least one image) of an edge's shard
    held out, drawn from ``(seed, edge)`` only."""
    order = np.random.default_rng([seed, edge, 7]).permutation(len(shard))
    held = max(1, round(fraction * len(shard)))
    if held >= len(shard):
        raise ValueError(f"edges[{edge}]: {len(shard)} images leave none to train on after "
                         f"holding out {held} for validation")
    return shard[np.sort(order[held:])], shard[np.sort(order[:held])]


def _pad_shards(shards: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(images [E, n_max, H, W, C], mask [E, n_max])``: shards zero-padded to the largest."""
    n_max = max(len(s) for s in shards)
    padded = np.zeros((len(shards), n_max) + tuple(shards[0].shape[1:]), np.float32)
    mask = np.zeros((len(shards), n_max), bool)
    for e, shard in enumerate(shards):
        padded[e, :len(shard)], mask[e, :len(shard)] = shard, True
    return padded, mask


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


def validation_loss(layout: PoolLayout, params: dict, images: jax.Array, mask: jax.Array,
                    rng: jax.Array) -> jax.Array:
    """Per-edge mean negative ELBO ``[E]`` of the validation shards ``images [E, v_max, H, W,
    C]`` (rows where ``mask [E, v_max]``), averaged over ``VALIDATION_DRAWS`` latent draws."""
    draws = [_nelbo(layout, params, images, mask, jax.random.fold_in(rng, d))
             for d in range(VALIDATION_DRAWS)]
    return sum(draws) / VALIDATION_DRAWS


def track_best(stop: EarlyStop, params: dict, loss: jax.Array, running: jax.Array
               ) -> EarlyStop:
    """``stop`` after an epoch that the ``running [E]`` edges trained, ending at validation
    ``loss [E]``: an edge that improved keeps these parameters as its best."""
    better = running & (loss < stop.loss)

    def pick(new, old):
        return jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    epochs = stop.epochs + running.astype(stop.epochs.dtype)
    return EarlyStop(jax.tree.map(pick, params, stop.best), jnp.where(better, loss, stop.loss),
                     jnp.where(better, epochs, stop.best_epoch), epochs)


class EdgeTrainer:
    """Trains E edge learners at once, sharded over the mesh axis ``edge``.

    Args:
      specs: ``[E]`` learner specs (one kind, image shape and likelihood).
      shards: ``[E]`` image arrays ``[n_e, H, W, C]``, each non-empty.
      batch_size, learning_rate: local training hyper-parameters.
      seed: data order and noise.
      params: optional starting parameters per edge (else fresh, drawn from ``seed``).
      devices: devices of the mesh (default: all).
      validation: optional ``[E]`` local validation shards; with ``patience``, each edge stops
        once its validation loss has not improved for ``patience`` epochs, and ``params()``
        gives its best epoch's parameters.
      patience: epochs without improvement before an edge stops (needs ``validation``).
      decay_steps: the learning rate decays by a cosine to 0 over this many steps of each
        edge (``optim.adam``); None: constant.
    """

    def __init__(self, specs: Sequence[learners.LearnerSpec], shards: Sequence[np.ndarray], *,
                 batch_size: int, learning_rate: float, seed: int,
                 params: Sequence[learners.Params] | None = None,
                 devices: Sequence[jax.Device] | None = None,
                 validation: Sequence[np.ndarray] | None = None, patience: int = 0,
                 decay_steps: int | None = None):
        if len(specs) != len(shards):
            raise ValueError(f"edges: {len(specs)} specs for {len(shards)} data shards")
        for e, shard in enumerate(shards):
            if len(shard) == 0:
                raise ValueError(f"edges[{e}]: no data")
        if (validation is None) != (patience == 0) or patience < 0:
            raise ValueError(f"edges: early stopping needs validation shards and a patience "
                             f">= 1 together (patience {patience})")
        if validation is not None and (len(validation) != len(shards)
                                       or any(len(v) == 0 for v in validation)):
            raise ValueError(f"edges: need one non-empty validation shard per edge, got "
                             f"{[len(v) for v in validation]}")
        self.specs = list(specs)
        self.layout = PoolLayout([Member(s, 0) for s in specs])
        self.sizes = [len(s) for s in shards]
        self.batch_size, self.seed = batch_size, seed
        self.mesh = edge_mesh(len(specs), devices)
        self.sharding = NamedSharding(self.mesh, PartitionSpec("edge"))
        self.images = jax.device_put(_pad_shards(shards)[0], self.sharding)
        self.patience, self.stop = patience, None
        if validation is not None:
            self.validation = self._place(_pad_shards(validation))
        self.tx = optim.adam(learning_rate, decay_steps)
        if params is None:
            key = jax.random.key(seed)
            params = [learners.init_learner(s, jax.random.fold_in(key, e))
                      for e, s in enumerate(specs)]
        self.state = self._fresh(params)
        self._step = jax.jit(functools.partial(train_step, self.layout, self.tx),
                             donate_argnums=0)
        self._validate = jax.jit(functools.partial(validation_loss, self.layout))
        self._track = jax.jit(track_best)

    @property
    def steps_per_epoch(self) -> int:
        return max(math.ceil(n / self.batch_size) for n in self.sizes)

    def _place(self, tree):
        return jax.device_put(tree, self.sharding)

    def _fresh(self, params: Sequence[learners.Params]) -> TrainState:
        stacked, _ = self.layout.stack(list(params))
        with jax.numpy_dtype_promotion("standard"):
            opt_state = jax.vmap(self.tx.init)(stacked)
        if self.patience:
            n = len(self.sizes)
            best = jax.tree.map(np.array, stacked)  # a copy: the steps consume (donate) the state
            self.stop = self._place(EarlyStop(best, jnp.full(n, jnp.inf), jnp.zeros(n, int),
                                              jnp.zeros(n, int)))
        return self._place(TrainState(stacked, opt_state))

    def _whole(self):
        """What a checkpoint holds: the training state, and the early stopping if any."""
        return (self.state, self.stop) if self.patience else self.state

    def state_leaves(self) -> list:
        """The training state as a flat list of arrays (for checkpoints)."""
        return jax.tree.leaves(self._whole())

    def load_state(self, leaves: list) -> None:
        """Restores ``state_leaves()`` output, placed on the mesh."""
        whole = self._place(jax.tree.unflatten(jax.tree.structure(self._whole()), leaves))
        self.state, self.stop = whole if self.patience else (whole, None)

    def reset(self, params: Sequence[learners.Params]) -> None:
        """Starts again from ``params`` with a fresh optimiser (a FedAvg round)."""
        self.state = self._fresh(params)

    @property
    def running(self) -> np.ndarray:
        """``[E]`` the edges still training (all of them without early stopping)."""
        if not self.patience:
            return np.ones(len(self.sizes), bool)
        stop = jax.device_get(self.stop)
        return stop.epochs - stop.best_epoch < self.patience

    @property
    def finished(self) -> bool:
        """Every edge has stopped: further epochs change nothing."""
        return not self.running.any()

    def stopping(self) -> dict:
        """Per edge, ``{"epochs", "best_epoch", "validation_loss"}`` lists (early stopping)."""
        stop = jax.device_get(self.stop)
        return {"epochs": stop.epochs.tolist(), "best_epoch": stop.best_epoch.tolist(),
                "validation_loss": stop.loss.tolist()}

    def run_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
        """One local epoch of every running edge. Returns the per-edge mean training loss
        ``[E]`` (NaN for an edge that has stopped)."""
        idx, mask, active = epoch_plan(self.sizes, self.batch_size, self.seed, epoch)
        running = self.running
        if not running.any():
            return np.full(len(self.sizes), np.nan)
        active &= running
        key = jax.random.fold_in(jax.random.key(self.seed), epoch)
        losses = []  # read back once, after the epoch: no host sync per step
        for s in range(len(idx)):
            self.state, loss = self._step(self.state, self.images,
                                          *self._place((idx[s], mask[s], active[s])),
                                          jax.random.fold_in(key, s))
            losses.append(loss)
            if on_step is not None:
                on_step()
        if self.patience:
            loss = self._validate(self.state.params, *self.validation,
                                  jax.random.key(self.seed + 1))
            self.stop = self._track(self.stop, self.state.params, loss, self._place(running))
        total = np.zeros(len(self.sizes))
        for loss, act in zip(jax.device_get(losses), active):
            total += loss * act
        return np.where(running, total / np.maximum(active.sum(axis=0), 1), np.nan)

    def params(self) -> list[learners.Params]:
        """Each edge's unpadded parameters (host arrays): its best epoch's with early
        stopping, else its latest."""
        return self.layout.unstack(self.stop.best if self.patience else self.state.params)


def lowered_step(spec: learners.LearnerSpec, batch_size: int) -> jax.stages.Lowered:
    """One edge's local training step with ``spec`` on ``batch_size`` images, lowered (for
    XLA's cost analysis; the learning rate, a constant of the step, changes no count)."""
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
    return jax.jit(functools.partial(train_step, layout, tx)).lower(state, *args)


@functools.lru_cache(maxsize=None)
def step_flops(spec: learners.LearnerSpec, batch_size: int) -> float:
    """FLOPs of one local training step of one edge with ``spec`` (``lowered_step``)."""
    return compiled_flops(lowered_step(spec, batch_size), COUNT_ONLY)


# Compiler options for code that is compiled only to be counted: the cost analysis reads the
# optimised HLO, which the backend's optimisation level does not change, so skipping LLVM's
# optimisation gives the same FLOPs in half the compile time (tested).
COUNT_ONLY = {"xla_backend_optimization_level": 0}


def compiled_flops(lowered: jax.stages.Lowered, compiler_options: dict | None = None) -> float:
    """FLOPs of a lowered computation, from XLA's cost analysis of the compiled code
    (``COUNT_ONLY``: for code that will not run; otherwise the compile is the one a run
    reuses)."""
    cost = lowered.compile(compiler_options).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0))
