"""Cost accounting of the approaches (the table of the paper's Fig. 5b, docs/design.md §6).

Parameters are real (unpadded) counts; bytes are float32 payloads (4 bytes a parameter) of
what crosses the network; FLOPs per epoch are XLA's cost analysis of one compiled training
step times the steps of an epoch.
"""

from __future__ import annotations

from typing import Sequence

from baim_jax.core.baim import BAIM

BYTES_PER_PARAM = 4


def span(values: Sequence[float]) -> list:
    """``[min, max]``."""
    return [min(values), max(values)]


def cloud_trainable_params(model: BAIM, strategy: str) -> int:
    """Real parameters the cloud trains: learners (unless frozen), gate, every potential
    connection (all train until pruned)."""
    params = model.spec.params
    connections = sum(model.conns.param_count(c) for c in model.conns.connections)
    learners = 0 if strategy == "freeze" else params.learners
    return learners + params.gate + connections


def baim_route(*, edge_params: Sequence[int], task_model_params: Sequence[int],
               edge_flops_per_epoch: Sequence[float], cloud: dict, wall_seconds: float,
               test_loss_curve: Sequence[float]) -> dict:
    """The cost row of a BAIM approach (finetune, freeze or scratch).

    Every edge uploads its model once and downloads its task's model once.

    Args:
      edge_params: ``[E]`` each edge model's parameters.
      task_model_params: ``[E]`` parameters of the task model each edge downloads.
      edge_flops_per_epoch: ``[E]`` FLOPs of one local epoch at each edge.
      cloud: the cloud phase's record (``trainable_params``, ``flops_per_epoch``).
    """
    return {
        "test_loss": test_loss_curve[-1], "test_loss_curve": list(test_loss_curve),
        "cloud_trainable_params": cloud["trainable_params"],
        "edge_params": span(edge_params),
        "upload_bytes_per_edge": span([BYTES_PER_PARAM * p for p in edge_params]),
        "upload_times": 1,
        "download_bytes_per_edge": span([BYTES_PER_PARAM * p for p in task_model_params]),
        "download_times": 1,
        "cloud_flops_per_epoch": cloud["flops_per_epoch"],
        "edge_flops_per_epoch": span(edge_flops_per_epoch),
        "wall_seconds": wall_seconds,
    }


def central(*, params: int, upload_bytes_per_edge: Sequence[int],
            cloud_flops_per_epoch: float, wall_seconds: float,
            test_loss_curve: Sequence[float]) -> dict:
    """The cost row of the central reference: every edge uploads its raw images (float32)
    once, and downloads the trained model once; edges train nothing."""
    return {
        "test_loss": test_loss_curve[-1], "test_loss_curve": list(test_loss_curve),
        "cloud_trainable_params": params, "edge_params": [0, 0],
        "upload_bytes_per_edge": span(upload_bytes_per_edge), "upload_times": 1,
        "download_bytes_per_edge": [BYTES_PER_PARAM * params] * 2, "download_times": 1,
        "cloud_flops_per_epoch": cloud_flops_per_epoch, "edge_flops_per_epoch": [0, 0],
        "wall_seconds": wall_seconds,
    }


def fedavg(*, params: int, rounds: int, edge_flops_per_epoch: Sequence[float],
           cloud_flops_per_epoch: float, wall_seconds: float,
           test_loss_curve: Sequence[float]) -> dict:
    """The cost row of FedAvg: every round each edge uploads and downloads the whole model."""
    return {
        "test_loss": test_loss_curve[-1], "test_loss_curve": list(test_loss_curve),
        "cloud_trainable_params": params,
        "edge_params": [params, params],
        "upload_bytes_per_edge": [BYTES_PER_PARAM * params] * 2,
        "upload_times": rounds,
        "download_bytes_per_edge": [BYTES_PER_PARAM * params] * 2,
        "download_times": rounds,
        "cloud_flops_per_epoch": cloud_flops_per_epoch,
        "edge_flops_per_epoch": span(edge_flops_per_epoch),
        "wall_seconds": wall_seconds,
    }
