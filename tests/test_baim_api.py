"""The public API of a BAIM and a TaskModel, and refusal of bad input before any compute."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baim_jax import BAIM, BAIMConfig, LearnerSpec, SpecError, partition
from baim_jax.core import baim as baim_lib
from baim_jax.core import edge_model
from baim_jax.core import learners as L
from baim_jax.core import losses
from baim_jax.core.edge_model import EdgeModel
from conftest import IMAGE, conv, mlp

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


@pytest.mark.parametrize("mode", ["mixture", "blend"])
def test_sample_contract(model, mode):
    x = model.sample(7, task="a", rng=jax.random.key(0), mode=mode)
    chex.assert_shape(x, (7, *IMAGE))
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def _decode_alone(model, n, eps):
    """Learner ``n`` of ``model`` decoding the first d_n coordinates of ``eps`` by itself
    (its own unpadded parameters; the connections of a fresh model are zero)."""
    spec = model.layout.members[n].spec
    tree = model.export_tree()["learners"][n]
    a = eps[:, :spec.latent]
    for stage, params in zip(L.stages(spec)["dec"], tree["dec"]):
        a = L.apply_stage(stage, params, a)
    return np.asarray(losses.pixel_mean(a, spec.likelihood))


def test_mixture_samples_come_from_single_learners(model):
    """Each mixture sample is exactly one learner's decoding of the shared noise, a learner of
    the task's squad (model order: 0, 1 are task a's); with a prior of 1/2 each, 64 draws pick
    both. The blend is the prior-weighted average of the two decodings."""
    key, n = jax.random.key(3), 64
    mixture = np.asarray(model.sample(n, task="a", rng=key))
    eps = baim_lib.shared_noise(jax.random.split(key)[0], baim_lib.sample_rows(n),
                                model.layout.latent)[:n]
    alone = [_decode_alone(model, m, eps) for m in range(4)]
    match = np.array([[np.allclose(mixture[i], alone[m][i], atol=1e-5) for m in range(4)]
                      for i in range(n)])
    assert np.all(match[:, :2].sum(1) == 1) and not match[:, 2:].any()
    assert match[:, 0].any() and match[:, 1].any()
    blend = np.asarray(model.sample(n, task="a", rng=key, mode="blend"))
    np.testing.assert_allclose(blend, 0.5 * alone[0] + 0.5 * alone[1], atol=1e-5)


@pytest.mark.parametrize("mode", ["mixture", "blend"])
def test_sample_of_n_is_a_sampler_of_exactly_n_rows(model, mode):
    """``sample`` draws ``sample_rows(n)`` rows (one compile for every n up to 256) and keeps
    the first n: they are the images a sampler of exactly n rows gives, for either task."""
    assert [baim_lib.sample_rows(n) for n in (1, 8, 256, 257, 300)] == [256, 256, 256, 512, 512]
    key = jax.random.key(4)
    for task in (0, 1):
        exact = baim_lib._sample(model, 7, jnp.int32(task), key, mode)
        chex.assert_trees_all_close(model.sample(7, task=task, rng=key, mode=mode), exact)
        chex.assert_trees_all_close(model.sample(300, task=task, rng=key, mode=mode)[:7], exact)
    edge = EdgeModel(mlp([16], 4, [16]), "a", seed=0)
    chex.assert_trees_all_close(edge.sample(7, rng=key), edge_model._sample(edge, 7, key))


@pytest.mark.parametrize("bad,match", [
    (dict(mode="average"), "mode"), (dict(n=0), "n: must be a positive integer"),
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
    (dict(combine="max"), "combine"), (dict(dispatch="ragged"), "dispatch"),
    (dict(capacity_factor=0.0), "capacity_factor"), (dict(noise_std=-1.0), "noise_std"),
    (dict(prior_momentum=1.0), "prior_momentum")])
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
    uploads = [L.init_learner(s, jax.random.key(n)) for n, s in enumerate(mlp_specs)]
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


def test_blend_equals_mixture_for_one_learner_and_bounds_it_for_more(mlp_specs, images):
    """K=1: the two combines coincide. K=2: -log(sum w p) <= sum w (-log p) per pixel (Jensen),
    so the blend's reconstruction term is at most the mixture's."""
    for k in (1, 2):
        mix = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=k, h=0))
        blend = BAIM.assemble(mlp_specs, SQUADS, TASKS, BAIMConfig(k=k, h=0, combine="blend"))
        a = mix.reconstruct(images, task="a")["nelbo"]
        b = blend.reconstruct(images, task="a")["nelbo"]
        if k == 1:
            chex.assert_trees_all_close(a, b, rtol=1e-4)
        else:
            assert np.all(np.asarray(b) <= np.asarray(a) + 1e-3)


def _saturate_output(model, value):
    """Sets every learner's output bias (image-shaped in every learner: no padding) to
    ``value``: logits far past float32's sigmoid range, or Gaussian means outside [0, 1], as
    a confident trained model may have."""
    bias = model.learners["dec"][-1]["bias"]
    bias[...] = jnp.full_like(bias[...], value)


@pytest.mark.parametrize("likelihood,bias", [("bernoulli", 30.0), ("bernoulli", -30.0),
                                             ("gaussian", 1.7), ("gaussian", -0.6)])
def test_blend_equals_mixture_for_one_learner_outside_the_easy_range(images, likelihood, bias):
    """K=1 makes the blend's weighted output the learner's own, so loss and gradient equal the
    mixture's. A saturated logit of +-30 costs 30 nats on a wrong pixel (a blend of clipped
    probabilities capped it at 13.8 with zero gradient); Gaussian means outside [0, 1] are
    scored unclipped (a clipped mean lowered the loss and stopped its gradient)."""
    specs = [mlp([8], 2, [8], likelihood)] * 2 + [mlp([6], 3, [6], likelihood)] * 2
    grads, nelbos = [], []
    for combine in ("mixture", "blend"):
        model = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=1, h=0, combine=combine))
        _saturate_output(model, bias)
        nelbos.append(model.reconstruct(images, task="a")["nelbo"])

        def loss(model):
            return jnp.mean(model.forward(images, jnp.zeros(len(images), jnp.int32))["nelbo"])

        grad = nnx.jit(nnx.grad(loss))(model).learners["dec"]
        grads.append(grad[len(grad) - 1]["bias"][...])
    chex.assert_trees_all_close(nelbos[0], nelbos[1], rtol=1e-5)
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(grads[1]).max()) > 0.01
    if likelihood == "bernoulli":
        wrong = np.asarray((images > 0.5) != (bias > 0)).reshape(len(images), -1).sum(1)
        assert np.all(np.asarray(nelbos[1]) >= 29.0 * wrong)


def test_gaussian_learners(images):
    specs = [mlp([8], 2, [8], "gaussian")] * 2 + [mlp([6], 3, [6], "gaussian")] * 2
    model = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=1, h=1))
    out = model.reconstruct(images, task="a")
    assert np.isfinite(np.asarray(out["nelbo"])).all()
    assert model.spec["learners"][0]["params"] == L.count_params(specs[0])
    assert L.count_params(specs[0]) == L.count_params(mlp([8], 2, [8])) + 1


def test_spec_is_json_and_counts_real_parameters(model):
    spec = json.loads(json.dumps(model.spec))
    assert spec["k"] == 2 and spec["h"] == 1 and spec["tasks"] == TASKS
    assert [m["params"] for m in spec["learners"]] == [
        L.count_params(m.spec) for m in model.layout.members]
    conn = spec["connections"]
    assert conn["potential"] == conn["kept"] == len(conn["list"]) > 0
    p = spec["params"]
    assert p["total"] == p["learners"] + p["gate"] + p["connections"]
    assert p["learners"] == sum(m["params"] for m in spec["learners"])
    assert spec["padding_waste"] >= 1.0
