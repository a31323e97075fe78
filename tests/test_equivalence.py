"""Fast paths against plain references: padding, dispatch and partition lose nothing."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from reference import randomize_connections, reference_forward

from baim_jax.core import bound, losses
from baim_jax.core import dispatch as D
from baim_jax.core import learners as L
from baim_jax.core.baim import BAIM, BAIMConfig
from baim_jax.core.partition import partition
from baim_jax.evaluation import likelihood

SQUADS = [0, 1, 0, 1]
TASKS = ["a", "b"]
TASK_OF_ROW = jnp.array([0, 1, 0, 1, 1, 0])


@nnx.jit(static_argnames=("dispatch",))
def _forward(model, x, task, selected=None, dispatch=None):
    return model.forward(x, task, selected=selected, dispatch=dispatch)


def _onehot_route(n, batch, size):
    return jnp.zeros((batch, size), bool).at[:, n].set(True)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_fresh_baim_routed_to_one_learner_equals_that_learner_alone(kind, mlp_specs, conv_specs,
                                                                    images):
    """Zero-initialised connections + padding: learner n inside the pool computes exactly what
    it computes alone (its own unpadded parameters, no pool). Its bound pays, besides its own
    KL, the KL of every learner whose (zero) decoder connections it keeps, and log 2 for the
    gate (weight 1 on one learner of a squad of 2, pi uniform)."""
    specs = mlp_specs if kind == "mlp" else conv_specs
    model = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=1, h=2))
    params = model.export_tree()["learners"]
    zeros = jnp.zeros((images.shape[0], model.layout.latent))
    alone = [L.learner_forward(m.spec, params[n], images, zeros)
             for n, m in enumerate(model.layout.members)]
    kl = [losses.kl_standard_normal(a["mean"], a["logvar"], jnp.ones_like(a["mean"], bool))
          for a in alone]
    consumed = np.asarray(model.consumed())
    for n, member in enumerate(model.layout.members):
        out = _forward(model, images, jnp.full((images.shape[0],), member.squad),
                       selected=_onehot_route(n, images.shape[0], model.layout.size))
        mean_alone = losses.pixel_mean(alone[n]["out"], member.spec.likelihood)
        rec_alone = losses.nll(alone[n]["out"], params[n].get("log_scale", jnp.zeros(())),
                               images, member.spec.likelihood)
        chex.assert_trees_all_close(out["recon"], mean_alone, atol=1e-6)
        chex.assert_trees_all_close(out["rec"], rec_alone, rtol=1e-5)
        chex.assert_trees_all_close(out["kl"], sum(kl[m] for m in np.flatnonzero(consumed[n])),
                                    rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out["gate_kl"]), np.log(2.0), rtol=1e-5)


def test_pool_stack_unstack_round_trip(mlp_specs):
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=1, h=1))
    tree = model.export_tree()["learners"]
    stacked, _ = model.layout.stack(tree)
    chex.assert_trees_all_equal(model.layout.unstack(stacked), tree)
    for n, m in enumerate(model.layout.members):
        expected = L.count_params(m.spec)
        assert sum(np.size(v) for v in jax.tree.leaves(tree[n])) == expected


def _connected(specs, h, seed=3, prune=None, config=None):
    config = config or BAIMConfig(k=2, h=h)
    model = BAIM.assemble(specs, SQUADS, TASKS, config)
    randomize_connections(model, seed, 0.3)
    if prune is not None:
        model.prune_connections(prune)
    return model


@pytest.mark.parametrize("kind,h,prune", [("mlp", 0, None), ("mlp", 2, 0.4), ("conv", 1, 0.5)])
def test_dense_and_capacity_paths_equal_loop_reference(kind, h, prune, mlp_specs, conv_specs,
                                                       images):
    specs = mlp_specs if kind == "mlp" else conv_specs
    model = _connected(specs, h, prune=prune)
    eps = jnp.zeros((model.layout.size, images.shape[0], model.layout.latent))
    for dispatch in ("dense", "capacity"):
        out = _forward(model, images, TASK_OF_ROW, dispatch=dispatch)
        recon, nelbo = reference_forward(model, images, eps, out["gate"].weights)
        assert int(out["dropped"]) == 0
        chex.assert_trees_all_close(out["recon"], recon, atol=1e-5)
        chex.assert_trees_all_close(out["nelbo"], nelbo, rtol=1e-5)


@pytest.mark.parametrize("likelihood,latent", [("gaussian", "own"), ("bernoulli", "own"),
                                               ("gaussian", "shared")])
def test_likelihoods_equal_loop_reference_with_latent_draws(likelihood, latent, images):
    """K = 2 of each squad's 2, trained-like connections, a non-uniform prior, each learner's
    own latent draw: both paths equal the loop reference, Gaussian learners (learned scales)
    included; with shared latents (latent sizes 2 and 3: cut and zero-padded) too."""
    specs = [mlp([8], 2, [8], likelihood), mlp([6], 3, [5], likelihood),
             mlp([7], 2, [6, 4], likelihood), mlp([5], 3, [9], likelihood)]
    model = _connected(specs, 1, prune=0.5, config=BAIMConfig(k=2, h=1, latent=latent))
    model.prior[...] = jnp.array([0.3, -0.4, 0.1, 0.6], jnp.float32)
    if likelihood == "gaussian":
        model.learners["log_scale"][...] = jnp.array([-0.5, 0.2, -1.0, 0.4])
    # forward draws its latent noise from the second half of its key: the reference's eps
    eps = bound.latent_noise(jax.random.split(jax.random.key(9))[1], model.layout.streams,
                             images.shape[0], model.layout.latent)
    for dispatch in ("dense", "capacity"):
        out = model.forward(images, TASK_OF_ROW, dispatch=dispatch, rng=jax.random.key(9))
        recon, nelbo = reference_forward(model, images, eps, out["gate"].weights)
        chex.assert_trees_all_close(out["recon"], recon, atol=1e-5)
        chex.assert_trees_all_close(out["nelbo"], nelbo, rtol=1e-5)


def test_capacity_path_with_enough_capacity_equals_dense(mlp_specs, images):
    """A capacity below B that still holds every needed row gives the dense result."""
    batch = 48
    x = jax.random.uniform(jax.random.key(1), (batch, *images.shape[1:]))
    task = jnp.arange(batch) % 2
    model = _connected(mlp_specs, 1, prune=0.05, config=BAIMConfig(k=1, h=1))
    dense = _forward(model, x, task, dispatch="dense")
    kept = model.kept_by_group()
    depths = model.layout.depths
    need = D.chained_depth(D.needed_prefixes(dense["gate"].selected, model.conns.flat_arrays(),
                                             kept, depths)) > 0
    max_load = int(jnp.max(jnp.sum(need, axis=0)))
    assert max_load < batch
    model.config = dataclasses.replace(model.config, capacity_factor=max_load * 4 / batch)
    fast = _forward(model, x, task, dispatch="capacity")
    assert int(fast["dropped"]) == 0
    chex.assert_trees_all_close(fast["recon"], dense["recon"], atol=1e-6)
    chex.assert_trees_all_close(fast["nelbo"], dense["nelbo"], rtol=1e-6)


def test_dropped_learners_leave_a_mixture_of_those_that_ran(mlp_specs, images):
    """One squad of 4 learners, K = 2; rows 0-3 pick (0, 1), rows 4-7 pick (1, 2).
    Capacity ceil(1.0 * 8 * 2 / 4) = 4: learner 1 runs rows 0-3 and drops rows 4-7, which are
    then scored on learner 2 alone, exactly as a dense pass that selected only learner 2 there
    (the top-K softmax over the learners that ran is the renormalised weights)."""
    batch = 8
    x = jax.random.uniform(jax.random.key(1), (batch, *images.shape[1:]))
    task = jnp.zeros(batch, jnp.int32)
    model = BAIM.assemble(mlp_specs, [0, 0, 0, 0], ["a"], BAIMConfig(k=2, h=0, capacity_factor=1.0))
    for kept in model.kept:  # no connections kept: no feeders
        kept[...] = jnp.zeros_like(kept[...])
    first = np.arange(batch) < 4
    selected = jnp.asarray(np.stack([first, np.ones(batch, bool), ~first,
                                     np.zeros(batch, bool)], axis=1))
    fast = _forward(model, x, task, selected=selected, dispatch="capacity")
    assert int(fast["dropped"]) == 4
    ran = selected.at[4:, 1].set(False)
    dense = _forward(model, x, task, selected=ran, dispatch="dense")
    chex.assert_trees_all_close(fast["nelbo"], dense["nelbo"], rtol=1e-6)
    chex.assert_trees_all_close(fast["recon"], dense["recon"], atol=1e-6)
    # The gate's own weights are reported unchanged.
    chex.assert_trees_all_close(fast["gate"].weights,
                                _forward(model, x, task, selected=selected,
                                         dispatch="dense")["gate"].weights)


def test_feeders_run_only_the_positions_they_feed_from(mlp_specs, images):
    """Per-position capacities, each the largest load at that position: the deeper positions
    run fewer rows than the first (a feeder stops where its connections leave), nothing is
    dropped, and the loss and its gradients equal the dense reference's."""
    batch = 48
    x = jax.random.uniform(jax.random.key(1), (batch, *images.shape[1:]))
    task = jnp.arange(batch) % 2
    model = _connected(mlp_specs, 2, prune=0.2, config=BAIMConfig(k=1, h=2))
    dense = _forward(model, x, task, dispatch="dense")
    depths = model.layout.depths
    depth = D.chained_depth(D.needed_prefixes(dense["gate"].selected, model.conns.flat_arrays(),
                                              model.kept_by_group(), depths))
    loads = [int(jnp.max(jnp.sum(depth > q, axis=0))) for q in range(sum(depths))]
    assert loads[-1] < loads[0] < batch  # some feeder stops early; some learner is idle
    model.config = dataclasses.replace(
        model.config, capacity_factor=tuple(c * 4 / batch for c in loads))
    fast = _forward(model, x, task, dispatch="capacity")
    assert int(fast["dropped"]) == 0
    chex.assert_trees_all_close(fast["recon"], dense["recon"], atol=1e-6)
    chex.assert_trees_all_close(fast["nelbo"], dense["nelbo"], rtol=1e-6)

    @nnx.jit(static_argnames=("dispatch",))
    def grads(model, dispatch):
        return nnx.grad(lambda m: jnp.mean(m.forward(x, task, dispatch=dispatch)["nelbo"]))(model)

    chex.assert_trees_all_close(grads(model, "capacity"), grads(model, "dense"), atol=1e-5)
    # One row fewer at the last position (the output stage, which only picked learners run)
    # than its load: the busiest learners each drop one picked row. With K = 1 that example
    # loses its whole bound, reconstruction and KL, not the reconstruction alone.
    model.config = dataclasses.replace(
        model.config, capacity_factor=tuple(c * 4 / batch for c in loads[:-1] + [loads[-1] - 1]))
    short = _forward(model, x, task, dispatch="capacity")
    assert int(short["dropped"]) >= 1
    assert int(jnp.sum(short["nelbo"] == 0.0)) == int(short["dropped"])


def test_capacity_path_counts_drops(mlp_specs):
    """All 16 rows routed to learner 0 with capacity ceil(0.5 * 16 * 1 / 4) = 2.

    With h=0 and every (zero-initialised) connection still kept, learner 0's inputs are fed by
    all three others, so all 4 learners are needed by all 16 rows: 4 * (16 - 2) = 56 dropped.
    """
    batch = 16
    x = jax.random.uniform(jax.random.key(1), (batch, 8, 8, 1))
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS,
                          BAIMConfig(k=1, h=0, capacity_factor=0.5))
    out = _forward(model, x, jnp.zeros((batch,), jnp.int32),
                        selected=_onehot_route(0, batch, 4))
    assert int(out["dropped"]) == 4 * (batch - 2)


@pytest.mark.parametrize("kind,h,prune,dispatch", [("mlp", 1, None, "dense"),
                                                   ("mlp", 2, 0.3, "capacity"),
                                                   ("conv", 1, 0.6, "capacity")])
def test_partition_equals_baim_for_its_task(kind, h, prune, dispatch, mlp_specs, conv_specs,
                                            images):
    """Random connections (cross-squad ones included), random inputs, with latent noise."""
    specs = mlp_specs if kind == "mlp" else conv_specs
    config = BAIMConfig(k=2, h=h, dispatch=dispatch)
    model = _connected(specs, h, prune=prune, config=config)
    key = jax.random.key(7)
    for t, name in enumerate(TASKS):
        task_model = partition(model, name)
        big = model.reconstruct(images, task=name, rng=key)
        small = task_model.reconstruct(images, rng=key)
        chex.assert_trees_all_close(small["mean"], big["mean"], atol=1e-5)
        chex.assert_trees_all_close(task_model.bound(images, rng=key),
                                    model.bound(images, task=name, rng=key), rtol=1e-5)
        in_squad = np.flatnonzero(model.layout.segment_of == t)
        chex.assert_trees_all_close(small["gate"], big["gate"][:, in_squad], atol=1e-6)
        chex.assert_shape(small["gate"], (images.shape[0], len(in_squad)))
        assert task_model.spec.params.total < model.spec.params.total


def test_partition_drops_other_squads_and_truncates_feeders(mlp_specs):
    model = _connected(mlp_specs, 1, prune=0.3)
    for name in TASKS:
        task_model = partition(model, name)
        spec = task_model.spec
        assert spec.gated == 2 and spec.tasks == (name,)
        assert spec.connections_kept == len(spec.connections)
        assert spec.connections_kept <= model.spec.connections_kept
        for entry in spec.learners:
            if entry.member.squad is None:
                assert entry.params <= L.count_params(entry.member.spec)


def test_partition_without_connections_keeps_only_the_squad(mlp_specs, images):
    """No connection kept: task a's model is squad a's two learners (uploads 0 and 2), no
    feeder, no connection, and computes what the BAIM computes for task a."""
    model = _connected(mlp_specs, 1)
    for kept in model.kept:
        kept[...] = jnp.zeros_like(kept[...])
    assert model.spec.connections_kept == 0
    task_model = partition(model, "a")
    members = task_model.layout.members
    assert [m.spec for m in members] == [mlp_specs[0], mlp_specs[2]]
    assert all(m.squad is not None for m in members)
    assert len(task_model.conns) == 0
    want = model.reconstruct(images, task="a")
    got = task_model.reconstruct(images)
    chex.assert_trees_all_close(got["mean"], want["mean"], atol=1e-6)
    key = jax.random.key(3)
    chex.assert_trees_all_close(task_model.bound(images, rng=key),
                                model.bound(images, task="a", rng=key), rtol=1e-6)


def test_task_models_that_differ_only_in_noise_streams_share_one_program(images):
    """Squads a and b hold the same two architectures (uploads 0, 2 and 1, 3), so their task
    models differ only in which BAIM noise streams their learners draw (the BAIM's pool holds
    squad a first: [0, 1, 2, 3] against [2, 3, 0, 1]). The streams are an input, not a
    constant, so both lower to one program and the second finds it in the compilation cache."""
    a, b = mlp([16], 4, [16]), mlp([12, 10], 3, [8])
    model = BAIM.assemble([a, a, b, b], SQUADS, TASKS, BAIMConfig(k=2, h=1))
    randomize_connections(model, 3, 0.3)
    task_models = [partition(model, name) for name in TASKS]
    streams = [np.asarray(t.streams[...]).tolist() for t in task_models]
    assert streams == [[0, 1, 2, 3], [2, 3, 0, 1]]
    task = jnp.zeros((images.shape[0],), jnp.int32)
    programs = [likelihood._model_iw.lower(t, images, task, jax.random.key(0), 4).as_text()
                for t in task_models]
    assert programs[0] == programs[1]


def test_partition_carries_capacity_factors_per_position_only_to_the_same_pool():
    # Squad a: a learner of 2 hidden encoder stages + head and 3 hidden decoder stages +
    # output (7 positions, the BAIM's); squad b: one hidden stage per tower (2 + 2). Without
    # connections, task a's pool has the BAIM's 7 positions and keeps the factors; task b's
    # has 4, so the largest factor (2.0) stands for all of them.
    specs = [mlp([12, 10], 3, [6, 9, 7]), mlp([16], 4, [16]), mlp([16], 4, [16]),
             mlp([8], 4, [8])]
    factors = (2.0, 2.0, 2.0, 1.5, 1.5, 1.5, 1.0)
    model = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=1, h=0, capacity_factor=factors))
    model.prune_connections(1e-9)
    model.prune_connections(1e-9)
    assert partition(model, "a").config.capacity_factor == factors
    assert partition(model, "b").config.capacity_factor == 2.0


def test_forward_sharded_over_four_devices_equals_one_device(mlp_specs):
    """The batch split over 4 (fake) devices with NamedSharding computes the same."""
    assert len(jax.devices()) == 4
    model = _connected(mlp_specs, 1)
    x = jax.random.uniform(jax.random.key(2), (8, 8, 8, 1))
    task = jnp.arange(8) % 2
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ts = jax.device_put(task, NamedSharding(mesh, P("batch")))
    sharded = model.reconstruct(xs, task=ts)
    single = model.reconstruct(x, task=task)
    chex.assert_trees_all_close(sharded["mean"], single["mean"], atol=1e-6)


def test_sampling_without_decoder_connections_decodes_each_learner_alone(mlp_specs):
    """With connections between encoder stages only, ``draw`` runs each drawable learner's
    decoder at its own widths; its samples are the pool's padded decoders' for the same key."""
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=1, h=1, connect=("enc",)))
    randomize_connections(model, 1, 0.3)
    key, n = jax.random.key(5), 24
    got = model.draw(n, task="b", rng=key)
    rng_pick, rng_z = jax.random.split(key)
    seg = jnp.asarray(model.layout.segment_of)
    pi = jnp.where(seg == 1, jnp.exp(model.log_prior()), 0.0)
    learner = bound.draw_learners(pi, jax.random.uniform(rng_pick, (32,)))[:n]
    z = jnp.where(model._latent_mask()[:, None, :], model._noise(rng_z, 32), 0.0)
    pooled = model._tower("dec", z, D.dense_layout(32, model.layout.size,
                                                    sum(model.layout.depths)))
    np.testing.assert_array_equal(np.asarray(got["learner"]), np.asarray(learner))
    chex.assert_trees_all_close(got["out"], pooled[learner, jnp.arange(n)], atol=1e-5)
    assert set(np.asarray(learner).tolist()) == {2, 3}  # both of squad b's learners drawn
