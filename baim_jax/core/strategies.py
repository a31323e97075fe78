"""Cloud training strategies as parameter partitions (paper Sec. III, step 4).

* ``finetune``: everything trains; learners start from the uploads.
* ``freeze``: the uploaded learners stay fixed (they get no gradient and no update); only the
  gates and connections train.
* ``scratch``: the same architecture with every learner re-initialised at random; all train.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import optax
from flax import nnx

from baim_jax.core.baim import BAIM, ConnectionParam, GateParam

STRATEGIES = ("finetune", "freeze", "scratch")


def trainable(strategy: str) -> nnx.filterlib.Filter:
    """The NNX filter of the parameters a strategy trains."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r} is not one of {STRATEGIES}")
    if strategy == "freeze":
        return nnx.Any(GateParam, ConnectionParam)
    return nnx.Param


def prepare(model: BAIM, strategy: str, seed: int = 0) -> BAIM:
    """Applies the strategy to a freshly assembled model (scratch re-initialises learners)."""
    trainable(strategy)
    if strategy == "scratch":
        model.reinit_learners(seed)
    return model


def make_optimizer(model: BAIM, strategy: str, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """``tx`` over the parameters ``strategy`` trains (freeze: gate and connections only)."""
    return nnx.Optimizer(model, tx, wrt=trainable(strategy))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def _train_step(graphdef, trains: str, state, x, task, rng):
    """One step on split state. Compiled once per model architecture and set of trained
    parameters (``trains``: a strategy's name; finetune's stands for scratch too, whose step
    is the same), as equal layouts and connection sets compare equal.

    ``state`` is donated: the model and optimiser are updated in their own buffers, so a step
    holds one copy of them, not two; arrays taken from them before a step are gone after it.
    """
    m, opt = nnx.merge(graphdef, state)
    grad_fn = nnx.value_and_grad(lambda mod: mod.loss(x, task, rng),
                                 argnums=nnx.DiffState(0, trainable(trains)), has_aux=True)
    (_, metrics), grads = grad_fn(m)
    with jax.numpy_dtype_promotion("standard"):  # optax: float ** int32 step count
        opt.update(m, grads)
    return nnx.state((m, opt)), metrics


def make_train_step(model: BAIM, optimizer: nnx.Optimizer, strategy: str
                    ) -> Callable[..., dict]:
    """A jitted ``step(x [B,H,W,C], task [B], rng) -> metrics`` that updates model in place
    (``step.lower(x, task, rng)`` gives the compiled step for cost analysis).

    Each call splits the model and optimizer afresh (so changes made between steps, such
    as pruning, are seen) and runs one compiled function over their state.
    """
    trainable(strategy)
    trains = "freeze" if strategy == "freeze" else "finetune"
    graphdef = nnx.graphdef((model, optimizer))

    def run(x, task, rng) -> dict:
        state, metrics = _train_step(graphdef, trains, nnx.state((model, optimizer)), x, task,
                                     rng)
        nnx.update((model, optimizer), state)
        return metrics

    def lower(x, task, rng):
        """The compiled step's ``jax.stages.Lowered`` (for XLA's cost analysis)."""
        return _train_step.lower(graphdef, trains, nnx.state((model, optimizer)), x, task, rng)

    run.lower = lower
    return run
