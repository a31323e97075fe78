"""baim_jax: the edge-cloud BAIM framework of Tian et al. (IEEE Network 2024) in JAX/Flax NNX.

The package reads like the workflow: ``core`` holds the big model (learners, pool, gates,
connections, dispatch, the bound, the BAIM itself, partition into task models, training
strategies, the model description); ``checkpoint`` saves and loads every model kind (``save``,
``load``, through ``files``); ``framework`` runs the edge-cloud pipeline (edges, cloud, FedAvg,
accounting); ``evaluation`` holds the data, the likelihood, FID and the report;
``service`` the model store, the edges' toolboxes and requests; ``train`` and ``cli`` run
jobs.
"""

from baim_jax.checkpoint import CheckpointError, load, save
from baim_jax.core.baim import BAIM
from baim_jax.core.config import BAIMConfig
from baim_jax.core.learners import LearnerSpec, SpecError
from baim_jax.core.partition import TaskModel, partition
from baim_jax.core.pool import Member
from baim_jax.core.spec import GenerativeModel, Model, ModelSpec

__all__ = ["BAIM", "BAIMConfig", "CheckpointError", "GenerativeModel", "LearnerSpec", "Member",
           "Model", "ModelSpec", "SpecError", "TaskModel", "load", "partition", "save"]
