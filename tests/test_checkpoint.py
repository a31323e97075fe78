"""Saving and loading BAIMs and task models (``baim_jax.checkpoint``).

Round trips must be exact (same outputs for the same rng, same spec); damaged or inconsistent
model directories must be refused with ``CheckpointError`` naming the problem.
"""

import json
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE, backend_compiles, conv, mlp
from reference import randomize_connections

import baim_jax
from baim_jax import BAIM, BAIMConfig, CheckpointError, TaskModel, checkpoint, partition
from baim_jax.core import learners

TASKS = ["a", "b"]
SQUADS = [0, 0, 1, 1]


def _specs(kind):
    # The same learners as conftest's mlp_specs / conv_specs fixtures (module-scoped here).
    if kind == "mlp":
        return [mlp([16], 4, [16]), mlp([12, 10], 3, [8]), mlp([6], 5, [6, 9, 7]),
                mlp([16], 4, [16])]
    return [conv([4, 6], 4, [4, 6]), conv([3, 5, 7], 3, [8, 5]), conv([6, 4], 5, [6, 9, 7]),
            conv([4, 6], 4, [5, 5])]


def _trained_like(kind) -> BAIM:
    """A BAIM with random connections, half of them pruned, and a non-uniform prior."""
    model = BAIM.assemble(_specs(kind), SQUADS, TASKS, BAIMConfig(k=2, h=1), seed=0)
    randomize_connections(model, 1)
    kept = model.prune_connections(0.5)
    assert 0 < kept < len(model.conns)
    model.prior[...] = jnp.asarray([0.7, -0.3, 0.2, 0.8], jnp.float32)
    return model


def _data_files(path: Path) -> set:
    """Relative paths of the (randomly named) data files under ``state/``."""
    return {f.relative_to(path) for f in (path / "state").rglob("*")
            if f.is_file() and f.parent.name == "d"}


def _files(path: Path) -> set:
    return {f.relative_to(path) for f in path.rglob("*") if f.is_file()}


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _x(n=6):
    return jax.random.uniform(jax.random.key(0), (n, *IMAGE))


def _assert_same_state(a: BAIM, b: BAIM):
    np.testing.assert_array_equal(a.kept_flat(), b.kept_flat())
    for got, want in zip(jax.tree.leaves(b.export_tree()), jax.tree.leaves(a.export_tree()),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _assert_same_outputs(a: BAIM, b: BAIM, tasks, sample_task):
    """Same reconstructions (same latent noise) and the same samples (same key)."""
    x = _x()
    for task in tasks:
        ra = a.reconstruct(x, task=task, rng=jax.random.key(7))
        rb = b.reconstruct(x, task=task, rng=jax.random.key(7))
        assert set(ra) == set(rb)
        for key in ra:
            np.testing.assert_array_equal(np.asarray(ra[key]), np.asarray(rb[key]), err_msg=key)
    np.testing.assert_array_equal(
        np.asarray(a.sample(5, task=sample_task, rng=jax.random.key(3))),
        np.asarray(b.sample(5, task=sample_task, rng=jax.random.key(3))))


def _save(kind, tmp_path_factory):
    model = _trained_like(kind)
    path = tmp_path_factory.mktemp(f"saved_{kind}") / "baim"
    baim_jax.save(model, path)
    return model, path


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    """(MLP BAIM, its saved directory)."""
    return _save("mlp", tmp_path_factory)


@pytest.fixture(scope="module")
def saved_conv(tmp_path_factory):
    """(conv BAIM, its saved directory)."""
    return _save("conv", tmp_path_factory)


@pytest.fixture(params=["mlp", "conv"])
def saved(request):
    return request.getfixturevalue(f"saved_{request.param}")


@pytest.fixture(scope="module")
def saved_task(saved_mlp, tmp_path_factory):
    model, _ = saved_mlp
    task_model = partition(model, "b")
    path = tmp_path_factory.mktemp("saved_task") / "task_b"
    baim_jax.save(task_model, path)
    return task_model, path


# ------------------------------------------------------------------------------ round trips


def test_round_trip_is_exact(saved):
    model, path = saved
    assert (path / "spec.json").is_file() and (path / "state").is_dir()
    loaded = baim_jax.load(path)
    assert type(loaded) is BAIM
    assert loaded.spec == model.spec
    assert loaded.tasks == model.tasks
    _assert_same_state(model, loaded)
    # A task name and per-example task ids (one compiled program for both).
    _assert_same_outputs(model, loaded, ["a", np.array([0, 1, 1, 0, 0, 1], np.int32)], "b")


def test_a_shared_latent_model_round_trips_with_its_design(tmp_path):
    """``latent = "shared"`` is part of the model: it is saved, and the loaded model
    computes the same shared-latent bound."""
    model = BAIM.assemble(_specs("mlp"), SQUADS, TASKS, BAIMConfig(k=2, h=1, latent="shared"))
    randomize_connections(model, 2)
    baim_jax.save(model, tmp_path / "shared")
    loaded = baim_jax.load(tmp_path / "shared")
    assert loaded.config.latent == "shared" and loaded.spec == model.spec
    x = jax.random.uniform(jax.random.key(0), (4, *model.layout.image_shape))
    key = jax.random.key(1)
    chex.assert_trees_all_close(loaded.bound(x, task="a", rng=key),
                                model.bound(x, task="a", rng=key), rtol=1e-6)


def test_load_accepts_str_path(saved_mlp):
    model, path = saved_mlp
    assert baim_jax.load(str(path)).spec == model.spec


def test_spec_is_json_serialisable(saved):
    model, _ = saved
    spec = json.loads(json.dumps(model.spec.to_json()))  # raises if anything is not JSON
    assert spec == json.loads(json.dumps(baim_jax.load(saved[1]).spec.to_json()))
    assert baim_jax.ModelSpec.from_json(spec) == model.spec
    for key in ("learners", "tasks", "k", "h", "connections", "params"):
        assert key in spec, key
    assert spec["tasks"] == TASKS and spec["k"] == 2 and spec["h"] == 1
    assert len(spec["learners"]) == 4
    assert [m["squad"] for m in spec["learners"]] == SQUADS
    conns = spec["connections"]
    assert isinstance(conns["potential"], int) and isinstance(conns["kept"], int)
    assert conns["potential"] == len(model.conns)
    assert conns["kept"] == int(np.ceil(0.5 * conns["potential"])) == int(model.kept_flat().sum())
    params = spec["params"]
    for key in ("total", "learners", "gate", "connections"):
        assert isinstance(params[key], int) and params[key] > 0, key
    assert params["total"] == params["learners"] + params["gate"] + params["connections"]
    assert params["learners"] == sum(m["params"] for m in spec["learners"])
    kind = spec["learners"][0]["spec"]["kind"]
    assert params["learners"] == sum(learners.count_params(s) for s in _specs(kind))


def test_task_model_round_trip(saved_task):
    task_model, path = saved_task
    loaded = baim_jax.load(path)
    assert isinstance(loaded, TaskModel)
    assert loaded.task == "b" and loaded.tasks == ("b",)
    assert loaded.spec == task_model.spec
    assert loaded.spec.kind == "task"
    _assert_same_state(task_model, loaded)
    _assert_same_outputs(task_model, loaded, ["b"], "b")


def test_task_model_checkpoint_is_smaller(saved_mlp, saved_task, tmp_path):
    (model, _), (task_model, _) = saved_mlp, saved_task
    assert task_model.spec.params.total < model.spec.params.total
    # On disk: orbax's files vary by +-15% between saves of the same model, more than the
    # tiny fixture's task model saves, so compare a BAIM whose other squad is big.
    specs = [mlp([8], 2, [8]), mlp([8], 2, [8]), mlp([96], 8, [96]), mlp([96], 8, [96])]
    big = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=2, h=1), seed=0)
    randomize_connections(big, 2)
    big.prune_connections(0.5)
    small = partition(big, "a")
    assert small.spec.params.total < 0.7 * big.spec.params.total
    baim_jax.save(big, tmp_path / "baim")
    baim_jax.save(small, tmp_path / "task_a")
    assert _bytes(tmp_path / "task_a") < _bytes(tmp_path / "baim")


def test_loading_compiles_nothing_per_parameter(tmp_path):
    """Loading moves every array to the device without XLA: a converting ``jnp.asarray``
    would compile one program per parameter shape (about 0.02 s each, and 47 programs when
    a case-study task model was loaded)."""
    model = BAIM.assemble(_specs("mlp"), SQUADS, TASKS, BAIMConfig(k=2, h=1))
    baim_jax.save(model, tmp_path / "baim")
    baim_jax.save(partition(model, "b"), tmp_path / "task")
    with backend_compiles() as compiles:
        for name in ("baim", "task"):
            jax.clear_caches()  # what assembling and saving compiled must not count
            compiles.clear()
            baim_jax.load(tmp_path / name)
            assert len(compiles) <= 3, (name, len(compiles))  # the nnx.Rngs seed's own few


def test_save_over_existing_model_replaces_it(saved_mlp, saved_task, tmp_path):
    model, _ = saved_mlp
    task_model, _ = saved_task
    path = tmp_path / "model"
    baim_jax.save(model, path)
    assert type(baim_jax.load(path)) is BAIM
    old_files = _data_files(path)
    assert old_files
    baim_jax.save(task_model, path)
    loaded = baim_jax.load(path)
    assert isinstance(loaded, TaskModel) and loaded.spec == task_model.spec
    assert json.loads((path / "spec.json").read_text())["kind"] == "task"
    # Nothing of the old model or of the temporary directories is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert not old_files & _files(path)
    # And back again.
    baim_jax.save(model, path)
    loaded = baim_jax.load(path)
    assert type(loaded) is BAIM and loaded.spec == model.spec
    _assert_same_state(model, loaded)


# ---------------------------------------------------------------------------------- refusals


def _edit_spec(path: Path, edit, redigest: bool = True):
    """Edits spec.json; with ``redigest``, records the edited spec's digest too (a
    consistent spec that no longer matches the state)."""
    spec = json.loads((path / "spec.json").read_text())
    edit(spec)
    if redigest:
        spec["spec_sha256"] = checkpoint._spec_digest(spec)
    (path / "spec.json").write_text(json.dumps(spec))


def _largest_state_file(path: Path) -> Path:
    files = [f for f in (path / "state").rglob("*") if f.is_file()]
    return max(files, key=lambda f: f.stat().st_size)


def _no_spec(path):
    (path / "spec.json").unlink()


def _spec_not_json(path):
    (path / "spec.json").write_text('{"format": "baim_jax", "version": 1,')


def _wrong_format(path):
    _edit_spec(path, lambda s: s.update(format="not_baim"))


def _wrong_version(path):
    _edit_spec(path, lambda s: s.update(version=99))


def _no_state(path):
    shutil.rmtree(path / "state")


def _truncated(path):
    # Cut to a few bytes: OCDBT data files can end in bytes no array refers to (cut in half,
    # the largest one here still restores bit-identical arrays), so half would prove nothing.
    f = _largest_state_file(path)
    f.write_bytes(f.read_bytes()[:16])


def _emptied(path):
    _largest_state_file(path).write_bytes(b"")


def _garbled(path):
    f = _largest_state_file(path)
    f.write_bytes(bytes(b ^ 0xFF for b in f.read_bytes()))


def _extra_file(path):
    (path / "state" / "stray").write_bytes(b"x")


def _linked_file(path):
    f = _largest_state_file(path)
    target = path.parent / "elsewhere"
    target.write_bytes(f.read_bytes())
    f.unlink()
    f.symlink_to(target)


def _learner_spec_edited(path):
    def edit(spec):
        spec["learners"][0]["spec"]["encoder"] = [17]
    _edit_spec(path, edit)


def _latent_edited(path):
    def edit(spec):
        spec["learners"][2]["spec"]["latent"] = 9
    _edit_spec(path, edit)


def _k_edited_by_hand(path):
    _edit_spec(path, lambda s: s.update(k=1), redigest=False)


def _learners_malformed_by_hand(path):
    _edit_spec(path, lambda s: s.update(learners="x"), redigest=False)


REFUSALS = {
    "K edited by hand": (_k_edited_by_hand, r"spec\.json: altered"),
    "learners malformed by hand": (_learners_malformed_by_hand, r"spec\.json: altered"),
    "no spec.json": (_no_spec, r"no spec\.json"),
    "spec.json not JSON": (_spec_not_json, r"spec\.json.*unreadable"),
    "wrong format": (_wrong_format, r"not a baim_jax spec"),
    "wrong version": (_wrong_version, r"version 99"),
    "state missing": (_no_state, r"'state' is missing"),
    "truncated state file": (_truncated, r"state/.*damaged"),
    "empty state file": (_emptied, r"state/.*damaged"),
    "garbled state file": (_garbled, r"state/.*damaged"),
    "extra state file": (_extra_file, r"state/stray: not part of the model"),
    "linked state file": (_linked_file, r"state/.*symbolic link"),
    "learner spec edited": (_learner_spec_edited, r"shape"),
    "latent edited": (_latent_edited, r"shape"),
}


@pytest.mark.parametrize("damage", list(REFUSALS), ids=list(REFUSALS))
def test_load_refuses_damaged_directory(damage, saved_mlp, tmp_path):
    _, path = saved_mlp
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    corrupt, message = REFUSALS[damage]
    corrupt(broken)
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(CheckpointError, match=message):
        baim_jax.load(broken)
    # The good copy still loads: the refusal was about the damage, not the model.
    assert type(baim_jax.load(path)) is BAIM


def test_load_refuses_a_directory_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="no spec.json"):
        baim_jax.load(tmp_path / "nothing_here")


def test_load_refuses_learners_entry_that_contradicts_the_arrays(saved_mlp, tmp_path):
    _, path = saved_mlp
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    _edit_spec(broken, lambda s: s["learners"][0]["spec"].update(encoder=[17]))
    with pytest.raises(CheckpointError, match="learner"):
        baim_jax.load(broken)


def test_load_refuses_a_state_file_with_a_flipped_bit(saved_mlp, tmp_path):
    _, path = saved_mlp
    size = _largest_state_file(path).stat().st_size
    # A few positions in the first half of the largest data file (its referenced data);
    # each must be refused.
    for i, pos in enumerate([size // 8, size // 5, size // 4, size // 3]):
        broken = tmp_path / f"broken{i}"
        shutil.copytree(path, broken)
        f = _largest_state_file(broken)
        data = bytearray(f.read_bytes())
        data[pos] ^= 0x01
        f.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            baim_jax.load(broken)


def _nan_params(specs, bad: int):
    params = [learners.init_learner(s, jax.random.key(n)) for n, s in enumerate(specs)]
    kernel = np.array(params[bad]["enc"][0]["kernel"], np.float32)
    kernel.flat[0] = np.nan
    params[bad]["enc"][0]["kernel"] = kernel
    return params


def test_assemble_refuses_nan_params():
    specs = _specs("mlp")
    with pytest.raises(ValueError, match=r"learner 2\b.*non-finite"):
        BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=2, h=1), params=_nan_params(specs, 2))


def test_load_refuses_saved_nan_params(tmp_path):
    specs = _specs("mlp")
    params = [learners.init_learner(s, jax.random.key(n)) for n, s in enumerate(specs)]
    model = BAIM.assemble(specs, SQUADS, TASKS, BAIMConfig(k=2, h=1), params=params)
    # Poison learner 1's first encoder kernel after assembly, as a diverged run would.
    var = model.learners["enc"][0]["kernel"]
    var[...] = var[...].at[1].set(jnp.nan)
    path = tmp_path / "nan"
    baim_jax.save(model, path)
    with pytest.raises(CheckpointError, match=r"learner 1\b.*non-finite"):
        baim_jax.load(path)
