"""The service (docs/design.md §1, step 7): store, toolbox, request lifecycle, integrity.

A tiny BAIM of three tasks (8x8 images) is partitioned, and its toolkit and router are published
to a store once per module; each test works on its own copy of that store.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from conftest import mlp

import baim_jax
from baim_jax import BAIM, BAIMConfig, checkpoint, files, partition
from baim_jax.core.router import TaskRouter
from baim_jax.service import integrity
from baim_jax.service.edge import Edge, Request
from baim_jax.service.store import ROUTER, ModelStore, StoreError
from baim_jax.service.toolbox import Toolbox, ToolboxError, parse_bytes

TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A store holding three task models and the router, and the BAIM they came from."""
    root = tmp_path_factory.mktemp("published")
    specs = [mlp([16], 4, [16]), mlp([12], 3, [8]), mlp([10], 2, [10]), mlp([14], 4, [12]),
             mlp([8], 3, [8]), mlp([16], 2, [12])]
    baim = BAIM.assemble(specs, [0, 0, 1, 1, 2, 2], TASKS, BAIMConfig(k=1, h=1), seed=3)
    # Non-zero connections and gates, so that task models differ from their learners alone.
    rng = np.random.default_rng(0)
    for var in baim.connections:
        var[...] = 0.1 * rng.standard_normal(var[...].shape).astype(np.float32)
    baim.gate["ts"]["kernel"][...] = 10 * rng.standard_normal(
        baim.gate["ts"]["kernel"][...].shape).astype(np.float32)
    sources = {}
    for t in TASKS:
        sources[t] = root / "toolkit" / t
        baim_jax.save(partition(baim, t), sources[t])
    sources[ROUTER] = root / "router"
    baim_jax.save(TaskRouter.from_baim(baim), sources[ROUTER])
    ModelStore(root / "store", create=True).publish(sources)
    return {"store": root / "store", "sources": sources, "baim": baim}


@pytest.fixture
def store(published, tmp_path):
    shutil.copytree(published["store"], tmp_path / "store")
    return ModelStore(tmp_path / "store")


def model_bytes(store, task):
    return store.entry(task)["bytes"]


# ------------------------------------------------------------------------------ lifecycle


def test_miss_download_then_hit(store, tmp_path):
    edge = Edge(store, Toolbox(tmp_path / "toolbox"))
    first = edge.serve(Request(task="a", num=4))
    assert first.sources == {"a": "store"}
    assert first.bytes_downloaded == model_bytes(store, "a")
    second = edge.serve(Request(task="a", num=4))
    assert second.sources == {"a": "toolbox"} and second.bytes_downloaded == 0
    chex.assert_shape(second.images, (4, 8, 8, 1))
    # A second edge process on the same toolbox finds the model there too.
    third = Edge(store, Toolbox(tmp_path / "toolbox")).serve(Request(task="a", num=4))
    assert third.sources == {"a": "toolbox"}
    chex.assert_trees_all_close(first.images, second.images, third.images)


@pytest.mark.parametrize("sensitive", [False, True])
def test_a_download_hashes_each_file_once(sensitive, store, tmp_path, monkeypatch):
    # A miss checks every file as it is copied (a sensitive request, as it is opened in the
    # store); loading the model then trusts that check instead of hashing it all again.
    hashed = []
    sha256 = files.sha256
    monkeypatch.setattr(files, "sha256", lambda path: hashed.append(path) or sha256(path))
    got = Edge(store, Toolbox(tmp_path / "toolbox")).serve(
        Request(task="a", num=1, sensitive=sensitive))
    assert got.sources == {"a": "store, sensitive" if sensitive else "store"}
    assert len(hashed) == len(store.entry("a")["files"]) == len(set(hashed))


def test_a_hit_needs_nothing_from_the_store(store, tmp_path):
    """Paper step 7: an edge that holds the model serves it; only a miss goes to the cloud.
    The store is moved away after the first requests: hits (by task, and by images through
    the cached router) still serve; a miss fails: the store is not there."""
    edge = Edge(store, Toolbox(tmp_path / "toolbox"))
    x = np.asarray(jax.random.uniform(jax.random.key(2), (4, 8, 8, 1)))
    first = edge.serve(Request(images=x, num=1))
    edge.serve(Request(task="a", num=2))
    cached = set(Toolbox(tmp_path / "toolbox").contents())
    assert {ROUTER, "a"} <= cached
    store.root.rename(tmp_path / "elsewhere")
    again = Edge(store, Toolbox(tmp_path / "toolbox"))  # a new process: nothing in memory
    got = again.serve(Request(task="a", num=2))
    assert got.sources == {"a": "toolbox"}
    routed = again.serve(Request(images=x, num=1))
    assert set(routed.sources.values()) == {"toolbox"}
    chex.assert_trees_all_close(routed.images, first.images)
    missing = next(t for t in TASKS if t not in cached)
    with pytest.raises(files.IntegrityError, match="not a model store"):
        again.serve(Request(task=missing, num=2))


def test_served_samples_and_variations_are_the_task_models(store, published, tmp_path):
    edge = Edge(store, Toolbox(tmp_path / "toolbox"))
    model = checkpoint.load(published["sources"]["b"])
    got = edge.serve(Request(task="b", num=5, seed=7))
    chex.assert_trees_all_close(got.images,
                                np.asarray(model.sample(5, task="b", rng=jax.random.key(7))))
    x = np.asarray(jax.random.uniform(jax.random.key(1), (3, 8, 8, 1)))
    got = edge.serve(Request(task="b", images=x, num=2, seed=7))
    chex.assert_shape(got.images, (3, 4, 8, 8, 1))
    chex.assert_trees_all_close(got.images[:, 0], x)
    chex.assert_trees_all_close(got.images[:, 1], model.reconstruct(x, task="b")["mean"])
    keys = jax.random.split(jax.random.key(7), 2)
    chex.assert_trees_all_close(
        got.images[:, 3], model.reconstruct(x, task="b", rng=keys[1])["mean"])


def test_router_routes_like_the_baims_tsgate(store, published, tmp_path):
    # Each image lights one 2x2 block, so that their features (and tasks) differ.
    x = np.zeros((16, 8, 8, 1), np.float32)
    for i in range(16):
        r, c = divmod(i, 4)
        x[i, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 1.0
    expected = np.asarray(published["baim"].reconstruct(x)["task"])
    assert len(set(expected.tolist())) > 1  # the images really go to different tasks
    edge = Edge(store, Toolbox(tmp_path / "toolbox"))
    got = edge.serve(Request(images=x, num=1))
    assert got.tasks == [TASKS[t] for t in expected]
    assert set(got.sources) == {ROUTER} | {TASKS[t] for t in expected}
    for t in set(expected.tolist()):
        rows = np.flatnonzero(expected == t)
        model = checkpoint.load(published["sources"][TASKS[t]])
        chex.assert_trees_all_close(got.images[rows, 1],
                                    model.reconstruct(x[rows], task=TASKS[t])["mean"])


def test_least_recently_used_is_evicted(store, tmp_path):
    # Room for the two largest task models, not three: a, b, then a again (a is now the most
    # recent), then c must evict b, the least recently used, and keep a.
    sizes = sorted(model_bytes(store, t) for t in TASKS)
    toolbox = Toolbox(tmp_path / "toolbox", capacity=sizes[-1] + sizes[-2])
    edge = Edge(store, toolbox)
    for task in ("a", "b", "a"):
        edge.serve(Request(task=task, num=1))
    got = edge.serve(Request(task="c", num=1))
    assert got.sources == {"c": "store"}
    assert set(toolbox.contents()) == {"a", "c"}
    assert toolbox.used() <= toolbox.capacity
    assert not (toolbox.root / "models" / "b").exists()
    assert edge.serve(Request(task="a", num=1)).sources == {"a": "toolbox"}
    assert edge.serve(Request(task="b", num=1)).sources == {"b": "store"}


def test_sensitive_request_leaves_nothing_at_the_edge(store, tmp_path):
    toolbox = Toolbox(tmp_path / "toolbox")
    edge = Edge(store, toolbox)
    got = edge.serve(Request(task="a", num=2, sensitive=True))
    assert got.sources == {"a": "store, sensitive"}
    assert got.bytes_downloaded == model_bytes(store, "a")
    assert toolbox.contents() == {}
    assert not (toolbox.root / "models" / "a").exists()
    assert edge.serve(Request(task="a", num=2)).sources == {"a": "store"}


def test_model_larger_than_the_toolbox_is_served_uncached(store, tmp_path):
    toolbox = Toolbox(tmp_path / "toolbox", capacity=1000)
    got = Edge(store, toolbox).serve(Request(task="a", num=2))
    assert got.sources == {"a": "store, larger than the toolbox"}
    assert toolbox.contents() == {}


def test_damaged_cached_copy_is_fetched_again(store, tmp_path):
    toolbox = Toolbox(tmp_path / "toolbox")
    first = Edge(store, toolbox).serve(Request(task="a", num=3))
    target = next(p for p in sorted((toolbox.root / "models" / "a" / "state").rglob("*"))
                  if p.is_file() and p.stat().st_size > 100)
    data = bytearray(target.read_bytes())
    data[50] ^= 0xFF
    target.write_bytes(bytes(data))
    got = Edge(store, toolbox).serve(Request(task="a", num=3))  # a fresh process's view
    assert got.sources == {"a": "store"}
    assert "cached copy dropped" in got.notes[0] and "damaged" in got.notes[0]
    chex.assert_trees_all_close(got.images, first.images)


def test_new_revision_replaces_the_cached_one(store, published, tmp_path):
    toolbox = Toolbox(tmp_path / "toolbox")
    edge = Edge(store, toolbox)
    edge.serve(Request(task="a", num=1))
    store.publish({"a": published["sources"]["a"]})
    assert store.entry("a")["revision"] == 2
    assert edge.serve(Request(task="a", num=1)).sources == {"a": "toolbox"}  # stays local
    Toolbox(tmp_path / "toolbox2")  # a toolbox made after the update gets revision 2
    fresh = Edge(store, Toolbox(tmp_path / "toolbox2"))
    fresh.serve(Request(task="a", num=1))
    assert Toolbox(tmp_path / "toolbox2").contents()["a"]["revision"] == 2


def test_router_round_trip_and_spec(published, tmp_path):
    router = TaskRouter.from_baim(published["baim"])
    baim_jax.save(router, tmp_path / "router")
    again = checkpoint.load(tmp_path / "router")
    x = np.asarray(jax.random.uniform(jax.random.key(5), (4, 8, 8, 1)))
    chex.assert_trees_all_close(again.route(x)["probs"], router.route(x)["probs"])
    chex.assert_shape(again.route(x)["probs"], (4, 3))
    spec = again.spec
    assert spec.kind == "router" and list(spec.tasks) == TASKS
    # phi: 8*8*1*F + F; ts: F*3 + 3.
    f = spec.feature_dim
    assert spec.params.total == 64 * f + f + 3 * f + 3
    with pytest.raises(ValueError, match="does not fit"):
        again.route(np.zeros((2, 9, 9, 1), np.float32))


def test_router_refuses_gate_of_another_shape(published):
    gate = TaskRouter.from_baim(published["baim"]).export_tree()["gate"]
    with pytest.raises(ValueError, match="do not fit 2 tasks"):
        TaskRouter(["a", "b"], gate)


# ---------------------------------------------------------------------- damaged checkpoints


def _state_file(store, task):
    return next(p for p in sorted((store.path(task) / "state").rglob("*"))
                if p.is_file() and p.stat().st_size > 100)


def _truncate(store):
    f = _state_file(store, "a")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(store):
    f = _state_file(store, "a")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _remove(store):
    _state_file(store, "a").unlink()


def _other_manifest(store):
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["models"]["a"] = {**manifest["models"]["b"], "dir": manifest["models"]["a"]["dir"]}
    (store.root / "manifest.json").write_text(json.dumps(manifest))


def _other_model(store):
    # Model b's directory and manifest entry under a's name: every digest matches, the spec
    # does not name task a.
    a = store.path("a")
    shutil.rmtree(a)
    shutil.copytree(store.path("b"), a)
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["models"]["a"] = {**manifest["models"]["b"], "dir": manifest["models"]["a"]["dir"]}
    (store.root / "manifest.json").write_text(json.dumps(manifest))


def _extra_file(store):
    (store.path("a") / "state" / "extra.bin").write_bytes(b"\0" * 64)


def _future_spec(store):
    spec_path = store.path("a") / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["version"] = 3
    spec_path.write_text(json.dumps(spec))
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["models"]["a"]["files"]["spec.json"] = files.sha256(spec_path)
    (store.root / "manifest.json").write_text(json.dumps(manifest))


def _future_store(store):
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["version"] = 3
    (store.root / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {"truncated file": (_truncate, "damaged"), "flipped byte": (_flip, "damaged"),
          "missing file": (_remove, "missing"), "manifest of another model":
              (_other_manifest, "damaged"), "another model's files": (_other_model, "not the"),
          "file not in the manifest": (_extra_file, "not part of"),
          "checkpoint of a newer version": (_future_spec, "format version 3"),
          "store of a newer version": (_future_store, "version 3")}


@pytest.mark.parametrize("case", list(DAMAGE), ids=list(DAMAGE))
@pytest.mark.parametrize("sensitive", [False, True], ids=["toolbox", "sensitive"])
def test_damaged_model_is_refused_and_never_cached(case, sensitive, store, tmp_path):
    damage, words = DAMAGE[case]
    damage(store)
    toolbox = Toolbox(tmp_path / "toolbox")
    with pytest.raises(ValueError, match=words) as err:
        Edge(ModelStore(store.root), toolbox).serve(Request(task="a", num=2,
                                                            sensitive=sensitive))
    assert "\n" not in str(err.value)
    assert toolbox.contents() == {}
    assert not (toolbox.root / "models" / "a").exists()
    assert not any((toolbox.root / ".incoming").glob("*"))


def test_publish_refuses_a_damaged_source_and_keeps_the_store(store, published, tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(published["sources"]["a"], src)
    f = next(p for p in sorted((src / "state").rglob("*")) if p.is_file()
             and p.stat().st_size > 100)
    f.write_bytes(f.read_bytes()[:10])
    before = (store.root / "manifest.json").read_text()
    with pytest.raises(StoreError, match="publish a: .*damaged"):
        store.publish({"b": published["sources"]["b"], "a": src})
    assert (store.root / "manifest.json").read_text() == before
    with pytest.raises(StoreError, match="not the task model of 'b'"):
        store.publish({"b": published["sources"]["a"]})
    Edge(store, Toolbox(tmp_path / "toolbox")).serve(Request(task="a", num=1))


def _files_of(store):
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")
                  if p.is_file() and ".lock" not in p.name)


def test_a_new_revision_gets_its_own_directory_and_the_old_one_goes(store, published):
    store.publish({"a": published["sources"]["a"], ROUTER: published["sources"][ROUTER]})
    assert store.entry("a")["dir"] == "models/a@2" and store.path("a").name == "a@2"
    assert store.entry(ROUTER)["dir"] == "router@2"
    assert sorted(p.name for p in (store.root / "models").iterdir()) == ["a@2", "b@1", "c@1"]
    assert not (store.root / "router@1").exists()
    files.verify(store.path("a"), store.entry("a")["files"])


def test_a_publish_flushes_every_file_before_the_manifest_names_it(store, published,
                                                                  monkeypatch):
    synced, sync = [], files.sync

    def recorded(path):
        synced.append(Path(path))
        sync(path)

    monkeypatch.setattr(files, "sync", recorded)
    write_json = files.write_json
    monkeypatch.setattr(files, "write_json", lambda path, obj: (synced.append("manifest"),
                                                            write_json(path, obj)))
    store.publish({"a": published["sources"]["a"]})
    before = [str(p) for p in synced[:synced.index("manifest")]]
    for rel in store.entry("a")["files"]:  # each file of the copy, in .incoming/
        assert any(p.endswith(f"/model/{rel}") for p in before), rel
    assert str(store.root / "models") in before  # the rename into place


@pytest.mark.parametrize("killed", ["before the manifest", "before the sweep"])
def test_a_killed_publish_leaves_a_servable_store(killed, store, published, tmp_path,
                                                 monkeypatch):
    """A publish killed after its new directory is in place (before or after the manifest
    names it) leaves every manifest entry naming a whole directory; the next publish clears
    what it left."""
    def killed_here(*args, **kwargs):
        raise KeyboardInterrupt

    if killed == "before the manifest":
        monkeypatch.setattr(files, "write_json", killed_here)
    else:
        monkeypatch.setattr(ModelStore, "_sweep", killed_here)
    with pytest.raises(KeyboardInterrupt):
        store.publish({"a": published["sources"]["a"]})
    monkeypatch.undo()
    store = ModelStore(store.root)  # a fresh process's view
    revision = 1 if killed == "before the manifest" else 2
    assert store.entry("a")["revision"] == revision
    for key in TASKS + [ROUTER]:
        files.verify(store.path(key), store.entry(key)["files"])
    assert sorted(p.name for p in (store.root / "models").iterdir())[:2] == ["a@1", "a@2"]
    Edge(store, Toolbox(tmp_path / "toolbox")).serve(Request(task="a", num=1))
    store.publish({"a": published["sources"]["a"]})  # over what the killed one left
    assert sorted(p.name for p in (store.root / "models").iterdir()) == [
        f"a@{revision + 1}", "b@1", "c@1"]
    files.verify(store.path("a"), store.entry("a")["files"])


def test_a_version_1_store_is_read_and_upgraded_by_a_publish(store, published, tmp_path):
    # Version 1 kept each model at models/<task>/ and the router at router/.
    manifest = json.loads((store.root / "manifest.json").read_text())
    for key, entry in manifest["models"].items():
        old = "router" if key == ROUTER else f"models/{key}"
        os.rename(store.root / entry["dir"], store.root / old)
        entry["dir"] = old
    (store.root / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    store = ModelStore(store.root)
    assert store.path("b") == store.root / "models" / "b"
    Edge(store, Toolbox(tmp_path / "toolbox")).serve(Request(task="b", num=1))
    store.publish({"a": published["sources"]["a"]})
    assert json.loads((store.root / "manifest.json").read_text())["version"] == 2
    assert sorted(p.name for p in (store.root / "models").iterdir()) == ["a@2", "b", "c"]
    Edge(store, Toolbox(tmp_path / "toolbox2")).serve(Request(task="b", num=1))


@pytest.mark.parametrize("where", ["models/b@1", "models/a@2", "../outside", "models", ["x"],
                                   5, None])
def test_a_manifest_entry_naming_another_directory_is_refused(where, store, published,
                                                              tmp_path):
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["models"]["a"]["dir"] = where
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="entry of 'a' is malformed \\(dir .*not the directory"):
        Edge(store, Toolbox(tmp_path / "toolbox")).serve(Request(task="b", num=1))
    with pytest.raises(StoreError, match="entry of 'a' is malformed"):
        store.publish({"b": published["sources"]["b"]})
    assert {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()} == before


READ_ONLY = """
import sys
from pathlib import Path
from baim_jax.service.store import ModelStore
store = ModelStore(sys.argv[1])
entry, model = store.load("a")
store.fetch("b", Path(sys.argv[2]))
print(sorted(store.tasks()), entry["revision"])
"""


@pytest.mark.parametrize("lock", ["kept", "missing"])
def test_a_read_only_store_can_be_read(lock, store, tmp_path):
    """Readers write nothing to a store: they read one on a read-only file system (a bind
    mount in a user namespace; skipped where the machine allows none)."""
    if lock == "missing":
        (store.root / ".lock").unlink()
    before = _files_of(store)
    mount = f'mount --bind -o ro "{store.root}" "{store.root}"'
    if subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && ! touch {store.root}/x"],
                      capture_output=True).returncode != 0:
        pytest.skip("no read-only bind mount here (unshare -rm)")
    command = f'{mount} && exec "$0" -c "$1" "$2" "$3"'
    got = subprocess.run(["unshare", "-rm", "sh", "-c", command, sys.executable, READ_ONLY,
                          str(store.root), str(tmp_path / "fetched")],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.split("\n")[-2] == "['a', 'b', 'c'] 1"
    files.verify(tmp_path / "fetched", store.entry("b")["files"])
    assert _files_of(store) == before


@pytest.mark.parametrize("link", ["the directory", "a file"])
def test_a_refused_publish_makes_no_store(link, published, tmp_path):
    src = tmp_path / "linked"
    if link == "the directory":  # a toolkit directory that links to the model
        os.symlink(published["sources"]["a"], src)
    else:
        shutil.copytree(published["sources"]["a"], src)
        f = next(p for p in sorted((src / "state").rglob("*")) if p.is_file())
        shutil.move(f, tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", f)
    store = ModelStore(tmp_path / "new", create=True)
    with pytest.raises(ValueError, match="symbolic link"):
        store.publish({"a": src})
    assert not (tmp_path / "new").exists()


def test_a_first_publish_that_fails_midway_makes_no_store(published, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "copy_verified", full_disk)
    with pytest.raises(OSError, match="No space"):
        ModelStore(tmp_path / "new", create=True).publish({"a": published["sources"]["a"]})
    assert not (tmp_path / "new").exists()


def test_what_a_killed_first_publish_left_is_an_empty_store(published, tmp_path):
    root = tmp_path / "new"
    root.mkdir()
    _killed_download(root)  # leaves .lock and .incoming/ with a dead download in it
    store = ModelStore(root, create=True)
    store.publish({"a": published["sources"]["a"]})
    assert store.tasks() == ["a"] and not any((root / ".incoming").iterdir())


@pytest.mark.parametrize("revision", ["x", [1], None, 0])
def test_publish_over_a_malformed_entry_changes_nothing(store, published, tmp_path, revision):
    """A manifest entry whose revision cannot be counted on is refused before any model
    directory is replaced: the published model stays whole and servable."""
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["models"]["a"]["revision"] = revision
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="manifest entry of 'a' is malformed"):
        store.publish({"a": published["sources"]["a"]})
    assert {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("field,value", [("bytes", "x"), ("image_shape", None),
                                         ("files", None), ("params", -1)])
def test_a_damaged_manifest_entry_is_one_error(store, tmp_path, field, value):
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["models"]["a"][field] = value
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=f"manifest entry of 'a' is malformed \\({field}"):
        Edge(store, Toolbox(tmp_path / "toolbox")).serve(Request(task="b", num=1))


@pytest.mark.parametrize("field,value", [("capacity", "abc"), ("clock", "x"), ("entries", []),
                                         ("entry", "x"), ("bytes", "x"), ("image_shape", "x")])
def test_a_damaged_toolbox_index_is_one_error(store, tmp_path, field, value):
    box = tmp_path / "toolbox"
    Edge(store, Toolbox(box)).serve(Request(task="a", num=1))
    index = json.loads((box / "toolbox.json").read_text())
    if field == "entry":
        index["entries"]["a"] = value
    elif field in ("bytes", "image_shape"):
        index["entries"]["a"][field] = value
    else:
        index[field] = value
    (box / "toolbox.json").write_text(json.dumps(index))
    with pytest.raises(ToolboxError, match="toolbox.json is damaged"):
        Edge(store, Toolbox(box)).serve(Request(task="a", num=1))


# ---------------------------------------------------------------------------- path safety

BAD_NAMES = ["../a", "/etc/passwd", "a/b", "..", ".", ".hidden", "", "a\x00", "a" * 65,
             "a b", "a..b"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_unsafe_task_names_are_refused(name, store, published, tmp_path):
    with pytest.raises(ValueError, match="not a safe task name"):
        Edge(store, Toolbox(tmp_path / "toolbox")).serve(Request(task=name, num=1))
    with pytest.raises(ValueError, match="not a safe task name"):
        store.publish({name: published["sources"]["a"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "toolbox"]
    assert sorted(p.name for p in (store.root / "models").iterdir()) == [f"{t}@1" for t in TASKS]


def test_symlink_escapes_are_refused(store, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(store.path("a"), outside)
    shutil.rmtree(store.path("a"))
    os.symlink(outside, store.root / "models" / "a@1")
    with pytest.raises(ValueError, match="outside"):
        Edge(store, Toolbox(tmp_path / "toolbox")).serve(Request(task="a", num=1))
    # A link inside a model directory is refused too.
    state = store.path("b") / "state"
    f = next(p for p in sorted(state.rglob("*")) if p.is_file())
    shutil.copy(f, tmp_path / "stolen")
    f.unlink()
    os.symlink(tmp_path / "stolen", f)
    with pytest.raises(ValueError, match="symbolic link"):
        Edge(store, Toolbox(tmp_path / "toolbox")).serve(Request(task="b", num=1))
    assert Toolbox(tmp_path / "toolbox").contents() == {}


# ----------------------------------------------------------------------------- concurrency

WRITER = """
import sys, time
from pathlib import Path
from baim_jax import files
from baim_jax.service.store import ModelStore
from baim_jax.service.toolbox import Toolbox
store, toolbox = ModelStore(sys.argv[1]), Toolbox(sys.argv[2])
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
for i in range(int(sys.argv[4])):
    task = "abc"[(i + int(sys.argv[5])) % 3]
    with toolbox.checkout(task, store) as got:
        files.verify(got.path, store.entry(task)["files"])
print("ok")
"""


def test_concurrent_writers_never_leave_a_broken_model(store, tmp_path):
    # Room for two of the three models: every fill evicts, and both processes fill at once.
    sizes = sorted(model_bytes(store, t) for t in TASKS)
    Toolbox(tmp_path / "toolbox", capacity=sizes[-1] + sizes[-2])
    go = tmp_path / "go"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.root),
                               str(tmp_path / "toolbox"), str(go), "150", str(offset)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for offset in (0, 1)]
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    toolbox = Toolbox(tmp_path / "toolbox")
    contents = toolbox.contents()
    assert 1 <= len(contents) <= 2 and toolbox.used() <= toolbox.capacity
    for task in contents:
        files.verify(toolbox.root / "models" / task, store.entry(task)["files"])
    assert sorted(p.name for p in (toolbox.root / "models").iterdir()) == sorted(contents)
    assert not any((toolbox.root / ".incoming").iterdir())


HOLDER = """
import sys, time
from pathlib import Path
from baim_jax.service import integrity
with integrity.incoming(Path(sys.argv[1]), ".fetch-") as tmp:
    (tmp / "model").mkdir()
    (tmp / "model" / "half").write_bytes(b"x" * 1000)
    print("in", flush=True)
    time.sleep(600)
"""


def _killed_download(root):
    """What a process killed in the middle of a download leaves in ``root/.incoming``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "in"
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("where", ["toolbox", "store"])
def test_what_killed_processes_leave_in_incoming_is_swept(where, store, tmp_path):
    root = tmp_path / "toolbox" if where == "toolbox" else store.root
    root.mkdir(exist_ok=True)
    _killed_download(root)
    (root / ".incoming" / ".fetch-older").mkdir()  # no lock at all: left by an older baim_jax
    left = sorted(p.name for p in (root / ".incoming").iterdir())
    assert len(left) == 3  # the killed one's directory and its lock, and the older one
    with integrity.incoming(root, ".fetch-") as alive:  # a download still going on is kept
        if where == "toolbox":
            Toolbox(root)
        else:
            store.publish({"a": published_source(store, tmp_path)})
        assert sorted((root / ".incoming").iterdir()) == [alive, Path(f"{alive}.lock")]
    assert not any((root / ".incoming").iterdir())


def published_source(store, tmp_path):
    """A copy of the store's model ``a`` to publish again."""
    shutil.copytree(store.path("a"), tmp_path / "again")
    return tmp_path / "again"


# ------------------------------------------------------------------------------ requests


@pytest.mark.parametrize("request_kwargs, words", [
    ({}, "name a task or give images"),
    ({"task": "zzz"}, "'zzz' is not in the store"),
    ({"task": ROUTER}, "not a safe task name"),
    ({"task": "a", "num": 0}, "num"),
    ({"task": "a", "num": True}, "num"),
    ({"task": "a", "images": np.zeros((2, 9, 9, 1), np.float32)}, "does not fit"),
    ({"task": "a", "images": np.full((2, 8, 8, 1), 2.0, np.float32)}, r"\[0, 1\]"),
    ({"task": "a", "images": np.full((2, 8, 8, 1), np.nan, np.float32)}, "finite"),
    ({"task": "a", "images": np.zeros((8, 8, 1), np.float32)}, "H, W, C"),
    ({"task": "a", "images": np.zeros((1000, 8, 8, 1), np.float32), "num": 64},
     "66000 images, more than one response holds"),
], ids=["nothing", "unknown task", "the router's key", "num zero", "num bool", "wrong shape",
        "out of range", "nan", "three axes", "too many images"])
def test_bad_requests_are_refused_before_any_download(request_kwargs, words, store, tmp_path):
    toolbox = Toolbox(tmp_path / "toolbox")
    with pytest.raises(ValueError, match=words):
        Edge(store, toolbox).serve(Request(**request_kwargs))
    assert toolbox.contents() == {}


def test_a_request_may_fill_one_response_exactly():
    # 1024 images, each with its reconstruction and 62 variations: 1024 * 64 = 65536 images.
    images = np.zeros((1024, 8, 8, 1), np.float32)
    Request(task="a", images=images, num=62).validate()
    with pytest.raises(ValueError, match="65537|more than one response"):
        Request(task="a", images=np.zeros((1025, 8, 8, 1), np.float32), num=62).validate()


def test_store_without_router_needs_a_task(published, tmp_path):
    store = ModelStore(tmp_path / "store", create=True)
    assert not store.root.exists()  # made by the first publish, not before
    store.publish({"a": published["sources"]["a"]})
    with pytest.raises(StoreError, match="no router"):
        Edge(store).serve(Request(images=np.zeros((1, 8, 8, 1), np.float32)))
    assert Edge(store).serve(Request(task="a", num=1)).sources == {"a": "store, no toolbox"}


@pytest.mark.parametrize("text, expected", [("200000", 200000), ("64MB", 64 * 10**6),
                                            ("1.5GiB", int(1.5 * 2**30)), ("10kb", 10**4)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "-5MB", "0", "ten", "5XB", "nan"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="capacity"):
        parse_bytes(text)


def test_toolbox_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no toolbox"):
        Toolbox(tmp_path / "box")
    assert [p.name for p in (tmp_path / "box").iterdir()] == ["notes.txt"]  # no lock left


def test_store_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x").write_text("x")
    with pytest.raises(StoreError, match="not a model store"):
        ModelStore(tmp_path / "s", create=True)
    with pytest.raises(StoreError, match="not a model store"):
        ModelStore(tmp_path / "missing")
