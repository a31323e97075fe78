"""The federated-learning baseline as the paper runs it (FedAvg, McMahan et al. 2017).

One homogeneous model, the size of the largest edge model, at every edge and at the cloud.
Each round: every edge starts from the global model and trains one local epoch on its data
(all edges at once, sharded over ``edge``, by ``edges.EdgeTrainer``); the cloud averages the
edges' models weighted by their numbers of examples, trains one epoch on its common data and
sends the result back. Local optimisers start fresh each round (stateless clients).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from baim_jax.core import learners
from baim_jax.core.edge_model import EdgeModel
from baim_jax.framework.edges import EdgeTrainer


def weighted_average(params: Sequence[learners.Params],
                     weights: Sequence[float]) -> learners.Params:
    """``sum_e w_e params_e / sum_e w_e``, leaf by leaf (host arrays)."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) != len(params) or not (np.isfinite(w) & (w > 0)).all():
        raise ValueError(f"weights: need {len(params)} finite positive weights, got {weights!r}")
    w = w / w.sum()
    return jax.tree.map(
        lambda *leaves: np.tensordot(w, np.stack([np.asarray(v, np.float64) for v in leaves]),
                                     axes=1).astype(np.float32), *params)


def fedavg_round(global_params: learners.Params, edges: EdgeTrainer, cloud: EdgeTrainer,
                 round_index: int, on_step: Callable[[], None] | None = None) -> learners.Params:
    """One round: local epochs at the edges, weighted average, one epoch at the cloud.

    Args:
      global_params: the model the cloud sent at the end of the last round.
      edges: a trainer over every edge's shard, all with the FL model's spec.
      cloud: a trainer with one member, the cloud's common data.

    Returns:
      the new global model's parameters.
    """
    edges.reset([global_params] * len(edges.sizes))
    edges.run_epoch(round_index, on_step)
    averaged = weighted_average(edges.params(), edges.sizes)
    cloud.reset([averaged])
    cloud.run_epoch(round_index, on_step)
    return cloud.params()[0]


class FedAvg:
    """FedAvg round by round, with the trainers' interface (``state_leaves``, ``load_state``,
    ``run_epoch``): its state is the global model's parameters.

    Args:
      spec: the homogeneous model's learner spec.
      edges, cloud: the edges' and the cloud's trainers (``edges.EdgeTrainer``).
      params: the starting global parameters.
    """

    def __init__(self, spec: learners.LearnerSpec, edges: EdgeTrainer, cloud: EdgeTrainer,
                 params: learners.Params):
        self.spec, self.edges, self.cloud, self.params = spec, edges, cloud, params

    @property
    def steps_per_epoch(self) -> int:
        return self.edges.steps_per_epoch + self.cloud.steps_per_epoch

    def state_leaves(self) -> list:
        return jax.tree.leaves(self.params)

    def load_state(self, leaves: list) -> None:
        self.params = jax.tree.unflatten(jax.tree.structure(self.params),
                                         [np.asarray(v) for v in leaves])

    def run_epoch(self, round_index: int, on_step: Callable[[], None] | None = None) -> None:
        """One round (``fedavg_round``)."""
        self.params = fedavg_round(self.params, self.edges, self.cloud, round_index, on_step)

    def model(self, task: str = "all") -> EdgeModel:
        """The global model."""
        return EdgeModel(self.spec, task, params=self.params)
