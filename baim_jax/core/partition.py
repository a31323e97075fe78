"""Partitioning the BAIM into compact task models, the toolkit (paper Sec. III, step 5).

``partition(baim, task)`` keeps the task's squad, its LSGate, the kept connections that reach
the squad (transitively), and of every other learner only the first stages whose inputs feed it
(a *feeder*). Padding, pruned connections and the rest are dropped. The task model computes
exactly what the BAIM computes for that task, its bound and its samples included: its learners
keep their BAIM noise streams (docs/design.md §5).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from baim_jax.core import connections, dispatch, learners
from baim_jax.core.baim import BAIM, BAIMConfig
from baim_jax.core.pool import Member, PoolLayout


class TaskModel(BAIM):
    """One task's compact mixture of experts: its learners first, then feeders (not gated)."""

    kind = "task"

    @property
    def task(self) -> str:
        return self.tasks[0]


def kept_stages(model: BAIM, active: list[int]) -> np.ndarray:
    """Own stages each learner must keep so that the ``active`` learners compute in full.

    Returns:
      ``[N, 2]`` int: how many of its own encoder / decoder stages each learner keeps (0, 0 for
      a learner that is not needed), from ``dispatch.needed_prefixes`` (pool positions).
    """
    layout = model.layout
    depths = layout.depths
    selected = np.zeros((1, layout.size), bool)
    selected[0, active] = True
    positions = np.asarray(dispatch.needed_prefixes(
        jnp.asarray(selected), model.conns.flat_arrays(), model.kept_by_group(), depths))[0]
    return np.array([[sum(layout.stage_index[t][q][n] is not None
                          for q in range(positions[n, ti]))
                      for ti, t in enumerate(learners.TOWERS)] for n in range(layout.size)])


def _task_config(config: BAIMConfig, members: list[Member]) -> BAIMConfig:
    """The BAIM's config for a task model. Capacity factors given per stage position describe
    the BAIM's pool; where the task model's pool has other positions, its largest factor
    stands for all of them."""
    factors = config.capacity_factor
    if isinstance(factors, tuple):
        pool = PoolLayout(members)
        if len(factors) != sum(pool.depths):
            return dataclasses.replace(config, capacity_factor=max(factors))
    return config


def partition(model: BAIM, task) -> TaskModel:
    """Cuts the task model of ``task`` (a name or index) out of ``model``.

    Returns:
      a ``TaskModel`` whose outputs equal ``model``'s for inputs of that task.
    """
    t = int(model.task_ids(task, 1)[0])
    seg = model.layout.segment_of
    squad = [n for n in range(model.layout.size) if seg[n] == t]
    need = kept_stages(model, squad)
    feeders = [n for n in range(model.layout.size) if n not in squad and need[n, 0] > 0]
    keep_idx = squad + feeders
    new_index = {old: new for new, old in enumerate(keep_idx)}
    old = model.export_tree()
    streams = model.layout.streams
    members = [Member(model.layout.members[n].spec, 0, stream=int(streams[n])) for n in squad]
    members += [Member(model.layout.members[n].spec, None, (int(need[n, 0]), int(need[n, 1])),
                       int(streams[n])) for n in feeders]
    params = [old["learners"][n] for n in keep_idx]

    conns, kernels = [], []
    for c, kernel, kept in zip(model.conns.connections, old["connections"], model.kept_flat()):
        tower = learners.TOWERS.index(c.tower)
        if kept and c.tgt in new_index and need[c.tgt, tower] > c.tgt_stage:
            conns.append(connections.Connection(c.tower, new_index[c.src], c.src_stage,
                                      new_index[c.tgt], c.tgt_stage))
            kernels.append(kernel)
    order = sorted(range(len(conns)), key=lambda i: conns[i])

    gate = old["gate"]
    cols = np.array(keep_idx)
    ls_kernel = np.where(seg[cols][None, :] == t, gate["ls"]["kernel"][:, cols], 0.0)
    ls_bias = np.where(seg[cols] == t, gate["ls"]["bias"][cols], 0.0)
    gate_params = {"phi": gate["phi"],
                   "ls": {"kernel": ls_kernel.astype(np.float32),
                          "bias": ls_bias.astype(np.float32)},
                   "ts": {"kernel": gate["ts"]["kernel"][:, t:t + 1],
                          "bias": gate["ts"]["bias"][t:t + 1]}}
    prior = np.where(seg[cols] == t, old["prior"][cols], 0.0).astype(np.float32)
    return TaskModel(members, [model.tasks[t]], _task_config(model.config, members),
                     rngs=nnx.Rngs(0),
                     learner_params=params, conns=[conns[i] for i in order],
                     connection_kernels=[kernels[i] for i in order], gate_params=gate_params,
                     prior_logits=prior)
