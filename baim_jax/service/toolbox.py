"""The edge's toolbox (paper Sec. III, step 7): a local cache of task models downloaded from the
store, with a byte capacity and least-recently-used eviction.

Layout::

    TOOLBOX/toolbox.json   {"format", "version", "capacity", "clock",
                            "entries": {key: {"revision", "files", "bytes", "image_shape",
                                              "last_used"}}}
    TOOLBOX/models/<task>/ a cached task model
    TOOLBOX/router/        the cached router (key ``_router``)

Every change happens under an exclusive lock on ``TOOLBOX/.lock``: a download lands in
``.incoming/`` first and is renamed into place, so processes filling the same toolbox at once
never leave (or read) a broken model; what a killed download leaves there is swept when a
toolbox is next opened. A hit needs nothing from the store: the entry keeps what
a request is checked against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

from baim_jax import files
from baim_jax.service import integrity
from baim_jax.service.store import ModelStore, image_shape_ok, is_count

FORMAT, VERSION = "baim_jax-toolbox", 1


class ToolboxError(ValueError):
    """A toolbox that cannot be used."""


@dataclasses.dataclass
class Checkout:
    """One model made available by ``Toolbox.checkout``.

    Attributes:
      path: the model directory to load, valid while the checkout is open.
      revision: the store revision of the model.
      source: ``"toolbox"`` (a hit) or ``"store"`` (downloaded and cached).
      bytes_downloaded: bytes copied from the store (0 on a hit).
      note: why a hit became a miss (a damaged cached copy), else "".
    """

    path: Path
    revision: int
    source: str
    bytes_downloaded: int = 0
    note: str = ""


def parse_bytes(text) -> int:
    """``"64MB"``, ``"1.5GiB"``, ``"200000"`` -> bytes (refuses anything else)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(text).strip().upper()
    number = s.rstrip("KMGIB")
    try:
        value = float(number) * units[s[len(number):]]
    except (ValueError, KeyError):
        raise ToolboxError(f"capacity: {text!r} is not a size like 200000, 64MB or "
                           f"1.5GiB") from None
    if not 0 < value < float("inf"):
        raise ToolboxError(f"capacity: {text!r} must be a positive, finite size")
    return int(value)


def _index_problem(index: dict) -> str | None:
    """What is wrong with a toolbox index (None: nothing)."""
    capacity = index.get("capacity")
    if capacity is not None and not is_count(capacity, 1):
        return f"capacity {capacity!r}"
    if not is_count(index.get("clock")):
        return f"clock {index.get('clock')!r}"
    entries = index.get("entries")
    if not isinstance(entries, dict):
        return "entries"
    for key, e in entries.items():
        if not isinstance(e, dict) or not isinstance(e.get("files"), dict):
            return f"entry {key!r}"
        for field in ("revision", "bytes", "last_used"):
            if not is_count(e.get(field)):
                return f"{field} of {key!r}: {e.get(field)!r}"
        if e.get("image_shape") is not None and not image_shape_ok(e["image_shape"]):
            return f"image_shape of {key!r}: {e['image_shape']!r}"
    return None


class Toolbox:
    """A local model cache.

    Args:
      root: the toolbox directory (made if missing).
      capacity: the byte capacity; None keeps the recorded one (unlimited for a new toolbox).
        A smaller capacity than the toolbox holds evicts at the next download.
    """

    def __init__(self, root, capacity: int | None = None):
        self.root = Path(root).absolute()
        if self.root.exists() and not self.root.is_dir():
            raise ToolboxError(f"toolbox: {self.root} is not a directory")
        if capacity is not None and (not isinstance(capacity, int) or capacity <= 0):
            raise ToolboxError(f"capacity: {capacity!r} must be a positive number of bytes")
        if self.root.is_dir() and not (self.root / "toolbox.json").exists():
            self._check_empty()  # before the lock file: a refused directory is left untouched
        self.root.mkdir(parents=True, exist_ok=True)
        with integrity.locked(self.root):
            index = self._index()
            integrity.sweep_incoming(self.root)
            if capacity is not None and capacity != index["capacity"]:
                index["capacity"] = capacity
                files.write_json(self.root / "toolbox.json", index)

    def _index(self) -> dict:
        path = self.root / "toolbox.json"
        if not path.exists():
            self._check_empty()
            index = {"format": FORMAT, "version": VERSION, "capacity": None, "clock": 0,
                     "entries": {}}
            files.write_json(path, index)
            return index
        index = files.read_json(path, "toolbox")
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ToolboxError(f"toolbox: {path} is not a {FORMAT} version {VERSION} index")
        problem = _index_problem(index)
        if problem:
            raise ToolboxError(f"toolbox: {path} is damaged ({problem}); remove the toolbox "
                               f"directory to start it anew")
        return index

    def _check_empty(self) -> None:
        """Refuses to make a toolbox in a directory that holds anything else."""
        if not integrity.only_housekeeping(self.root):
            raise ToolboxError(f"toolbox: {self.root} is not empty and holds no toolbox")

    def _dir(self, key: str) -> Path:
        return integrity.model_dir(self.root, key)

    @property
    def capacity(self) -> int | None:
        return self._index()["capacity"]

    def contents(self) -> dict[str, dict]:
        """``{task: {"revision", "bytes", "image_shape", "last_used"}}`` of what the toolbox
        holds (``image_shape`` None for a model cached before it was recorded)."""
        with integrity.locked(self.root, exclusive=False):
            return {k: {f: e.get(f) for f in ("revision", "bytes", "image_shape", "last_used")}
                    for k, e in self._index()["entries"].items()}

    def used(self) -> int:
        return sum(e["bytes"] for e in self.contents().values())

    @contextlib.contextmanager
    def checkout(self, key: str, store: ModelStore, *, loaded: int | None = None):
        """Makes a model available, from the toolbox (a hit) or downloaded from the store and
        cached (a miss), evicting the least recently used models to stay within capacity.

        Yields a ``Checkout`` while holding the toolbox's lock, so the model cannot be evicted
        while it is being read. A cached copy that fails its digests is dropped and fetched
        again. ``loaded``: the revision the caller already holds in memory; a hit of that
        revision is not hashed again (nothing is read from disk).
        """
        integrity.check_key(key)
        note = ""
        with integrity.locked(self.root):
            index = self._index()
            entry = index["entries"].get(key)
            if entry is not None:
                path = self._dir(key)
                try:
                    if entry["revision"] != loaded:
                        files.verify(path, entry["files"])
                except files.IntegrityError as e:
                    note = f"cached copy dropped ({e})"
                    self._drop(index, key)
                    files.write_json(self.root / "toolbox.json", index)
                else:
                    self._touch(index, key)
                    yield Checkout(path, entry["revision"], "toolbox")
                    return
        with integrity.incoming(self.root, ".fetch-") as tmp:
            meta, copied = store.fetch(key, tmp / "model")
            with integrity.locked(self.root):
                index = self._index()
                self._admit(index, key, meta, tmp / "model")
                self._touch(index, key)
                yield Checkout(self._dir(key), meta["revision"], "store", copied, note)

    def _admit(self, index: dict, key: str, meta: dict, tmp: Path) -> None:
        """Puts a verified download in place, evicting least recently used models first. A
        copy that another process cached meanwhile is replaced too: the caller's checkout
        vouches only for the files it checked itself."""
        self._drop_orphans(index)
        if key in index["entries"]:
            self._drop(index, key)
        capacity = index["capacity"]
        if capacity is not None and meta["bytes"] > capacity:
            raise ToolboxError(f"toolbox: {key!r} ({meta['bytes']:,} bytes) is larger than the "
                               f"capacity ({capacity:,} bytes)")
        if capacity is not None:
            while index["entries"] and (sum(e["bytes"] for e in index["entries"].values())
                                        + meta["bytes"] > capacity):
                self._drop(index, min(index["entries"],
                                      key=lambda k: index["entries"][k]["last_used"]))
        files.replace_dir(tmp, self._dir(key))
        index["entries"][key] = {"revision": meta["revision"], "files": meta["files"],
                                 "bytes": meta["bytes"], "image_shape": meta["image_shape"],
                                 "last_used": 0}

    def fits(self, nbytes: int) -> bool:
        """Whether a model of ``nbytes`` can be cached at all."""
        capacity = self.capacity
        return capacity is None or nbytes <= capacity

    def _touch(self, index: dict, key: str) -> None:
        index["clock"] += 1
        index["entries"][key]["last_used"] = index["clock"]
        files.write_json(self.root / "toolbox.json", index)

    def _drop(self, index: dict, key: str) -> None:
        shutil.rmtree(self._dir(key), ignore_errors=True)
        index["entries"].pop(key, None)

    def _drop_orphans(self, index: dict) -> None:
        """Removes model directories the index does not know (left by a killed process)."""
        held = {self._dir(k).name for k in index["entries"]}
        models = self.root / "models"
        for p in (models.iterdir() if models.is_dir() else []):
            if p.name not in held:
                files.remove(p)
