"""An edge's own generative model: one VAE learner (paper Sec. III, step 1).

Edges train it on their local data and upload it once; it becomes one learner of the BAIM.
The FedAvg baseline's homogeneous model is one too. It has the BAIM's public surface
(``reconstruct``, ``sample``, ``evaluate``, ``spec``, ``save``; ``baim_jax.load`` reopens it),
with a one-learner "gate" that always gives weight 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baim_jax.core import learners as L
from baim_jax.core import losses
from baim_jax.core.baim import LearnerParam, sample_rows, shared_noise, values


class EdgeModel(nnx.Module):
    """One learner with its spec and task.

    Attributes:
      learner_spec: the learner's ``LearnerSpec``.
      tasks: ``(task,)``, the task it was trained for.
      params: unpadded learner parameters (``LearnerParam`` leaves).
    """

    kind = "edge"

    def __init__(self, spec: L.LearnerSpec, task: str, *, params: L.Params | None = None,
                 seed: int = 0):
        spec.validate()
        self.learner_spec = spec
        self.tasks = (str(task),)
        if params is None:
            params = L.init_learner(spec, jax.random.key(seed))
        expected = jax.tree.map(np.shape, L.init_learner(spec, jax.random.key(0)))
        got = jax.tree.map(np.shape, params)
        if got != expected:
            raise ValueError(f"edge model: parameter shapes {got} do not match its learner spec "
                             f"{spec.to_json()}")
        if not all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(params)):
            raise ValueError("edge model: parameters hold non-finite values")
        self.params = nnx.data(jax.tree.map(lambda v: LearnerParam(jax.device_put(v)), params))

    @property
    def task(self) -> str:
        return self.tasks[0]

    def arrays(self) -> L.Params:
        """The parameters as plain arrays."""
        return values(self.params)

    def forward(self, x: jax.Array, rng: jax.Array | None = None) -> dict:
        """``x [B, H, W, C]`` -> ``recon`` ``[B, H, W, C]``, ``rec``, ``kl``, ``nelbo`` ``[B]``.

        ``rng=None`` uses the posterior mean; the noise is ``baim.shared_noise``, so this model
        draws exactly what it draws as learner of a BAIM.
        """
        spec = self.learner_spec
        eps = (jnp.zeros((x.shape[0], spec.latent)) if rng is None
               else shared_noise(rng, x.shape[0], spec.latent))
        p = self.arrays()
        out = L.learner_forward(spec, p, x, eps)
        log_scale = p.get("log_scale", jnp.zeros(()))
        rec = losses.nll(out["out"], log_scale, x, spec.likelihood)
        kl = losses.kl_standard_normal(out["mean"], out["logvar"], jnp.ones((spec.latent,), bool))
        return {"recon": losses.pixel_mean(out["out"], spec.likelihood), "rec": rec, "kl": kl,
                "nelbo": rec + kl}

    def _check(self, x) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        L.check_image_shape(self.learner_spec.image_shape, x.shape)
        return x

    def _task_check(self, task) -> None:
        if task is not None and task not in (0, self.task):
            raise ValueError(f"task: {task!r} is not this edge model's task {self.task!r}")

    def reconstruct(self, x, *, task=None, rng: jax.Array | None = None) -> dict:
        """``{"mean": [B, H, W, C] in [0, 1], "gate": [B, 1] (ones), "task", "nelbo"}``."""
        self._task_check(task)
        x = self._check(x)
        out = _forward(self, x, rng)
        batch = x.shape[0]
        return {"mean": out["recon"], "gate": jnp.ones((batch, 1)),
                "task": jnp.zeros((batch,), jnp.int32), "nelbo": out["nelbo"], "dropped": 0}

    def sample(self, n: int, *, task=None, rng: jax.Array, mode: str = "mixture") -> jax.Array:
        """``[n, H, W, C]`` images decoded from shared standard normal noise."""
        self._task_check(task)
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: must be a positive integer, got {n!r}")
        return _sample(self, sample_rows(n), rng)[:n]

    def evaluate(self, x, task=None) -> dict:
        """Posterior-mean negative ELBO per image ``[B]`` (see ``BAIM.evaluate``)."""
        self._task_check(task)
        return {"nelbo": _forward(self, self._check(x), None)["nelbo"]}

    @property
    def spec(self) -> dict:
        """The same description as a BAIM's: one learner, no gate, no connections."""
        count = L.count_params(self.learner_spec)
        return {
            "format": "baim_jax", "version": 1, "kind": self.kind, "tasks": list(self.tasks),
            "config": None, "k": 1, "h": 0,
            "learners": [{"spec": self.learner_spec.to_json(), "squad": 0, "task": self.task,
                          "keep": None, "params": count}],
            "connections": {"potential": 0, "kept": 0, "list": []},
            "params": {"learners": count, "gate": 0, "connections": 0, "total": count},
            "padding_waste": 1.0,
        }

    def export_tree(self) -> dict:
        return {"learners": [jax.tree.map(np.asarray, self.arrays())]}

    def save(self, path) -> None:
        """Writes an orbax checkpoint and ``spec.json`` to the directory ``path`` (atomically)."""
        from baim_jax import checkpoint
        checkpoint.save(self, path)


@nnx.jit
def _forward(model: EdgeModel, x, rng):
    return model.forward(x, rng)


@nnx.jit(static_argnums=(1,))
def _sample(model: EdgeModel, n: int, rng):
    spec = model.learner_spec
    z = shared_noise(rng, n, spec.latent)
    a = z
    for stage, p in zip(L.stages(spec)["dec"], model.arrays()["dec"]):
        a = L.apply_stage(stage, p, a)
    return losses.pixel_mean(a, spec.likelihood)
