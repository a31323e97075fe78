"""An edge's own generative model: one VAE learner (paper Sec. III, step 1).

Edges train it on their local data and upload it once; it becomes one learner of the BAIM.
The FedAvg baseline's homogeneous model is one too. It has the BAIM's public surface
(``spec.GenerativeModel``: ``reconstruct``, ``bound``, ``log_weights``, ``draw``, ``sample``,
``spec``), with a one-learner "gate" that always gives weight 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baim_jax.core import bound, learners, losses
from baim_jax.core.baim import LearnerParam, check_count, sample_rows, values
from baim_jax.core.pool import Member
from baim_jax.core.spec import LearnerEntry, ModelSpec, ParamCounts


class EdgeModel(nnx.Module):
    """One learner with its spec and task.

    Attributes:
      learner_spec: the learner's ``LearnerSpec``.
      tasks: ``(task,)``, the task it was trained for.
      params: unpadded learner parameters (``LearnerParam`` leaves).
    """

    kind = "edge"

    def __init__(self, spec: learners.LearnerSpec, task: str, *,
                 params: learners.Params | None = None, seed: int = 0):
        spec.validate()
        self.learner_spec = spec
        self.tasks = (str(task),)
        if params is None:
            params = learners.init_learner(spec, jax.random.key(seed))
        expected = jax.tree.map(np.shape, learners.init_learner(spec, jax.random.key(0)))
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

    def arrays(self) -> learners.Params:
        """The parameters as plain arrays."""
        return values(self.params)

    def forward(self, x: jax.Array, rng: jax.Array | None = None) -> dict:
        """``x [B, H, W, C]`` -> ``recon`` and the bound's parts (``learner_bound``)."""
        return learner_bound(self.learner_spec, self.arrays(), x, rng)

    def log_weights(self, x: jax.Array, task: jax.Array, rngs: jax.Array) -> tuple:
        """Importance draws, as ``BAIM.log_weights``: ``(log_w [k, B, 1], log_pi [B, 1])``
        (``task`` is unused: the model has one task and one learner, ``pi = 1``)."""
        return learner_log_weights(self.learner_spec, self.arrays(), x, task, rngs)

    def _check(self, x) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        learners.check_image_shape(self.learner_spec.image_shape, x.shape)
        return x

    def _task_check(self, task) -> None:
        if task is not None and not (isinstance(task, str) and task == self.task) and not (
                np.ndim(task) <= 1 and np.size(task) and np.all(np.asarray(task) == 0)
                and np.issubdtype(np.asarray(task).dtype, np.integer)):
            raise ValueError(f"task: {task!r} is not this edge model's task {self.task!r}")

    def task_ids(self, task, batch: int) -> jax.Array:
        """Task ids ``[batch]`` (zeros) for a task given as None, its name, 0 or ``[B]`` zeros."""
        self._task_check(task)
        return jnp.zeros((batch,), jnp.int32)

    def reconstruct(self, x, *, task=None, rng: jax.Array | None = None) -> dict:
        """``{"mean": [B, H, W, C] in [0, 1], "gate": [B, 1] (ones), "task", "dropped"}``."""
        self._task_check(task)
        x = self._check(x)
        out = _forward(self.learner_spec, self.arrays(), x, rng)
        batch = x.shape[0]
        return {"mean": out["recon"], "gate": jnp.ones((batch, 1)),
                "task": jnp.zeros((batch,), jnp.int32), "dropped": 0}

    def bound(self, x, *, task=None, rng: jax.Array) -> dict:
        """One-draw estimate of the negative ELBO per image (see ``BAIM.bound``)."""
        return {k: v[0] for k, v in self.bounds(x, task=task, rngs=rng[None]).items()}

    def bounds(self, x, *, task=None, rngs: jax.Array) -> dict:
        """``bound`` for each key of ``rngs`` ``[S]``, each part ``[S, B]`` (see
        ``BAIM.bounds``: the encoder runs once)."""
        self._task_check(task)
        return _bounds(self.learner_spec, self.arrays(), self._check(x), rngs)

    def draw(self, n: int, *, task=None, rng: jax.Array) -> dict:
        """``n`` samples decoded from ``z ~ N(0, I)`` (see ``BAIM.draw``; ``learner`` is 0)."""
        self._task_check(task)
        check_count(n)
        out = _draw(self.learner_spec, self.arrays(), sample_rows(n), rng)[:n]
        return {"images": losses.pixel_mean(out, self.learner_spec.likelihood), "out": out,
                "learner": jnp.zeros((n,), jnp.int32)}

    def sample(self, n: int, *, task=None, rng: jax.Array) -> jax.Array:
        """``[n, H, W, C]`` mean images drawn from the model."""
        return self.draw(n, task=task, rng=rng)["images"]

    @property
    def spec(self) -> ModelSpec:
        """The same description as a BAIM's: one learner (noise stream 0), no gate, no
        connections."""
        count = learners.count_params(self.learner_spec)
        return ModelSpec(kind=self.kind, tasks=self.tasks, params=ParamCounts(count, 0, 0),
                         image_shape=self.learner_spec.image_shape,
                         learners=(LearnerEntry(Member(self.learner_spec, 0, stream=0),
                                                self.task, count),))

    def export_tree(self) -> dict:
        return {"learners": [jax.tree.map(np.asarray, self.arrays())]}


def learner_bound(spec: learners.LearnerSpec, params: learners.Params, x: jax.Array,
                  rng: jax.Array | None = None) -> dict:
    """``x [B, H, W, C]`` -> ``recon`` ``[B, H, W, C]`` and the bound's parts ``rec``,
    ``kl``, ``gate_kl`` (zeros: one learner), ``nelbo`` and ``log_w`` (the draw's
    ``log p(x | z) + log p(z) - log q(z | x)``), each ``[B]``.

    ``rng=None`` uses the posterior mean; the noise is the stream 0 of
    ``bound.latent_noise``, what a BAIM of this one learner draws.
    """
    eps = (jnp.zeros((x.shape[0], spec.latent)) if rng is None
           else bound.latent_noise(rng, jnp.zeros(1, jnp.int32), x.shape[0], spec.latent)[0])
    out = learners.learner_forward(spec, params, x, eps)
    log_scale = params.get("log_scale", jnp.zeros(()))
    rec = losses.nll(out["out"], log_scale, x, spec.likelihood)
    real = jnp.ones((spec.latent,), bool)
    kl = losses.kl_standard_normal(out["mean"], out["logvar"], real)
    ratio = losses.log_density_ratio(eps, out["z"], out["logvar"], real)
    return {"recon": losses.pixel_mean(out["out"], spec.likelihood), "rec": rec, "kl": kl,
            "gate_kl": jnp.zeros_like(kl), "nelbo": rec + kl, "log_w": -rec - ratio}


def learner_log_weights(spec: learners.LearnerSpec, params: learners.Params, x: jax.Array,
                        task: jax.Array, rngs: jax.Array) -> tuple:
    """``EdgeModel.log_weights`` of a learner's spec and parameters (``task`` is unused)."""
    del task
    log_w = bound.map_draws(lambda rng: learner_bound(spec, params, x, rng)["log_w"][:, None],
                            rngs)
    return log_w, jnp.zeros(log_w.shape[1:])


# The compiled programs take the spec and parameters, not the model: edges of one spec compile
# once whatever their tasks (the task is part of a model's static structure).
@functools.partial(jax.jit, static_argnums=(0,))
def _forward(spec: learners.LearnerSpec, params: learners.Params, x, rng):
    return learner_bound(spec, params, x, rng)


@functools.partial(jax.jit, static_argnums=(0,))
def _bounds(spec: learners.LearnerSpec, params: learners.Params, x, rngs):
    def draw(rng):
        out = learner_bound(spec, params, x, rng)
        return {k: out[k] for k in bound.PARTS}

    return jax.vmap(draw)(rngs)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _draw(spec: learners.LearnerSpec, params: learners.Params, n: int, rng):
    """Raw decoder outputs ``[n, H, W, C]`` of prior draws; the key splits as ``baim._draw``'s."""
    _, rng_z = jax.random.split(rng)
    a = bound.latent_noise(rng_z, jnp.zeros(1, jnp.int32), n, spec.latent)[0]
    for stage, p in zip(learners.stages(spec)["dec"], params["dec"]):
        a = learners.apply_stage(stage, p, a)
    return a
