"""The TSGate on its own: routes a request's images to their task (paper Sec. III, step 7).

A task model keeps only its own task's TSGate column, so a request that carries images but no
task name needs the BAIM's whole M-way classifier ``ts(phi(x))``: ``TaskRouter.from_baim`` cuts
it out (phi and ts, nothing else) so that it can be published and cached beside the toolkit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baim_jax.core import gates, learners
from baim_jax.core.baim import GateParam, values
from baim_jax.core.spec import ModelSpec, ParamCounts


class TaskRouter(nnx.Module):
    """``x [B, H, W, C] -> task [B]``: the argmax of the TSGate's logits, as in the BAIM.

    Attributes:
      tasks: the task names, in the BAIM's order.
      image_shape: ``(H, W, C)`` the router takes.
      gate: ``{"phi": {kernel [H,W,C,F], bias [F]}, "ts": {kernel [F,M], bias [M]}}``.
    """

    kind = "router"

    def __init__(self, tasks, gate_params: dict):
        self.tasks = tuple(str(t) for t in tasks)
        if not self.tasks:
            raise ValueError("router: no task")
        try:
            phi_k = np.asarray(gate_params["phi"]["kernel"], np.float32)
            phi_b = np.asarray(gate_params["phi"]["bias"], np.float32)
            ts_k = np.asarray(gate_params["ts"]["kernel"], np.float32)
            ts_b = np.asarray(gate_params["ts"]["bias"], np.float32)
        except (KeyError, TypeError) as e:
            raise ValueError(f"router: gate parameters lack {e}") from None
        f, m = (phi_k.shape[-1] if phi_k.ndim else -1), len(self.tasks)
        if (phi_k.ndim != 4 or phi_b.shape != (f,) or ts_k.shape != (f, m)
                or ts_b.shape != (m,)):
            raise ValueError(f"router: gate shapes phi {phi_k.shape}/{phi_b.shape}, ts "
                             f"{ts_k.shape}/{ts_b.shape} do not fit {m} tasks")
        if not all(np.isfinite(a).all() for a in (phi_k, phi_b, ts_k, ts_b)):
            raise ValueError("router: gate parameters hold non-finite values")
        self.image_shape = tuple(int(d) for d in phi_k.shape[:3])
        self.gate = nnx.data(jax.tree.map(
            lambda v: GateParam(jax.device_put(v)),
            {"phi": {"kernel": phi_k, "bias": phi_b}, "ts": {"kernel": ts_k, "bias": ts_b}}))

    @classmethod
    def from_baim(cls, model) -> "TaskRouter":
        """The TSGate of a ``BAIM`` (all its tasks)."""
        gate = model.export_tree()["gate"]
        return cls(model.tasks, {"phi": gate["phi"], "ts": gate["ts"]})

    def route(self, x) -> dict:
        """Routes images.

        Args:
          x: ``[B, H, W, C]`` float32 in [0, 1].

        Returns:
          ``{"task": [B] int, "probs": [B, M] softmax of the TSGate logits}``.
        """
        x = jnp.asarray(x, jnp.float32)
        learners.check_image_shape(self.image_shape, x.shape)
        probs = _probs(self, x)
        return {"task": jnp.argmax(probs, axis=-1), "probs": probs}

    @property
    def spec(self) -> ModelSpec:
        """The router's description (the checkpoint's ``spec.json``)."""
        count = sum(int(np.size(v)) for v in jax.tree.leaves(values(self.gate)))
        return ModelSpec(kind=self.kind, tasks=self.tasks, params=ParamCounts(0, count, 0),
                         image_shape=self.image_shape,
                         feature_dim=int(self.gate["phi"]["bias"][...].shape[0]))

    def export_tree(self) -> dict:
        return {"gate": jax.tree.map(np.asarray, values(self.gate))}


@nnx.jit(graph=False)
def _probs(model: TaskRouter, x):
    return jax.nn.softmax(gates.task_logits(values(model.gate), x), axis=-1)
