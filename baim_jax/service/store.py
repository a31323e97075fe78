"""The cloud's model store (paper Sec. III, step 7): published task models and the TSGate
router, with a manifest that records each model's summary and the SHA-256 of every file.

Layout::

    STORE/manifest.json          {"format", "version", "models": {task: entry, "_router": entry}}
    STORE/models/<task>@<rev>/   revision <rev> of a task model (spec.json, state/)
    STORE/router@<rev>/          the TaskRouter

Each entry names its directory (version 1 stores kept one undated ``models/<task>/`` and
``router/``, read as they are). A model is copied into ``.incoming/`` and renamed to a new
revision's directory under an exclusive lock; the manifest is then rewritten atomically, and
only after that are the directories it no longer names removed. A publish killed at any
point leaves the manifest naming complete directories (the next publish sweeps what it left),
and every file is flushed to disk before the manifest that names it.
Readers hold a shared lock. Nothing is read back unless every file matches the manifest and
its spec is the model the manifest names.
"""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

from baim_jax import checkpoint, files
from baim_jax.core.spec import ModelSpec
from baim_jax.names import check_task_name
from baim_jax.service import integrity
from baim_jax.service.integrity import ROUTER

FORMAT, VERSION = "baim_jax-store", 2
READABLE_VERSIONS = (1, 2)  # version 1: one directory per key, without the revision


class StoreError(ValueError):
    """A store, or a request to it, that cannot be served."""


def _summary(spec: ModelSpec) -> dict:
    """What the manifest says about a model besides its files."""
    out = {"kind": spec.kind, "tasks": list(spec.tasks), "image_shape": list(spec.image_shape),
           "params": spec.params.total}
    if spec.kind == "router":
        return out
    return {**out, "learners": spec.gated, "feeders": spec.feeders, "k": spec.k, "h": spec.h,
            "connections_kept": spec.connections_kept}


def is_count(v, least: int = 0) -> bool:
    """An int (not a bool) of at least ``least``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def image_shape_ok(v) -> bool:
    """A recorded image shape: ``[H, W, C]`` positive ints."""
    return isinstance(v, list) and len(v) == 3 and all(is_count(d, 1) for d in v)


def _entry_problem(key: str, entry) -> str | None:
    """What is wrong with the manifest entry of ``key`` (None: nothing)."""
    if not isinstance(entry, dict):
        return "not a record"
    if not isinstance(entry.get("files"), dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in entry["files"].items()):
        return "files"
    if entry.get("kind") not in ("task", "router"):
        return f"kind {entry.get('kind')!r}"
    counts = {"revision": 1, "bytes": 0, "params": 0}
    if entry["kind"] == "task":
        counts.update(learners=1, feeders=0, k=1, connections_kept=0)
    for field, least in counts.items():
        if not is_count(entry.get(field), least):
            return f"{field} {entry.get(field)!r}"
    if not image_shape_ok(entry.get("image_shape")):
        return f"image_shape {entry.get('image_shape')!r}"
    if entry.get("dir") not in (integrity.model_rel(key),
                                integrity.model_rel(key, entry["revision"])):
        return f"dir {entry.get('dir')!r}, not the directory of {key!r}"
    return None


class ModelStore:
    """A directory of published models.

    Args:
      root: the store directory.
      create: make an empty store if ``root`` holds none (else a missing store is refused).
      deferred: check nothing until a model is needed (an edge serving from its toolbox
        while the cloud's store is out of reach); each use then fails as a missing store.
    """

    def __init__(self, root, *, create: bool = False, deferred: bool = False):
        self.root = Path(root).absolute()
        self._new = False
        if deferred and not create:
            return
        if not (self.root / "manifest.json").is_file():
            if not create:
                raise StoreError(f"store: {self.root} is not a model store (no manifest.json)")
            if self.root.exists() and (not self.root.is_dir()
                                       or not integrity.only_housekeeping(self.root)):
                raise StoreError(f"store: {self.root} exists and is not a model store")
            self._new = True  # made by the first publish
        self.manifest()

    # ------------------------------------------------------------------------------ reading

    def manifest(self) -> dict:
        """The manifest, checked for format and version."""
        if self._new and not (self.root / "manifest.json").exists():
            return {"format": FORMAT, "version": VERSION, "models": {}}
        m = files.read_json(self.root / "manifest.json", "model store")
        if m.get("format") != FORMAT:
            raise StoreError(f"store: {self.root}/manifest.json is not a {FORMAT} manifest")
        if m.get("version") not in READABLE_VERSIONS:
            raise StoreError(f"store: {self.root}/manifest.json has format version "
                             f"{m.get('version')!r}; this baim_jax reads versions "
                             f"{READABLE_VERSIONS}")
        if not isinstance(m.get("models"), dict):
            raise StoreError(f"store: {self.root}/manifest.json lists no models")
        for key, entry in m["models"].items():
            try:
                problem = _entry_problem(integrity.check_key(key), entry)
            except ValueError as e:
                problem = str(e)
            if problem:
                raise StoreError(f"store: the manifest entry of {key!r} is malformed "
                                 f"({problem}); nothing was changed")
        return m

    def tasks(self) -> list[str]:
        """The published task names."""
        return sorted(k for k in self.manifest()["models"] if k != ROUTER)

    def entry(self, key: str) -> dict:
        """The manifest entry of a task (or of ``ROUTER``)."""
        integrity.check_key(key)
        models = self.manifest()["models"]
        if key not in models:
            if key == ROUTER:
                raise StoreError("store: no router is published; requests must name a task")
            raise StoreError(f"task: {key!r} is not in the store; it holds {self.tasks()}")
        return models[key]

    def path(self, key: str) -> Path:
        """Where a published model lives in the store (checked to stay inside it)."""
        return self._dir(key, self.entry(key))

    def _dir(self, key: str, entry: dict) -> Path:
        """The directory ``entry`` names (its key's, with or without the entry's revision;
        checked by ``manifest``)."""
        dated = entry["dir"] == integrity.model_rel(key, entry["revision"])
        return integrity.model_dir(self.root, key, entry["revision"] if dated else None)

    def fetch(self, key: str, dest: Path) -> tuple[dict, int]:
        """Downloads a model to the new directory ``dest``, every file checked on arrival.

        Returns:
          ``(entry, bytes copied)``.
        """
        with integrity.locked(self.root, exclusive=False):
            entry = self.entry(key)
            copied = files.copy_verified(self._dir(key, entry), entry["files"], dest)
        _check_spec(dest, key, entry)
        return entry, copied

    def load(self, key: str):
        """Opens a model in place (no copy): the sensitive path. Checked like ``fetch``."""
        with integrity.locked(self.root, exclusive=False):
            entry = self.entry(key)
            path = self._dir(key, entry)
            files.verify(path, entry["files"])
            _check_spec(path, key, entry)
            return entry, checkpoint.load(path, check_digests=False)  # verified just above

    # ----------------------------------------------------------------------------- publishing

    def publish(self, sources: dict[str, Path], *, origin: str = "") -> list[dict]:
        """Publishes model directories: ``{task: dir}``, and ``{ROUTER: dir}`` for a router.

        Every source is loaded and checked first; only then is anything published, so a bad
        source leaves the store as it was (a store this call would have made is not made).
        A task already in the store gets a new revision.
        """
        checked = {}
        for key, src in sources.items():
            checked[integrity.check_key(key)] = Path(src).absolute()
            _check_loadable(checked[key], key)
            checked[key] = (checked[key], files.digests(checked[key]))  # refuses links, devices
        made = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            return self._publish(checked, origin)
        except BaseException:
            if made:
                self._unmake()
            raise

    def _unmake(self) -> None:
        """Removes the store a failed first publish made, if it is still empty: under the
        exclusive lock, and only with ``rmdir``, so another process's publish to the same new
        store is never touched."""
        try:
            with integrity.locked(self.root):
                if (self.root / "manifest.json").exists():
                    return
                with contextlib.suppress(FileNotFoundError):
                    (self.root / ".incoming").rmdir()
                (self.root / ".lock").unlink()
            self.root.rmdir()
        except OSError:
            pass  # in use by another publish: left to it (it reads as an empty store)

    def _publish(self, checked: dict[str, tuple[Path, dict]], origin: str) -> list[dict]:
        with contextlib.ExitStack() as temporaries:
            staged = []
            for key, (src, digests) in checked.items():
                tmp = temporaries.enter_context(integrity.incoming(self.root, ".publish-"))
                files.copy_verified(src, digests, tmp / "model", durable=True)
                staged.append((key, tmp, digests, checkpoint.read_spec(src)))
            entries = []
            with integrity.locked(self.root):
                integrity.sweep_incoming(self.root)
                manifest = self.manifest()
                now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                for key, tmp, digests, spec in staged:
                    revision = manifest["models"].get(key, {}).get("revision", 0) + 1
                    final = integrity.model_dir(self.root, key, revision)
                    files.replace_dir(tmp / "model", final)  # over what a killed publish left
                    files.sync(final.parent)
                    manifest["models"][key] = {
                        **_summary(spec), "dir": str(final.relative_to(self.root)),
                        "revision": revision, "files": digests,
                        "bytes": files.size(final), "published": now, "origin": origin}
                    entries.append({"task": key, **manifest["models"][key]})
                files.write_json(self.root / "manifest.json", {**manifest, "version": VERSION})
                self._sweep(manifest)
            return entries

    def _sweep(self, manifest: dict) -> None:
        """Removes the model directories ``manifest`` does not name (earlier revisions, and
        what a killed publish left). Call under the exclusive lock."""
        named = {self.root / e["dir"] for e in manifest["models"].values()}
        models = self.root / "models"
        found = list(models.iterdir()) if models.is_dir() else []
        found += [p for p in self.root.iterdir() if p.name.split("@")[0] == "router"]
        for path in found:
            if path not in named:
                files.remove(path)

    def export_run(self, workdir) -> list[dict]:
        """Publishes a finished run's toolkit (``toolkit/<task>/``) and router (``router/``)."""
        workdir = Path(workdir).absolute()
        results = workdir / "results.json"
        if not results.is_file():
            raise StoreError(f"--workdir: {workdir} holds no finished baim-jax run "
                             f"(no results.json)")
        try:
            toolkit = files.read_json(results, "results").get("toolkit")
        except files.IntegrityError as e:
            raise StoreError(f"--workdir: {e}") from None
        if not isinstance(toolkit, dict) or not toolkit:
            raise StoreError(f"--workdir: {results} lists no toolkit")
        sources = {name: workdir / "toolkit" / check_task_name(name) for name in toolkit}
        sources[ROUTER] = workdir / "router"
        return self.publish(sources, origin=str(workdir))


def _check_loadable(src: Path, key: str) -> None:
    """Refuses a source that does not load whole or is not the model its key names."""
    try:
        checkpoint.load(src)
    except checkpoint.CheckpointError as e:
        raise StoreError(f"publish {key}: {e}") from None
    _check_spec(src, key, None)


def _check_spec(path: Path, key: str, entry: dict | None) -> None:
    """The spec at ``path`` must be the model that ``key`` (and the manifest ``entry``) name."""
    spec = checkpoint.read_spec(path)
    want = "router" if key == ROUTER else "task"
    if spec.kind != want or (key != ROUTER and list(spec.tasks) != [key]):
        raise StoreError(f"{path}: holds a {spec.kind} model of {list(spec.tasks)}, not the "
                         f"{want} model of {key!r}")
    summary = _summary(spec)
    if entry is not None and summary != {k: entry.get(k) for k in summary}:
        raise StoreError(f"{path}: does not match its manifest entry")
