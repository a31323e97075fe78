"""The cloud (paper Sec. III, steps 2 to 6): aggregation of the uploads into the BAIM, its
training with a strategy and connection pruning, and the same loop for personalising a task
model at an edge."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baim_jax.core import connections, optim, strategies
from baim_jax.core.baim import BAIM, BAIMConfig
from baim_jax.core.edge_model import EdgeModel
from baim_jax.evaluation import likelihood
from baim_jax.evaluation.data import Split


def aggregate(uploads: Sequence[EdgeModel], tasks: Sequence[str], config: BAIMConfig, *,
              seed: int = 0, max_upload_params: int | None = None) -> BAIM:
    """Assembles the BAIM from the edges' uploaded models (docs/design.md §5).

    Each upload is checked first (its task is one of ``tasks``, its parameters match its spec
    and are finite, its size is within ``max_upload_params``); a bad one raises ``ValueError``
    naming the upload, before anything is built. Squads come from the uploads' tasks.

    Returns:
      the BAIM; its learner ``n`` is upload ``model.order[n]``.
    """
    if not uploads:
        raise ValueError("uploads: no edge model to aggregate")
    squads = []
    for e, up in enumerate(uploads):
        if getattr(up, "kind", None) != "edge":
            raise ValueError(f"upload {e}: not an edge model ({type(up).__name__})")
        if up.task not in tasks:
            raise ValueError(f"upload {e}: task {up.task!r} is not one of {list(tasks)}")
        params = up.spec.params.total
        if max_upload_params is not None and params > max_upload_params:
            raise ValueError(f"upload {e}: {params} parameters, more than the cloud accepts "
                             f"({max_upload_params})")
        if not all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(up.arrays())):
            raise ValueError(f"upload {e}: parameters hold non-finite values")
        squads.append(list(tasks).index(up.task))
    return BAIM.assemble([up.learner_spec for up in uploads], squads, list(tasks), config,
                         seed=seed,
                         params=[jax.tree.map(np.asarray, up.arrays()) for up in uploads])


DECODER_PRUNINGS = ("magnitude", "kl_cost")  # cloud.decoder_pruning


def _mean_nelbo(model: BAIM, data: Split) -> float:
    return float(likelihood.image_bounds(model, data)["nelbo"].mean())


def prune_links_by_bound(model: BAIM, data: Split) -> list[tuple[int, int]]:
    """Decoder links pruned by their KL cost (docs/design.md §10).

    A link ``(m, n)`` is every kept decoder connection from learner m into learner n. With it,
    m's latent reaches n's path and pays its KL there; without it, that KL and what m's
    features gave n's reconstruction are gone. Each link in turn is dropped when the mean
    negative bound of ``data`` (``likelihood.image_bounds``: the same draws with and without)
    is no higher without it. Passes repeat until one drops nothing, so every link left raises
    the bound when dropped alone. The dropped connections' kernels are zeroed.

    Returns:
      the links ``(m, n)`` dropped, in the order they were.
    """
    conns = model.conns.connections
    kept = model.kept_flat()
    best = _mean_nelbo(model, data)
    dropped: list[tuple[int, int]] = []
    while True:
        links = sorted({(c.src, c.tgt) for c, k in zip(conns, kept) if k and c.tower == "dec"})
        before = len(dropped)
        for link in links:
            trial = kept & ~np.array([c.tower == "dec" and (c.src, c.tgt) == link
                                      for c in conns])
            model.set_kept(trial)
            loss = _mean_nelbo(model, data)
            if loss <= best:
                kept, best = trial, loss
                dropped.append(link)
        model.set_kept(kept, zero=True)
        if len(dropped) == before:
            return dropped


@dataclasses.dataclass(frozen=True)
class Pruning:
    """Magnitude pruning to ``rho`` along the cubic schedule (``connections.kept_fraction``):
    every ``every`` global steps from ``start`` on, and at step ``end`` itself, so that the
    kept fraction reaches ``rho`` even when ``end`` is not a multiple of ``every``. With
    ``links`` (images), decoder links are then pruned by their KL cost at step ``end``
    (``prune_links_by_bound``)."""

    rho: float
    start: int
    end: int
    every: int
    links: Split | None = None

    @classmethod
    def over(cls, total_steps: int, rho: float, start: float, end: float,
             every: int, links: Split | None = None) -> "Pruning":
        """The schedule of a run of ``total_steps``, its start and end given as fractions."""
        return cls(rho, int(start * total_steps), max(int(end * total_steps), 1), every, links)

    def after_step(self, model: BAIM, step: int) -> None:
        if step >= self.start and (step % self.every == 0 or step == self.end):
            model.prune_connections(connections.kept_fraction(step, self.rho, self.start, self.end))
        if step == self.end and self.links is not None:
            prune_links_by_bound(model, self.links)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """A fresh permutation of ``n`` examples in full batches (one batch of all when n < B)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    size = min(batch_size, n)
    return [order[i:i + size] for i in range(0, n - size + 1, size)]


class Trainer:
    """Trains a BAIM (or a TaskModel) on its data epoch by epoch with one strategy.

    Args:
      model: the model, trained in place.
      strategy: ``finetune``, ``freeze`` or ``scratch`` (``strategies.prepare`` must already
        have been applied).
      data: the images and task ids it trains on.
      learning_rate, batch_size, seed: optimiser, batches, noise.
      decay_steps: the learning rate decays by a cosine to 0 over this many steps
        (``optim.adam``); None: constant.
      pruning: optional connection pruning schedule.
    """

    def __init__(self, model: BAIM, strategy: str, data: Split, *, learning_rate: float,
                 batch_size: int, seed: int, pruning: Pruning | None = None,
                 decay_steps: int | None = None):
        self.model, self.strategy, self.data = model, strategy, data
        self.batch_size, self.seed, self.pruning = batch_size, seed, pruning
        self.optimizer = strategies.make_optimizer(model, strategy,
                                                    optim.adam(learning_rate, decay_steps))
        self.step = strategies.make_train_step(model, self.optimizer, strategy)

    def state_leaves(self) -> list:
        """The model's and optimiser's state as a flat list of arrays (for checkpoints). The
        arrays themselves, not copies: the next step consumes them (its state is donated)."""
        return jax.tree.leaves(nnx.state((self.model, self.optimizer)))

    def load_state(self, leaves: list) -> None:
        """Restores ``state_leaves()`` output into the model and optimiser, as copies (so the
        steps, which consume the state, never consume arrays another holder still uses)."""
        treedef = jax.tree.structure(nnx.state((self.model, self.optimizer)))
        nnx.update((self.model, self.optimizer),
                   jax.tree.unflatten(treedef, [jnp.array(leaf, copy=True) for leaf in leaves]))

    @property
    def steps_per_epoch(self) -> int:
        return len(epoch_batches(len(self.data.images), self.batch_size, 0, 0))

    def run_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> dict:
        """One epoch over the data; returns the epoch's mean training metrics."""
        data = self.data
        batches = epoch_batches(len(data.images), self.batch_size, self.seed, epoch)
        key = jax.random.fold_in(jax.random.key(self.seed), epoch)
        steps = []  # read back once, after the epoch: no host sync per step
        for s, idx in enumerate(batches):
            steps.append(self.step(jnp.asarray(data.images[idx]), jnp.asarray(data.tasks[idx]),
                                   jax.random.fold_in(key, s)))
            if self.pruning is not None:
                self.pruning.after_step(self.model, epoch * len(batches) + s + 1)
            if on_step is not None:
                on_step()
        sums: dict[str, float] = {}
        for metrics in jax.device_get(steps):
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / len(batches) for k, v in sums.items()}

    def lower(self):
        """The compiled train step for one batch of the data (for cost analysis)."""
        data = self.data
        idx = epoch_batches(len(data.images), self.batch_size, self.seed, 0)[0]
        return self.step.lower(jnp.asarray(data.images[idx]), jnp.asarray(data.tasks[idx]),
                               jax.random.key(0))
