"""The framework layer: edge training (sharded), FedAvg averaging, aggregation, cloud training,
pruning schedule, accounting and the edge model's public surface."""

import math
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import backend_compiles, conv, mlp
from flax import nnx
from reference import randomize_connections

import baim_jax
from baim_jax.core import learners as L
from baim_jax.core import optim
from baim_jax.core.baim import BAIM, BAIMConfig, values
from baim_jax.core.edge_model import EdgeModel
from baim_jax.evaluation import likelihood
from baim_jax.evaluation.data import Split
from baim_jax.framework import accounting, cloud, edges, fedavg, rundir

SQUADS = [0, 1, 0, 1]
TASKS = ["a", "b"]
# The smallest learner the tests count by hand: 64 pixels -> 4 -> latent 2 -> 4 -> 64 pixels.
TINY = mlp([4], 2, [4])
# Its parameters: enc dense 64*4+4 = 260; head (mean and logvar) 2*(4*2+2) = 20;
# dec dense 2*4+4 = 12; output dense 4*64+64 = 320. Total 612.
TINY_PARAMS = (64 * 4 + 4) + (4 * 2 * 2 + 2 * 2) + (2 * 4 + 4) + (4 * 64 + 64)


def _shards(sizes, seed=0):
    key = jax.random.key(seed)
    return [np.asarray(jax.random.uniform(jax.random.fold_in(key, e), (n, 8, 8, 1)))
            for e, n in enumerate(sizes)]


def _split(n, seed=1):
    x = np.asarray(jax.random.uniform(jax.random.key(seed), (n, 8, 8, 1)))
    return Split(x, np.zeros(n, np.int32), (np.arange(n) % 2).astype(np.int32))


def _leaves(tree):
    return [np.array(v) for v in jax.tree.leaves(values(tree))]


# ------------------------------------------------------------------------------- fedavg


def test_weighted_average_equals_hand_computed_weighted_mean():
    rng = np.random.default_rng(0)

    def tree():
        return {"enc": [{"kernel": rng.standard_normal((3, 4)).astype(np.float32),
                         "bias": rng.standard_normal((4,)).astype(np.float32)}],
                "log_scale": np.float32(rng.standard_normal())}

    trees = [tree() for _ in range(3)]
    out = fedavg.weighted_average(trees, [10, 30, 60])
    # Weights 10, 30, 60 out of 100: 0.1, 0.3, 0.6.
    expected = jax.tree.map(lambda a, b, c: 0.1 * a + 0.3 * b + 0.6 * c, *trees)
    chex.assert_trees_all_close(out, expected, atol=1e-6)
    assert jax.tree.structure(out) == jax.tree.structure(trees[0])
    # A single participant is its own average; equal weights give the plain mean.
    chex.assert_trees_all_close(fedavg.weighted_average(trees[:1], [7]), trees[0], atol=1e-7)
    chex.assert_trees_all_close(fedavg.weighted_average(trees, [2, 2, 2]),
                                jax.tree.map(lambda a, b, c: (a + b + c) / 3, *trees), atol=1e-6)


@pytest.mark.parametrize("weights", [[0, 1, 1], [-1, 2, 3], [1, 2], [1, 2, 3, 4], [np.nan, 1, 1],
                                     [[1, 2, 3]]])
def test_weighted_average_refuses_bad_weights(weights):
    trees = [{"w": np.ones((2,), np.float32) * i} for i in range(3)]
    with pytest.raises(ValueError, match="weights"):
        fedavg.weighted_average(trees, weights)


def test_weighted_average_refuses_an_infinite_weight():
    trees = [{"w": np.ones((2,), np.float32) * i} for i in range(3)]
    with pytest.raises(ValueError, match="weights"):
        fedavg.weighted_average(trees, [np.inf, 1, 1])


# ------------------------------------------------------------------------------ edges


def test_edge_mesh_uses_the_largest_divisor_of_the_edge_count():
    assert len(jax.devices()) == 4
    # Divisors of E that are <= 4 devices: E=4 -> 4, E=6 -> {1, 2, 3} -> 3, E=5 -> {1} -> 1.
    assert edges.edge_mesh(4).shape["edge"] == 4
    assert edges.edge_mesh(6).shape["edge"] == 3
    assert edges.edge_mesh(5).shape["edge"] == 1
    assert edges.edge_mesh(8).shape["edge"] == 4
    assert edges.edge_mesh(4, jax.devices()[:2]).shape["edge"] == 2


def test_epoch_plan_hand_worked():
    # Sizes [5, 2], batch 2: edge 0 takes ceil(5/2) = 3 batches (2, 2, 1 rows), edge 1 takes
    # ceil(2/2) = 1 batch (2 rows), so the epoch has 3 steps and edge 1 sits out steps 1 and 2.
    idx, mask, active = edges.epoch_plan([5, 2], 2, seed=0, epoch=0)
    chex.assert_shape(idx, (3, 2, 2))
    chex.assert_shape(mask, (3, 2, 2))
    chex.assert_shape(active, (3, 2))
    np.testing.assert_array_equal(active, [[True, True], [True, False], [True, False]])
    np.testing.assert_array_equal(mask[:, 0], [[True, True], [True, True], [True, False]])
    np.testing.assert_array_equal(mask[:, 1], [[True, True], [False, False], [False, False]])
    # Every index of each edge appears exactly once per epoch (masked rows only).
    for e, n in enumerate([5, 2]):
        seen = np.sort(idx[:, e][mask[:, e]])
        np.testing.assert_array_equal(seen, np.arange(n))


def test_epoch_plan_is_a_permutation_deterministic_by_seed_and_epoch():
    sizes, batch = [50, 20, 33], 8
    a = edges.epoch_plan(sizes, batch, seed=3, epoch=1)
    b = edges.epoch_plan(sizes, batch, seed=3, epoch=1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    idx, mask, active = a
    # ceil(50/8) = 7 steps; edge 1 has ceil(20/8) = 3 batches, edge 2 ceil(33/8) = 5.
    np.testing.assert_array_equal(active.sum(axis=0), [7, 3, 5])
    for e, n in enumerate(sizes):
        np.testing.assert_array_equal(np.sort(idx[:, e][mask[:, e]]), np.arange(n))
    other_epoch = edges.epoch_plan(sizes, batch, seed=3, epoch=2)[0]
    other_seed = edges.epoch_plan(sizes, batch, seed=4, epoch=1)[0]
    for e in range(len(sizes)):
        assert not np.array_equal(idx[:, e], other_epoch[:, e])
        assert not np.array_equal(idx[:, e], other_seed[:, e])


def test_edge_training_sharded_over_four_devices_equals_one_device(mlp_specs):
    """Four heterogeneous edges with unequal shards (3 steps; edges end after 1, 2, 3 steps)."""
    specs = [mlp_specs[0], mlp_specs[1], mlp_specs[2], mlp([8], 2, [10])]
    shards = _shards([6, 3, 5, 2])
    kw = dict(batch_size=2, learning_rate=1e-2, seed=0)
    one = edges.EdgeTrainer(specs, shards, devices=jax.devices()[:1], **kw)
    four = edges.EdgeTrainer(specs, shards, devices=jax.devices(), **kw)
    assert one.mesh.shape["edge"] == 1 and four.mesh.shape["edge"] == 4
    assert len(jax.tree.leaves(four.state.params)[0].sharding.device_set) == 4
    chex.assert_trees_all_equal(one.params(), four.params())
    for epoch in range(2):
        loss_one, loss_four = one.run_epoch(epoch), four.run_epoch(epoch)
        np.testing.assert_allclose(loss_one, loss_four, rtol=1e-5)
        assert np.isfinite(loss_one).all()
    chex.assert_trees_all_close(one.params(), four.params(), atol=1e-5)
    # Training moved every edge.
    start = [L.init_learner(s, jax.random.fold_in(jax.random.key(0), e))
             for e, s in enumerate(specs)]
    for e in range(len(specs)):
        assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(start[e]),
                                                          jax.tree.leaves(one.params()[e])))


def test_edge_trainer_padding_stays_zero_and_finished_edges_sit_out():
    """Sizes [6, 2], batch 2: edge 0 takes 3 steps, edge 1 (a smaller learner, so padded) only
    step 0. Its parameters and Adam state must not move in steps 1 and 2."""
    specs = [mlp([16], 4, [16]), mlp([6], 3, [6, 5])]
    trainer = edges.EdgeTrainer(specs, _shards([6, 2]), batch_size=2, learning_rate=1e-2,
                                seed=1)
    assert trainer.steps_per_epoch == 3
    start = trainer.params()
    after = []
    loss = trainer.run_epoch(0, on_step=lambda: after.append(trainer.params()))
    assert len(after) == 3 and np.isfinite(loss).all()
    for e, steps_taken in ((0, 3), (1, 1)):
        history = [start[e]] + [p[e] for p in after]
        for s in range(3):
            moved = any(np.abs(a - b).max() > 0 for a, b in zip(
                jax.tree.leaves(history[s]), jax.tree.leaves(history[s + 1])))
            assert moved == (s < steps_taken), (e, s)
    # Adam's per-edge step count: 3 for edge 0, 1 for edge 1 (its last 2 updates are masked).
    adam = trainer.state.opt_state[0]
    assert isinstance(adam, optax.ScaleByAdamState)
    np.testing.assert_array_equal(adam.count, [3, 1])
    # Padded entries of the stacked parameters (and of Adam's moments) are still exactly zero.
    _, masks = trainer.layout.stack(trainer.params())
    assert any(not np.asarray(m).all() for m in jax.tree.leaves(masks))  # there is padding
    for tree in (trainer.state.params, adam.mu, adam.nu):
        for v, m in zip(jax.tree.leaves(tree), jax.tree.leaves(masks)):
            assert np.max(np.abs(np.where(np.asarray(m), 0.0, np.asarray(v))), initial=0.0) == 0


def test_what_an_edge_learns_does_not_depend_on_the_other_edges():
    """Edge 0 trains beside a small edge 1 (3 images) or a wider one with a larger latent (8
    images: more steps, other padded shapes): its parameters end the same (to float32
    rounding: padding changes the matmuls' shapes, not their sums)."""
    shards = _shards([6, 3])
    other = _shards([6, 8], seed=7)[1]
    params = []
    for spec, shard in ((mlp([6], 3, [6]), shards[1]), (mlp([20], 6, [20, 9]), other)):
        trainer = edges.EdgeTrainer([mlp([16], 4, [16]), spec], [shards[0], shard],
                                    batch_size=2, learning_rate=1e-2, seed=1)
        for epoch in range(2):
            trainer.run_epoch(epoch)
        params.append(trainer.params()[0])
    chex.assert_trees_all_close(params[0], params[1], rtol=1e-5, atol=1e-6)


def test_track_best_keeps_each_edges_best_epoch():
    """Three edges, one scalar parameter each. Epoch 1 (losses 5, 3, 4) is everyone's first
    best. In epoch 2 edge 0 improves (4 < 5), edge 1 does not (3.5 > 3), and edge 2 has
    stopped: its loss of 1 is not looked at, nor does its epoch count grow."""
    stop = edges.EarlyStop({"w": jnp.zeros(3)}, jnp.full(3, jnp.inf), jnp.zeros(3, jnp.int32),
                           jnp.zeros(3, jnp.int32))
    first, second = {"w": jnp.array([1.0, 2.0, 3.0])}, {"w": jnp.array([10.0, 20.0, 30.0])}
    stop = edges.track_best(stop, first, jnp.array([5.0, 3.0, 4.0]), jnp.ones(3, bool))
    stop = edges.track_best(stop, second, jnp.array([4.0, 3.5, 1.0]),
                            jnp.array([True, True, False]))
    np.testing.assert_array_equal(stop.best["w"], [10.0, 2.0, 3.0])
    np.testing.assert_array_equal(stop.loss, [4.0, 3.0, 4.0])
    np.testing.assert_array_equal(stop.best_epoch, [2, 1, 1])
    np.testing.assert_array_equal(stop.epochs, [2, 2, 1])


def test_early_stopping_keeps_each_edges_best_epoch_and_resumes():
    """Two edges trained with patience 1 against the same edges trained without stopping:
    each stops one epoch after its validation loss (the plain run's, recomputed here) first
    fails to improve, keeps the parameters of its best epoch, and sits out the rest (NaN
    training loss). Stopping, checkpointed mid-way and resumed, ends the same."""
    specs, patience, epochs = [mlp([16], 4, [16]), mlp([6], 3, [6, 5])], 1, 8
    shards, held = _shards([12, 8]), _shards([4, 3], seed=5)
    kw = dict(batch_size=4, learning_rate=0.1, seed=2)
    plain = edges.EdgeTrainer(specs, shards, **kw)
    images, mask = edges._pad_shards(held)
    curve, snapshots = [], []
    for epoch in range(epochs):
        plain.run_epoch(epoch)
        snapshots.append(plain.params())
        curve.append(np.asarray(edges.validation_loss(plain.layout, plain.state.params,
                                                      images, mask, jax.random.key(3))))
    curve = np.array(curve)  # [epochs, E]
    expected = []  # (epochs trained, best epoch) by the patience rule
    for e in range(len(specs)):
        best = 0
        for epoch in range(epochs):
            if curve[epoch, e] < curve[best, e]:
                best = epoch
            elif epoch - best >= patience:
                break
        expected.append((epoch + 1, best + 1))
    assert any(trained < epochs for trained, _ in expected)  # some edge does stop
    stopping = edges.EdgeTrainer(specs, shards, validation=held, patience=patience, **kw)
    losses = [stopping.run_epoch(epoch) for epoch in range(3)]
    resumed = edges.EdgeTrainer(specs, shards, validation=held, patience=patience, **kw)
    resumed.load_state([np.asarray(v) for v in stopping.state_leaves()])
    losses += [stopping.run_epoch(epoch) for epoch in range(3, epochs)]
    for epoch in range(3, epochs):
        resumed.run_epoch(epoch)
    for trainer in (stopping, resumed):
        out = trainer.stopping()
        assert list(zip(out["epochs"], out["best_epoch"])) == expected
        assert trainer.finished == all(trained < epochs for trained, _ in expected)
        for e, (_, best) in enumerate(expected):
            chex.assert_trees_all_close(trainer.params()[e], snapshots[best - 1][e], atol=1e-6)
            np.testing.assert_allclose(out["validation_loss"][e], curve[best - 1, e], rtol=1e-5)
    for e, (trained, _) in enumerate(expected):
        assert np.isfinite([loss[e] for loss in losses[:trained]]).all()
        assert np.isnan([loss[e] for loss in losses[trained:]]).all()


def test_local_validation_holds_out_a_fraction_of_each_shard():
    shard = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1)
    train, val = edges.local_validation(shard, 0.25, seed=0, edge=3)
    assert len(val) == 5 and len(train) == 15
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val]).ravel()), np.arange(20))
    again, _ = edges.local_validation(shard, 0.25, seed=0, edge=3)
    np.testing.assert_array_equal(train, again)
    with pytest.raises(ValueError, match=r"edges\[1\]: 1 images leave none"):
        edges.local_validation(shard[:1], 0.25, seed=0, edge=1)


def test_edge_trainer_refuses_bad_inputs():
    with pytest.raises(ValueError, match="2 specs for 1"):
        edges.EdgeTrainer([TINY, TINY], _shards([3]), batch_size=2, learning_rate=1e-3, seed=0)
    with pytest.raises(ValueError, match=r"edges\[1\]: no data"):
        edges.EdgeTrainer([TINY, TINY], [_shards([3])[0], np.zeros((0, 8, 8, 1), np.float32)],
                          batch_size=2, learning_rate=1e-3, seed=0)
    with pytest.raises(ValueError, match="validation shards and a patience"):
        edges.EdgeTrainer([TINY], _shards([3]), batch_size=2, learning_rate=1e-3, seed=0,
                          patience=2)
    with pytest.raises(ValueError, match="one non-empty validation shard per edge"):
        edges.EdgeTrainer([TINY, TINY], _shards([3, 3]), batch_size=2, learning_rate=1e-3,
                          seed=0, validation=_shards([2]), patience=2)


def test_step_flops_positive_grows_with_width_and_covers_the_output_matmul():
    batch = 8
    narrow = edges.step_flops(mlp([4], 2, [4]), batch)
    wide = edges.step_flops(mlp([32], 2, [32]), batch)
    assert 0 < narrow < wide
    # The output dense layer W -> 64 pixels alone costs 2*B*W*64 forward, and as much again
    # for each of its two backward matmuls (kernel and input gradients): 3 * 2 * B * W * 64.
    for width, flops in ((4, narrow), (32, wide)):
        assert flops >= 3 * 2 * batch * width * 64


def test_counting_compile_counts_what_the_running_compile_does():
    # COUNT_ONLY skips LLVM's optimisation; the cost analysis reads the optimised HLO, so the
    # counts agree exactly, for an MLP and a convolutional edge step.
    for spec in (mlp([32, 16], 4, [16, 32]), conv([4, 6], 4, [4, 6])):
        lowered = edges.lowered_step(spec, 8)
        assert edges.compiled_flops(lowered, edges.COUNT_ONLY) == edges.compiled_flops(lowered)


# ---------------------------------------------------------------------------- aggregate


def _uploads(tasks=("b", "a", "b", "a"), specs=None):
    specs = specs or [mlp([16], 4, [16]), mlp([12, 10], 3, [8]), mlp([6], 5, [6, 9, 7]),
                      mlp([8], 2, [10])]
    return [EdgeModel(s, t, seed=e) for e, (s, t) in enumerate(zip(specs, tasks))]


@nnx.jit
def _baim_forward(model, x, task, selected):
    return model.forward(x, task, selected=selected)


def test_aggregate_builds_squads_from_the_uploads_tasks(images):
    uploads = _uploads()
    model = cloud.aggregate(uploads, TASKS, BAIMConfig(k=1, h=1))
    # Tasks b, a, b, a -> squads 1, 0, 1, 0; learners sorted by squad (stable): uploads 1, 3, 0, 2.
    assert model.order == (1, 3, 0, 2)
    np.testing.assert_array_equal(model.layout.segment_of, [0, 0, 1, 1])
    for n, e in enumerate(model.order):
        assert model.layout.members[n].spec == uploads[e].learner_spec
        chex.assert_trees_all_equal(model.export_tree()["learners"][n],
                                    jax.tree.map(np.asarray, uploads[e].arrays()))
    # Fresh BAIM (zero connections) routed to one learner computes what that upload computes.
    batch = images.shape[0]
    for n, e in enumerate(model.order):
        selected = jnp.zeros((batch, model.layout.size), bool).at[:, n].set(True)
        task = jnp.full((batch,), model.layout.segment_of[n], jnp.int32)
        big = _baim_forward(model, images, task, selected)
        alone = uploads[e].forward(images)  # posterior mean
        chex.assert_trees_all_close(big["rec"], alone["rec"], rtol=1e-5)
        chex.assert_trees_all_close(big["recon"], alone["recon"], atol=1e-6)


def test_prior_init_by_parameters_weighs_each_squad_by_size():
    """Squad a: TINY (612 parameters) and a learner of 3 times its widths; squad b: TINY
    alone. pi is 612 / (612 + big) and big / (612 + big) in a, 1 in b; uniform: 1/2, 1/2, 1."""
    big = mlp([12], 6, [12])
    sizes = [L.count_params(s) for s in (TINY, big)]
    for how, want in [("params", [sizes[0] / sum(sizes), sizes[1] / sum(sizes), 1.0]),
                      ("uniform", [0.5, 0.5, 1.0])]:
        model = BAIM.assemble([TINY, big, TINY], [0, 0, 1], TASKS,
                              BAIMConfig(k=1, h=0, prior_init=how))
        np.testing.assert_allclose(np.exp(np.asarray(model.log_prior())), want, rtol=1e-6)
    with pytest.raises(ValueError, match="prior_init: 'size' is not one of"):
        BAIMConfig(prior_init="size").validate()


def test_aggregate_refuses_bad_uploads_naming_them():
    config = BAIMConfig(k=1, h=1)
    with pytest.raises(ValueError, match="no edge model"):
        cloud.aggregate([], TASKS, config)
    with pytest.raises(ValueError, match=r"upload 2: task 'c'"):
        cloud.aggregate(_uploads(("a", "b", "c", "a")), TASKS, config)
    uploads = _uploads()
    sizes = [u.spec.params.total for u in uploads]
    biggest = int(np.argmax(sizes))
    with pytest.raises(ValueError, match=f"upload {biggest}: {sizes[biggest]} parameters"):
        cloud.aggregate(uploads, TASKS, config, max_upload_params=sorted(sizes)[-2])
    assert cloud.aggregate(uploads, TASKS, config, max_upload_params=max(sizes)).layout.size == 4
    kernel = uploads[3].params["enc"][0]["kernel"]
    kernel[...] = kernel[...].at[0, 0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="upload 3: parameters hold non-finite"):
        cloud.aggregate(uploads, TASKS, config)
    with pytest.raises(ValueError, match="upload 1: not an edge model"):
        cloud.aggregate([uploads[0], "model"], TASKS, config)


# ---------------------------------------------------------------------------- edge model


def test_edge_model_spec_counts_its_parameters_by_hand():
    model = EdgeModel(TINY, "a")
    spec = model.spec
    assert TINY_PARAMS == 612
    assert spec.params.to_json() == {"learners": 612, "gate": 0, "connections": 0,
                                     "total": 612}
    assert sum(np.size(v) for v in jax.tree.leaves(model.arrays())) == 612
    # A Gaussian learner adds its one log-scale.
    assert EdgeModel(mlp([4], 2, [4], "gaussian"), "a").spec.params.total == 613


def test_edge_model_save_load_reconstruct_and_sample(tmp_path, images):
    model = EdgeModel(mlp([12, 10], 3, [8]), "digits", seed=4)
    path = tmp_path / "edge"
    baim_jax.save(model, path)
    loaded = baim_jax.load(path)
    assert isinstance(loaded, EdgeModel) and loaded.task == "digits"
    assert loaded.spec == model.spec
    a, b = model.reconstruct(images), loaded.reconstruct(images)
    np.testing.assert_array_equal(a["mean"], b["mean"])
    key = jax.random.key(0)
    chex.assert_trees_all_equal(model.bound(images, rng=key), loaded.bound(images, rng=key))
    chex.assert_shape(a["mean"], images.shape)
    chex.assert_shape(a["gate"], (images.shape[0], 1))
    np.testing.assert_array_equal(a["gate"], 1.0)
    assert float(jnp.min(a["mean"])) >= 0.0 and float(jnp.max(a["mean"])) <= 1.0
    s = model.sample(5, rng=jax.random.key(0))
    chex.assert_shape(s, (5, 8, 8, 1))
    assert float(jnp.min(s)) >= 0.0 and float(jnp.max(s)) <= 1.0
    np.testing.assert_array_equal(s, loaded.sample(5, rng=jax.random.key(0)))
    with pytest.raises(ValueError, match="images"):
        model.reconstruct(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="images"):
        model.reconstruct(np.zeros((8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="task"):
        model.reconstruct(images, task="other")
    with pytest.raises(ValueError, match="n:"):
        model.sample(0, rng=jax.random.key(0))


def test_edge_model_refuses_params_that_do_not_fit_its_spec():
    params = L.init_learner(mlp([5], 2, [4]), jax.random.key(0))
    with pytest.raises(ValueError, match="shapes"):
        EdgeModel(TINY, "a", params=params)
    params = L.init_learner(TINY, jax.random.key(0))
    params["dec"][1]["bias"][3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        EdgeModel(TINY, "a", params=params)


# ---------------------------------------------------------------------------- accounting


def test_accounting_fedavg_and_baim_rows():
    p = TINY_PARAMS
    fl = accounting.fedavg(params=p, rounds=3, edge_flops_per_epoch=[2.0, 5.0, 3.0],
                           cloud_flops_per_epoch=7.0, wall_seconds=1.5,
                           test_loss_curve=[9.0, 8.0, 7.5])
    # FedAvg: every round every edge sends and receives the whole float32 model, 4 bytes a
    # parameter: 4 * 612 = 2448 bytes, 3 times each way.
    assert fl["upload_bytes_per_edge"] == [4 * p, 4 * p] == [2448, 2448]
    assert fl["download_bytes_per_edge"] == [4 * p, 4 * p]
    assert fl["upload_times"] == 3 and fl["download_times"] == 3
    assert fl["edge_params"] == [p, p] and fl["cloud_trainable_params"] == p
    assert fl["edge_flops_per_epoch"] == [2.0, 5.0] and fl["cloud_flops_per_epoch"] == 7.0
    assert fl["test_loss"] == 7.5 and fl["test_loss_curve"] == [9.0, 8.0, 7.5]

    row = accounting.baim_route(edge_params=[100, 250, 40], task_model_params=[500, 700, 500],
                                edge_flops_per_epoch=[3.0, 1.0, 2.0],
                                cloud={"trainable_params": 1234, "flops_per_epoch": 9.0},
                                wall_seconds=2.0, test_loss_curve=[5.0, 4.0])
    # Each edge uploads its own model once (4*40 .. 4*250 bytes) and downloads its task model
    # once (4*500 .. 4*700 bytes).
    assert row["upload_times"] == 1 and row["download_times"] == 1
    assert row["edge_params"] == [40, 250]
    assert row["upload_bytes_per_edge"] == [160, 1000]
    assert row["download_bytes_per_edge"] == [2000, 2800]
    assert row["edge_flops_per_epoch"] == [1.0, 3.0]
    assert row["cloud_trainable_params"] == 1234 and row["cloud_flops_per_epoch"] == 9.0
    assert row["test_loss"] == 4.0


def test_cloud_trainable_params_hand_counted():
    model = BAIM.assemble([TINY, TINY], [0, 1], TASKS, BAIMConfig(k=1, h=0, feature_dim=4))
    # Gate, feature_dim 4: phi 8*8*1*4 + 4 = 260; LSGate (4 + 1) * 2 learners = 10;
    # prior logits, 1 per learner = 2; TSGate 4*2 + 2 tasks = 10. Total 282.
    gate = (64 * 4 + 4) + (4 + 1) * 2 + 2 + (4 * 2 + 2)
    # Connections, h=0 (same position only), 2 learners -> 2 directed pairs per position:
    # enc position 1 (head input, 4 features; position 0 reads the image and is no source):
    # 2 * 4*4 = 32; dec position 0 (z, 2 -> 2): 2 * 2*2 = 8; dec position 1 (4 -> 4): 2 * 16 = 32.
    conns = 2 * 4 * 4 + 2 * 2 * 2 + 2 * 4 * 4
    assert model.spec.params.gate == gate == 282
    assert len(model.conns) == 6
    assert sum(model.conns.param_count(c) for c in model.conns.connections) == conns == 72
    assert accounting.cloud_trainable_params(model, "freeze") == gate + conns == 354
    for strategy in ("finetune", "scratch"):
        assert (accounting.cloud_trainable_params(model, strategy)
                == 2 * TINY_PARAMS + gate + conns == 1578)
    # Pruned connections still count (every potential connection trains until pruned).
    model.prune_connections(0.5)
    assert model.spec.params.connections < conns
    assert accounting.cloud_trainable_params(model, "freeze") == 354


# ---------------------------------------------------------------------------- pruning


class _Recorder:
    def __init__(self):
        self.calls = []

    def prune_connections(self, fraction):
        self.calls.append(fraction)


def test_pruning_schedule_steps_and_final_count(mlp_specs):
    pruning = cloud.Pruning(rho=0.25, start=4, end=12, every=4)
    rec = _Recorder()
    steps = []
    for step in range(18):
        before = len(rec.calls)
        pruning.after_step(rec, step)
        if len(rec.calls) > before:
            steps.append(step)
    # Multiples of 4 from step 4 on: 4, 8, 12, 16 (step 0 is before start).
    assert steps == [4, 8, 12, 16]
    # Cubic schedule: 1 at start; at 8, halfway: 0.25 + 0.75 * (1 - 1/2)**3 = 0.34375; rho on.
    np.testing.assert_allclose(rec.calls, [1.0, 0.34375, 0.25, 0.25])

    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=1, h=1, feature_dim=8))
    randomize_connections(model, 0, 0.3)
    potential = len(model.conns)
    kept = {}
    for step in range(13):
        pruning.after_step(model, step)
        kept[step] = int(model.kept_flat().sum())
    assert kept[3] == potential and kept[4] == potential
    assert kept[8] == kept[11] == math.ceil(0.34375 * potential)
    assert kept[12] == math.ceil(0.25 * potential) < potential


def test_pruning_reaches_rho_when_end_is_not_a_multiple_of_every():
    # end = 10 with every = 4: multiples 4, 8 fall before the end and 12 may never come (a run
    # of 10 steps), so step 10 prunes too: 1.0 at 4 (start 4), then rho at 10.
    pruning = cloud.Pruning(rho=0.25, start=4, end=10, every=4)
    rec = _Recorder()
    steps = []
    for step in range(1, 11):
        before = len(rec.calls)
        pruning.after_step(rec, step)
        if len(rec.calls) > before:
            steps.append(step)
    assert steps == [4, 8, 10]
    # At 8: 0.25 + 0.75 * (1 - 4/6)**3 = 0.25 + 0.75 / 27.
    np.testing.assert_allclose(rec.calls, [1.0, 0.25 + 0.75 / 27, 0.25])


# ---------------------------------------------------------------------------- cloud trainer


def _tiny_baim(mlp_specs, seed=0):
    return BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=1, h=1, feature_dim=8), seed=seed)


def test_epoch_batches():
    batches = cloud.epoch_batches(10, 4, seed=0, epoch=0)
    # 10 examples in full batches of 4: 2 batches, the 2 left over wait for another epoch.
    assert [len(b) for b in batches] == [4, 4]
    assert len(set(np.concatenate(batches).tolist())) == 8
    assert [len(b) for b in cloud.epoch_batches(3, 4, seed=0, epoch=0)] == [3]


def test_cloud_trainer_freeze_keeps_learners_and_trains_gate(mlp_specs):
    model = _tiny_baim(mlp_specs)
    learners, gate = _leaves(model.learners), _leaves(model.gate)
    trainer = cloud.Trainer(model, "freeze", _split(16), learning_rate=1e-2, batch_size=8,
                            seed=0)
    metrics = trainer.run_epoch(0)
    assert np.isfinite(metrics["loss"])
    for before, after in zip(learners, _leaves(model.learners)):
        np.testing.assert_array_equal(before, after)
    assert any(np.abs(b - a).max() > 0 for b, a in zip(gate, _leaves(model.gate)))


def test_adam_follows_a_cosine_to_zero_over_its_decay_steps():
    """A constant gradient of 1: each of Adam's bias-corrected updates is -rate (to its eps);
    the cosine over 4 steps scales step s by (1 + cos(pi s / 4)) / 2, so the updates are
    -0.1 * (1, 0.854, 0.5, 0.146) and then 0 for good. The constant rate stays -0.1."""
    params = {"w": jnp.zeros(())}
    grads = {"w": jnp.ones(())}
    for tx, scales in [(optim.adam(0.1, 4), [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]),
                       (optim.adam(0.1), [1.0] * 6)]:
        state, got = tx.init(params), []
        for _ in scales:
            with jax.numpy_dtype_promotion("standard"):  # optax: float ** int32 step count
                updates, state = tx.update(grads, state)
            got.append(float(updates["w"]))
        np.testing.assert_allclose(got, [-0.1 * s for s in scales], atol=1e-4)
    assert optim.decay_steps("constant", 40) is None and optim.decay_steps("cosine", 40) == 40
    with pytest.raises(ValueError, match="schedule: 'linear' is not one of"):
        optim.decay_steps("linear", 40)


def test_adam_initialises_every_leaf_in_one_compiled_program():
    """Six leaves of six shapes: optax's eager init compiles a fill of zeros per shape (8
    programs here), the jitted init one program, and its state is optax's own."""
    params = {f"w{i}": np.ones((i + 2, 3 * i + 5), np.float32) for i in range(6)}
    with backend_compiles() as compiles:
        state = optim.adam(0.25).init(params)
    assert len(compiles) == 1
    chex.assert_trees_all_equal(state, optax.adam(0.25).init(params))


def test_trainers_change_nothing_once_the_rate_has_decayed(mlp_specs):
    """Decay over one epoch's steps: the first epoch trains, the second (rate 0) leaves every
    parameter as it was, for the cloud's trainer and the edges' alike."""
    data = _split(16)
    model = _tiny_baim(mlp_specs)
    trainer = cloud.Trainer(model, "freeze", data, learning_rate=1e-2, batch_size=8, seed=0,
                            decay_steps=2)
    gate = _leaves(model.gate)
    trainer.run_epoch(0)
    after = _leaves(model.gate)
    assert any(np.abs(b - a).max() > 0 for b, a in zip(gate, after))
    trainer.run_epoch(1)
    chex.assert_trees_all_equal(_leaves(model.gate), after)
    edge = edges.EdgeTrainer([TINY], _shards([6]), batch_size=2, learning_rate=1e-2, seed=0,
                             decay_steps=3)
    edge.run_epoch(0)
    after = edge.params()
    edge.run_epoch(1)
    chex.assert_trees_all_equal(edge.params(), after)


def test_cloud_trainer_resume_from_state_leaves_is_exact(mlp_specs):
    """Epoch 1 after restoring epoch 0's leaves into a fresh trainer of a fresh identical model
    is bit-identical to epoch 1 of the uninterrupted run (what the pipeline's resume relies on).
    The freeze strategy shares the compiled step with the other cloud-trainer tests."""
    data = _split(16)
    kw = dict(learning_rate=1e-2, batch_size=8, seed=0)
    trainer = cloud.Trainer(_tiny_baim(mlp_specs), "freeze", data, **kw)
    trainer.run_epoch(0)
    saved = [np.array(v) for v in trainer.state_leaves()]
    trainer.run_epoch(1)
    a = trainer.state_leaves()
    assert any(not np.array_equal(u, v) for u, v in zip(a, saved))

    resumed = cloud.Trainer(_tiny_baim(mlp_specs), "freeze", data, **kw)
    assert any(not np.array_equal(u, v) for u, v in zip(resumed.state_leaves(), saved))
    resumed.load_state(saved)
    chex.assert_trees_all_equal(resumed.state_leaves(), saved)
    resumed.run_epoch(1)
    chex.assert_trees_all_equal(resumed.state_leaves(), a)


def test_cloud_trainer_loads_another_trainers_live_state_as_copies(mlp_specs):
    # Steps consume (donate) their trainer's state; a trainer loaded from another's live
    # arrays must not consume the other's.
    data = _split(16)
    kw = dict(learning_rate=1e-2, batch_size=8, seed=0)
    source = cloud.Trainer(_tiny_baim(mlp_specs), "freeze", data, **kw)
    copy = cloud.Trainer(_tiny_baim(mlp_specs), "freeze", data, **kw)
    copy.load_state(source.state_leaves())
    copy.run_epoch(0)
    source.run_epoch(0)
    chex.assert_trees_all_equal(copy.state_leaves(), source.state_leaves())


def test_a_damaged_epoch_checkpoint_is_set_aside_for_the_one_before(tmp_path):
    """The last two epochs are kept; a latest one whose record is damaged, whose arrays are
    not the ones saved or that does not restore is renamed into ``set_aside`` (never
    deleted), with one warning, and the epoch before it is used; none left: None."""
    fresh = {"epoch": 0, "elapsed": 0.0, "curve": []}
    warnings = []
    ckpt = rundir.PhaseCheckpoint(tmp_path / "ckpt" / "phase", warn=warnings.append)
    for step in (1, 2, 3):
        ckpt.save(step, [np.full(3, float(step))], {"epoch": step, "elapsed": 1.0,
                                                    "curve": [1.0] * step})
    ckpt.wait()
    assert sorted(p.name for p in (tmp_path / "ckpt" / "phase").iterdir()) == ["2", "3"]
    leaves, meta = ckpt.latest([np.zeros(3)], fresh)
    np.testing.assert_array_equal(leaves[0], 3.0)
    ckpt.save(4, [np.ones(3)], {"epoch": "x", "elapsed": 1.5, "curve": []})
    leaves, meta = ckpt.latest([np.zeros(3)], fresh)
    assert meta["epoch"] == 3 and len(warnings) == 1
    assert "phase/4: its record is damaged; set aside as" in warnings[0]
    assert (tmp_path / "ckpt" / "set_aside" / "phase-4").is_dir()
    shutil.rmtree(tmp_path / "ckpt" / "phase" / "3" / "state")  # epoch 2 went when 4 came
    (tmp_path / "ckpt" / "phase" / "3" / rundir.PhaseCheckpoint.FILES).unlink()  # orbax's turn
    assert ckpt.latest([np.zeros(3)], fresh) is None
    assert "phase/3: it cannot be restored" in warnings[1]
    ckpt.save(5, [np.ones(3)], {"epoch": 5, "elapsed": 1.0, "curve": []})
    assert ckpt.latest([np.zeros(4)], fresh) is None
    assert "array 0 has shape (3,), this run needs (4,)" in warnings[2]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "set_aside").iterdir()) == [
        "phase-3", "phase-4", "phase-5"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"seed": ')
    with pytest.raises(ValueError, match=r"run/config.json: unreadable"):
        rundir.run_config(tmp_path / "run")


def test_cloud_trainer_pruning_survives_later_steps(mlp_specs):
    model = _tiny_baim(mlp_specs)
    randomize_connections(model, 0, 0.3)
    potential = len(model.conns)
    # 3 batches of 8; steps 1, 2, 3; pruning only at step 2 (to rho: end=1), not at step 3.
    trainer = cloud.Trainer(model, "freeze", _split(24), learning_rate=1e-2, batch_size=8,
                            seed=0, pruning=cloud.Pruning(rho=0.25, start=0, end=1, every=2))
    trainer.run_epoch(0)
    assert model.spec.connections_kept == math.ceil(0.25 * potential)


def test_cloud_trainer_resume_is_exact_with_pruning(mlp_specs):
    data = _split(16)

    def make():
        model = _tiny_baim(mlp_specs)
        randomize_connections(model, 0, 0.3)
        # 2 batches an epoch; global steps 1, 2 | 3, 4; pruning at 2 (end of epoch 0) and 4.
        return cloud.Trainer(model, "freeze", data, learning_rate=1e-2, batch_size=8, seed=0,
                             pruning=cloud.Pruning(rho=0.25, start=0, end=2, every=2))

    trainer = make()
    trainer.run_epoch(0)
    saved = [np.array(v) for v in trainer.state_leaves()]
    trainer.run_epoch(1)
    resumed = make()
    resumed.load_state(saved)
    resumed.run_epoch(1)
    chex.assert_trees_all_equal(resumed.state_leaves(), trainer.state_leaves())


def _links(model, tower="dec"):
    return {(c.src, c.tgt) for c, k in zip(model.conns.connections, model.kept_flat())
            if k and c.tower == tower}


def test_decoder_links_that_only_cost_kl_are_pruned():
    """A fresh BAIM: every connection kernel is zero, so a decoder link gives its target
    nothing and only brings its feeder's latent KL. All decoder links go; reconstruction is
    exactly as before, the KL lower; the encoder connections (no latent) all stay."""
    specs = [mlp([16], 4, [16]), mlp([12], 3, [8, 8]), mlp([6], 5, [6]), mlp([16], 4, [16])]
    model = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=2, h=1, feature_dim=8))
    data = _split(12)
    enc, dec = _links(model, "enc"), _links(model)
    assert enc and dec
    before = likelihood.image_bounds(model, data)
    dropped = cloud.prune_links_by_bound(model, data)
    after = likelihood.image_bounds(model, data)
    assert set(dropped) == dec and not _links(model) and _links(model, "enc") == enc
    np.testing.assert_allclose(after["rec"], before["rec"], rtol=1e-6)
    assert after["kl"].mean() < before["kl"].mean()


def test_decoder_link_pruning_is_greedy_to_a_fixed_point(mlp_specs, monkeypatch):
    """A made-up bound over the kept decoder links, in pool order a, b, c, then the rest: a
    is worth 3 nats while c is kept (0 without), b is worth 4, c costs 5, every other link
    costs 1. Pass 1 keeps a (c is still there) and b, drops c and the rest; pass 2 drops a,
    now worth nothing (an equal bound drops); pass 3 drops nothing. Only b is left, and the
    dropped links' kernels are zeroed."""
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=2, h=1, feature_dim=8))
    randomize_connections(model, 3)
    a, b, c, *rest = sorted(_links(model))

    def made_up(m, data):
        kept = _links(m)
        return (100.0 - 3 * (a in kept and c in kept) - 4 * (b in kept) + 5 * (c in kept)
                + sum(link in kept for link in rest))

    monkeypatch.setattr(cloud, "_mean_nelbo", made_up)
    assert cloud.prune_links_by_bound(model, None) == [c, *rest, a]
    assert _links(model) == {b}
    kernels = model.export_tree()["connections"]
    for conn, kept, kernel in zip(model.conns.connections, model.kept_flat(), kernels):
        assert kept == (conn.tower == "enc" or (conn.src, conn.tgt) == b)
        assert kept == bool(np.asarray(kernel).any())


def test_cloud_learning_rate_per_strategy():
    from conftest import SMOKE

    from baim_jax.cli import load_config
    from baim_jax.framework import plan

    config = load_config(SMOKE, ["--config.cloud.learning_rates={'freeze': 3e-4}"])
    p = plan.validate(config)
    assert p.cloud_learning_rate("freeze") == 3e-4
    assert p.cloud_learning_rate("finetune") == config.cloud.learning_rate == 1e-3


def test_plan_takes_pruning_from_step_zero_and_refuses_unknown_top_level_keys():
    from conftest import SMOKE

    from baim_jax.cli import load_config
    from baim_jax.framework import plan

    config = load_config(SMOKE, ["--config.cloud.prune_start=0.0"])
    assert plan.validate(config).config.cloud.prune_start == 0.0
    config = load_config(SMOKE, [])
    config.fooo = 3  # as a config file could set it (the command line refuses it earlier)
    with pytest.raises(ValueError, match=r"config: unknown key\(s\) \['fooo'\]"):
        plan.validate(config)


def test_the_cloud_phase_prunes_decoder_links_on_its_own_images_when_asked():
    """``cloud.decoder_pruning = kl_cost`` gives the cloud's pruning schedule the cloud's
    training images to score decoder links on (``Pruning.links``); ``magnitude`` none."""
    from conftest import SMOKE

    from baim_jax.cli import load_config
    from baim_jax.framework import pipeline, plan

    for how in ("kl_cost", "magnitude"):
        p = plan.validate(load_config(SMOKE, [f"--config.cloud.decoder_pruning={how}"]))
        uploads = [EdgeModel(s, p.tasks[t]) for s, t in zip(p.specs, p.edge_tasks)]
        trainer = pipeline.cloud_trainer(p, uploads, "finetune", 1e-3, p.data.cloud)
        assert (trainer.pruning.links is p.data.cloud) == (how == "kl_cost")
        assert (trainer.pruning.links is None) == (how == "magnitude")


def test_the_cloud_takes_only_the_uploads_its_config_trained(tmp_path):
    """An upload swapped for another edge's model (same task or not) is refused by name."""
    from conftest import SMOKE

    from baim_jax.cli import load_config
    from baim_jax.framework import pipeline
    from baim_jax.framework import plan as plan_lib

    plan = plan_lib.validate(load_config(SMOKE, []))
    ids = plan.edge_ids
    for e, eid in enumerate(ids):
        baim_jax.save(EdgeModel(plan.specs[e], plan.tasks[plan.edge_tasks[e]], seed=e),
                      tmp_path / "edges" / eid / "initial")
    assert len(pipeline._uploads(plan, tmp_path)) == len(ids)
    other = next(e for e in range(1, len(ids)) if plan.specs[e] != plan.specs[0])
    baim_jax.save(EdgeModel(plan.specs[other], plan.tasks[plan.edge_tasks[0]], seed=9),
                  tmp_path / "edges" / ids[0] / "initial")
    with pytest.raises(ValueError, match=f"edges/{ids[0]}/initial: not the upload of {ids[0]}"):
        pipeline._uploads(plan, tmp_path)


def test_curves_are_measured_every_curve_every_epochs_and_after_the_last(monkeypatch):
    """curve_every = 3 over 7 epochs: after epochs 3, 6 and 7 (1-based), None between."""
    from types import SimpleNamespace

    import ml_collections

    from baim_jax.framework import pipeline

    monkeypatch.setattr(pipeline.likelihood, "test_loss", lambda model, data: 1.0)
    monkeypatch.setattr(pipeline.measures, "model_fid", lambda *args: 2.0)
    plan = SimpleNamespace(config=ml_collections.ConfigDict({"curve_every": 3, "seed": 0}),
                           data=SimpleNamespace(test=None))
    points = [pipeline._curve_point(plan, None, e, 7, None) for e in range(7)]
    assert [p["curve"] for p in points] == [None, None, 1.0, None, None, 1.0, 1.0]
    assert [p["fid"] for p in points] == [None, None, 2.0, None, None, 2.0, 2.0]
