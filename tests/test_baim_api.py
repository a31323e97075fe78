"""The public API of a BAIM and a TaskModel, and refusal of bad input before any compute."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE, conv, mlp
from flax import nnx
from reference import reference_paths

from baim_jax import BAIM, BAIMConfig, LearnerSpec, SpecError, partition
from baim_jax.core import baim as baim_lib
from baim_jax.core import bound, edge_model, learners, losses
from baim_jax.core.edge_model import EdgeModel
from baim_jax.evaluation import likelihood

SQUADS = [0, 1, 0, 1]
TASKS = ["a", "b"]


@pytest.fixture
def model(mlp_specs):
    return BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=2, h=1))


def test_reconstruct_contract(model, images):
    out = model.reconstruct(images, task="b")
    chex.assert_shape(out["mean"], images.shape)
    chex.assert_shape(out["gate"], (images.shape[0], 4))
    assert float(out["mean"].min()) >= 0.0 and float(out["mean"].max()) <= 1.0
    gate = np.asarray(out["gate"])
    np.testing.assert_array_equal((gate != 0).sum(1), 2)
    in_b = model.layout.segment_of == 1
    assert np.all(gate[:, ~in_b] == 0)
    np.testing.assert_allclose(gate.sum(1), 1.0, rtol=1e-6)
    # No rng: the posterior mean, deterministic; with an rng: a draw.
    again = model.reconstruct(images, task="b")
    chex.assert_trees_all_equal(out["mean"], again["mean"])
    noisy = model.reconstruct(images, task="b", rng=jax.random.key(0))
    assert float(jnp.abs(noisy["mean"] - out["mean"]).max()) > 0


def test_task_given_by_name_id_or_tsgate(model, images):
    by_name = model.reconstruct(images, task="a")
    by_id = model.reconstruct(images, task=0)
    chex.assert_trees_all_equal(by_name["mean"], by_id["mean"])
    routed = model.reconstruct(images)
    chex.assert_shape(routed["task"], (images.shape[0],))
    assert set(np.asarray(routed["task"]).tolist()) <= {0, 1}


def test_task_model_contract(model, images):
    task_model = partition(model, "a")
    out = task_model.reconstruct(images)
    chex.assert_shape(out["gate"], (images.shape[0], 2))
    assert task_model.task == "a"
    samples = task_model.sample(5, task="a", rng=jax.random.key(1))
    chex.assert_shape(samples, (5, *IMAGE))
    with pytest.raises(ValueError, match="unknown task 'b'"):
        task_model.reconstruct(images, task="b")


def test_sample_contract(model):
    drawn = model.draw(7, task="a", rng=jax.random.key(0))
    chex.assert_shape(drawn["images"], (7, *IMAGE))
    assert float(drawn["images"].min()) >= 0.0 and float(drawn["images"].max()) <= 1.0
    chex.assert_trees_all_close(drawn["images"],
                                losses.pixel_mean(drawn["out"], "bernoulli"))
    chex.assert_trees_all_equal(model.sample(7, task="a", rng=jax.random.key(0)),
                                drawn["images"])


def _decode_alone(model, n, z):
    """Learner ``n`` of ``model`` decoding ``z [B, d_n]`` by itself (its own unpadded
    parameters; the connections of a fresh model are zero)."""
    spec = model.layout.members[n].spec
    tree = model.export_tree()["learners"][n]
    a = z
    for stage, params in zip(learners.stages(spec)["dec"], tree["dec"]):
        a = learners.apply_stage(stage, params, a)
    return np.asarray(losses.pixel_mean(a, spec.likelihood))


def test_samples_come_from_single_learners_each_on_its_own_noise(model):
    """Each sample is one learner of the task's squad (model order: 0, 1 are task a's)
    decoding its own stream of noise; with pi uniform, 64 draws pick both."""
    key, n = jax.random.key(3), 64
    drawn = model.draw(n, task="a", rng=key)
    rows = baim_lib.sample_rows(n)
    eps = bound.latent_noise(jax.random.split(key)[1], model.layout.streams, rows,
                             model.layout.latent)[:, :n]
    learner = np.asarray(drawn["learner"])
    assert set(learner.tolist()) == {0, 1}
    for i in range(n):
        m = learner[i]
        alone = _decode_alone(model, m, eps[m, i:i + 1, :model.layout.members[m].spec.latent])
        np.testing.assert_allclose(np.asarray(drawn["images"][i:i + 1]), alone, atol=1e-5)


def test_sample_of_n_is_a_sampler_of_exactly_n_rows(model):
    """``sample`` draws ``sample_rows(n)`` rows (one compile for a power-of-two bucket of n,
    never more than twice n) and keeps the first n: they are the images a sampler of exactly
    n rows gives, for either task."""
    assert [baim_lib.sample_rows(n) for n in (1, 7, 8, 9, 256, 257)] == [1, 8, 8, 16, 256, 512]
    key = jax.random.key(4)
    for task in (0, 1):
        exact, _ = baim_lib._draw(model, 7, jnp.int32(task), key)
        chex.assert_trees_all_close(model.draw(7, task=task, rng=key)["out"], exact, atol=1e-6)
        chex.assert_trees_all_close(model.draw(300, task=task, rng=key)["out"][:7], exact,
                                    atol=1e-6)
    edge = EdgeModel(mlp([16], 4, [16]), "a", seed=0)
    chex.assert_trees_all_close(edge.draw(7, rng=key)["out"],
                                edge_model._draw(edge.learner_spec, edge.arrays(), 7, key),
                                atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(n=0), "n: must be a positive integer"), (dict(n=True), "n: must be a positive"),
    (dict(task="c"), "unknown task 'c'"), (dict(task=5), "task: id 5"),
    (dict(task=None), "task: required to sample from a model of several tasks")])
def test_sample_refuses_bad_arguments(model, bad, match):
    kwargs = dict(n=3, task="a", rng=jax.random.key(0))
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        model.sample(kwargs.pop("n"), **kwargs)


def test_bad_images_are_refused_before_compute(model):
    with pytest.raises(ValueError, match="images: shape"):
        model.reconstruct(jnp.zeros((2, 28, 28, 1)), task="a")
    with pytest.raises(ValueError, match="images: shape"):
        model.reconstruct(jnp.zeros((8, 8, 1)), task="a")


def test_unknown_task_ids_are_refused(model, images):
    with pytest.raises(ValueError, match="unknown task 'z'"):
        model.reconstruct(images, task="z")
    with pytest.raises(ValueError, match="task: id 2"):
        model.reconstruct(images, task=np.array([0, 1, 2, 0, 1, 0]))


@pytest.mark.parametrize("config,match", [
    (dict(k=3), "k: 3 is larger than squad 'a'"), (dict(k=0), "k: must be"),
    (dict(h=-1), "h: must be"), (dict(gate="sparsest"), "unknown gate function"),
    (dict(connect=("enc", "middle")), "connect"), (dict(connect=("dec", "dec")), "connect"),
    (dict(dispatch="ragged"), "dispatch"),
    (dict(capacity_factor=0.0), "capacity_factor"), (dict(noise_std=-1.0), "noise_std")])
def test_bad_config_is_refused(mlp_specs, config, match):
    with pytest.raises(ValueError, match=match):
        BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(**config))


def test_bad_assembly_is_refused(mlp_specs):
    with pytest.raises(ValueError, match="task 'c' has no learner"):
        BAIM.assemble(mlp_specs, SQUADS, TASKS + ["c"])
    with pytest.raises(ValueError, match="squads: 3 given for 4 learners"):
        BAIM.assemble(mlp_specs, SQUADS[:3], TASKS)
    with pytest.raises(SpecError, match="field 'kind'"):
        BAIM.assemble(mlp_specs[:2] + [conv([4, 4], 2, [4, 4])] * 2, SQUADS, TASKS)


@pytest.mark.parametrize("fields,match", [
    (dict(kind="rnn"), "'kind'"), (dict(latent=0), "'latent'"),
    (dict(encoder=(8, -1)), "'encoder'"), (dict(likelihood="poisson"), "'likelihood'"),
    (dict(kind="conv", encoder=(4,)), "'encoder': conv learners need at least 2"),
    (dict(encoder=()), "'encoder': MLP learners need at least one hidden encoder layer"),
    (dict(kind="conv", image_shape=(10, 10, 1), encoder=(4, 4), decoder=(4, 4)),
     "'image_shape': conv learners need H and W divisible by 4"),
    (dict(image_shape=(8, 8)), "'image_shape'")])
def test_learner_spec_names_the_field_it_cannot_build(fields, match):
    base = dict(kind="mlp", image_shape=IMAGE, encoder=(8,), latent=2, decoder=(8,))
    base.update(fields)
    with pytest.raises(SpecError, match=match):
        LearnerSpec(**base)


def test_uploads_that_do_not_match_their_spec_are_refused(mlp_specs):
    uploads = [learners.init_learner(s, jax.random.key(n)) for n, s in enumerate(mlp_specs)]
    wrong = jax.tree.map(lambda a: a, uploads)
    wrong[2]["enc"][0]["kernel"] = np.zeros((8, 8, 1, 5), np.float32)
    with pytest.raises(ValueError, match="learner 1: enc stage 0 'kernel' has shape"):
        BAIM.assemble(mlp_specs, SQUADS, TASKS, params=wrong)
    nan = jax.tree.map(lambda a: a, uploads)
    nan[1]["dec"][0]["bias"] = np.full_like(nan[1]["dec"][0]["bias"], np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        BAIM.assemble(mlp_specs, SQUADS, TASKS, params=nan)
    model = BAIM.assemble(mlp_specs, SQUADS, TASKS, params=uploads)
    for n, tree in enumerate(model.export_tree()["learners"]):
        chex.assert_trees_all_equal(tree, uploads[model.order[n]])


def test_connect_switches_connections_off_by_tower(mlp_specs):
    """``connect`` chooses the towers that get connections: both (default), the encoder's
    only (free for the bound: they shape q alone), or none (the ablation)."""
    counts = {}
    for connect in (("enc", "dec"), ("enc",), ("dec",), ()):
        model = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=1, h=1, connect=connect))
        towers = {c.tower for c in model.conns.connections}
        assert towers == set(connect)
        counts[connect] = len(model.conns)
        if "dec" not in connect:
            np.testing.assert_array_equal(np.asarray(model.consumed()), np.eye(4, dtype=bool))
    assert counts[("enc", "dec")] == counts[("enc",)] + counts[("dec",)] > 0
    assert counts[()] == 0


def _saturate_output(model, value):
    """Sets every learner's output bias (image-shaped in every learner: no padding) to
    ``value``: logits far past float32's sigmoid range, or Gaussian means outside [0, 1], as
    a confident trained model may have."""
    bias = model.learners["dec"][-1]["bias"]
    bias[...] = jnp.full_like(bias[...], value)


@pytest.mark.parametrize("likelihood,bias", [("bernoulli", 30.0), ("bernoulli", -30.0),
                                             ("gaussian", 1.7), ("gaussian", -0.6)])
def test_reconstruction_is_scored_outside_the_easy_range(images, likelihood, bias):
    """A saturated logit of +-30 costs 30 nats on a wrong pixel and keeps its gradient;
    Gaussian means outside [0, 1] are scored unclipped (a clipped mean would lower the loss
    and stop its gradient)."""
    specs = [mlp([8], 2, [8], likelihood)] * 2 + [mlp([6], 3, [6], likelihood)] * 2
    model = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=1, h=0))
    _saturate_output(model, bias)
    first = jnp.zeros((len(images), 4), bool).at[:, 0].set(True)
    rec = np.asarray(model.forward(images, jnp.zeros(len(images), jnp.int32),
                                   selected=first)["rec"])

    def loss(model):
        return jnp.mean(model.forward(images, jnp.zeros(len(images), jnp.int32))["nelbo"])

    grad = nnx.jit(nnx.grad(loss))(model).learners["dec"]
    assert float(jnp.abs(grad[len(grad) - 1]["bias"][...]).max()) > 0.01
    if likelihood == "bernoulli":
        wrong = np.asarray((images > 0.5) != (bias > 0)).reshape(len(images), -1).sum(1)
        assert np.all(rec >= 29.0 * wrong)
    else:
        out = np.asarray(reference_paths(model, images, jnp.zeros((4, len(images), 3)))[0]["out"])
        assert out.min() < 0 or out.max() > 1
        x, mean = np.asarray(images).reshape(len(images), -1), out.reshape(len(images), -1)
        want = np.sum(0.5 * (x - mean) ** 2 + 0.5 * np.log(2 * np.pi), axis=1)
        np.testing.assert_allclose(rec, want, rtol=1e-5)


def test_gaussian_learners(images):
    specs = [mlp([8], 2, [8], "gaussian")] * 2 + [mlp([6], 3, [6], "gaussian")] * 2
    model = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=1, h=1))
    out = model.bound(images, task="a", rng=jax.random.key(0))
    assert np.isfinite(np.asarray(out["nelbo"])).all()
    assert model.spec.learners[0].params == learners.count_params(specs[0])
    assert learners.count_params(specs[0]) == learners.count_params(mlp([8], 2, [8])) + 1


def test_spec_is_json_and_counts_real_parameters(model):
    spec = json.loads(json.dumps(model.spec.to_json()))
    assert spec["k"] == 2 and spec["h"] == 1 and spec["tasks"] == TASKS
    assert [m["params"] for m in spec["learners"]] == [
        learners.count_params(m.spec) for m in model.layout.members]
    conn = spec["connections"]
    assert conn["potential"] == conn["kept"] == len(conn["list"]) > 0
    p = spec["params"]
    assert p["total"] == p["learners"] + p["gate"] + p["connections"]
    assert p["learners"] == sum(m["params"] for m in spec["learners"])
    assert spec["padding_waste"] >= 1.0


def test_edge_models_of_one_spec_share_compiled_programs():
    """An edge model's task is part of its static structure, but not of its reconstructions,
    its bound, its sampler or its importance-weighted likelihood: edges of one spec and
    different tasks run the same four compiled programs."""
    spec, key = mlp([16], 4, [16]), jax.random.key(0)
    x = np.random.default_rng(0).random((5,) + spec.image_shape, np.float32)
    programs = (edge_model._forward, edge_model._bounds, edge_model._draw,
                likelihood._learner_iw)
    for program in programs:
        program.clear_cache()
    for task, seed in (("a", 0), ("b", 1)):
        edge = EdgeModel(spec, task, seed=seed)
        edge.reconstruct(x)
        edge.bound(x, rng=key)
        edge.draw(3, rng=key)
        likelihood.iw_log_likelihood(edge, x, edge.task_ids(None, 5), key, 4)
    assert [program._cache_size() for program in programs] == [1, 1, 1, 1]
