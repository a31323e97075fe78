"""Cloud strategies, pruning during training and the padding invariant."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp
from reference import randomize_connections

from baim_jax.core import bound, strategies
from baim_jax.core.baim import BAIM, BAIMConfig, values

SQUADS = [0, 1, 0, 1]
TASKS = ["a", "b"]


ADAM = optax.adam(1e-2)  # one optimiser object: it is part of the compiled step's static graph


def _train(model, strategy, steps=3, batch=8):
    optimizer = strategies.make_optimizer(model, strategy, ADAM)
    step = strategies.make_train_step(model, optimizer, strategy)
    x = jax.random.uniform(jax.random.key(5), (batch, 8, 8, 1))
    task = jnp.arange(batch) % 2
    return [step(x, task, jax.random.key(i)) for i in range(steps)]


def _snapshot(tree):
    return [np.array(v) for v in jax.tree.leaves(values(tree))]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_padding_stays_exactly_zero_through_training(kind, mlp_specs, conv_specs):
    specs = mlp_specs if kind == "mlp" else conv_specs
    model = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=2, h=1, noise_std=0.5))
    randomize_connections(model, 0)
    assert model.padding_max_abs() == 0.0
    metrics = _train(model, "finetune")
    assert np.isfinite(float(metrics[-1]["loss"]))
    assert model.padding_max_abs() == 0.0


def test_freeze_gives_learners_exactly_zero_update(mlp_specs):
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=2, h=1))
    learners, gate, conns = (_snapshot(model.learners), _snapshot(model.gate),
                             _snapshot(model.connections))
    _train(model, "freeze")
    for before, after in zip(learners, _snapshot(model.learners)):
        np.testing.assert_array_equal(before, after)
    assert any(np.abs(b - a).max() > 0 for b, a in zip(gate, _snapshot(model.gate)))
    assert any(np.abs(b - a).max() > 0 for b, a in zip(conns, _snapshot(model.connections)))


def test_finetune_updates_learners_gate_and_connections(mlp_specs):
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=2, h=1))
    parts = (model.learners, model.gate, model.connections)
    before = [_snapshot(p) for p in parts]
    metrics = _train(model, "finetune", steps=5)
    for old, part in zip(before, parts):  # zero-initialised connections get gradients too
        assert any(np.abs(b - a).max() > 0 for b, a in zip(old, _snapshot(part)))
    assert float(metrics[-1]["nelbo"]) < float(metrics[0]["nelbo"])
    assert int(metrics[-1]["dropped"]) == 0


def test_train_step_updates_the_model_in_its_own_buffers(mlp_specs):
    # The step donates the state: the arrays the model held before a step are consumed (so a
    # step holds one copy of the model and optimiser, not two) and the model holds new ones.
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=2, h=1))
    kernel = jax.tree.leaves(values(model.learners))[0]
    before = np.array(kernel)
    _train(model, "finetune", steps=1)
    assert kernel.is_deleted()
    after = jax.tree.leaves(values(model.learners))[0]
    assert not after.is_deleted() and np.abs(np.asarray(after) - before).max() > 0


def test_scratch_reinitialises_learners_with_the_same_specs(mlp_specs):
    uploads = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=2, h=1))
    before = _snapshot(uploads.learners)
    strategies.prepare(uploads, "scratch", seed=123)
    after = _snapshot(uploads.learners)
    assert [b.shape for b in before] == [a.shape for a in after]
    assert any(np.abs(b - a).max() > 0 for b, a in zip(before, after))
    assert uploads.padding_max_abs() == 0.0


def test_unknown_strategy_is_refused(mlp_specs):
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=2, h=1))
    with pytest.raises(ValueError, match="strategy"):
        strategies.make_optimizer(model, "distill", optax.adam(1e-3))


def test_the_bound_moves_the_prior_towards_the_gate_weights():
    # Squads [0, 0, 1, 1], prior logits 0 (pi = 1/2 each). Rows of weights (0.8, 0.2 | -),
    # (0.4, 0.6 | -) and (- | 0.3, 0.7). For a row of learner j's squad,
    # d/dl_j of -sum_n w_n log pi_n is pi_j - w_j; averaged over the 3 rows:
    #   learner 0: ((0.5 - 0.8) + (0.5 - 0.4)) / 3 = -0.2 / 3, learner 1: +0.2 / 3,
    #   learner 2: (0.5 - 0.3) / 3 = +0.2 / 3, learner 3: -0.2 / 3.
    # A descent step raises pi where the gate puts more weight than pi does.
    seg = jnp.array([0, 0, 1, 1], jnp.int32)
    w = jnp.array([[0.8, 0.2, 0, 0], [0.4, 0.6, 0, 0], [0, 0, 0.3, 0.7]], jnp.float32)
    grad = jax.grad(lambda logits: jnp.mean(bound.gate_kl(w, bound.log_prior(logits, seg))))(
        jnp.zeros(4, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), np.array([-0.2, 0.2, 0.2, -0.2]) / 3,
                               atol=1e-6)


@pytest.mark.parametrize("strategy", ["finetune", "freeze"])
def test_training_moves_the_prior(mlp_specs, strategy):
    """The prior pi is a gate parameter: both strategies train it, by the bound's gate KL."""
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=1, h=1))
    _train(model, strategy)
    assert np.abs(np.asarray(model.prior[...])).max() > 1e-3


def test_compacted_model_drops_pruned_connections_and_computes_the_same(mlp_specs, images):
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=2, h=1))
    randomize_connections(model, 1)
    model.prune_connections(0.3)
    small = model.compacted()
    assert len(small.conns) == model.spec.connections_kept < len(model.conns)
    a = model.reconstruct(images, task="a", rng=jax.random.key(0))
    b = small.reconstruct(images, task="a", rng=jax.random.key(0))
    np.testing.assert_allclose(a["mean"], b["mean"], atol=1e-6)


def test_equal_architectures_share_one_compiled_step():
    """Two BAIMs of equal specs (other weights: seeds 0 and 1) train with one compiled step;
    one of another architecture compiles its own; freezing is another step. (Learner sizes
    no other test uses, so that nothing is compiled before.)"""
    specs = [mlp([5], 2, [5])] * 4

    def make(seed=0, specs=specs):
        return BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=2, h=1), seed=seed)

    before = strategies._train_step._cache_size()
    _train(make(0), "finetune", steps=1)
    _train(make(1), "finetune", steps=1)
    assert strategies._train_step._cache_size() == before + 1
    _train(make(specs=[mlp([5], 2, [5])] * 2 + [mlp([7], 2, [5])] * 2), "finetune", steps=1)
    assert strategies._train_step._cache_size() == before + 2
    _train(make(), "freeze", steps=1)
    assert strategies._train_step._cache_size() == before + 3
