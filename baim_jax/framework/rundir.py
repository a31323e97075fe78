"""The run directory: its config record, the phases' epoch checkpoints (orbax) and the one
resumable epoch loop of every training phase."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from baim_jax import files


class Trainer(Protocol):
    """What a phase trains: edges, a cloud strategy, FedAvg (``train_epochs``)."""

    @property
    def steps_per_epoch(self) -> int: ...

    def state_leaves(self) -> list: ...

    def load_state(self, leaves: list) -> None: ...

    def run_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> Any: ...


def _digest(leaves: list) -> str:
    """SHA-256 of the arrays' shapes, dtypes and bytes (catches a checkpoint that restores
    with other values than were saved)."""
    h = hashlib.sha256()
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes themselves, not a copy
    return h.hexdigest()


class PhaseCheckpoint:
    """Epoch checkpoints of one phase: a flat list of arrays and a JSON record (orbax). The
    last two are kept; one that does not restore whole is set aside (renamed into
    ``set_aside``, never deleted) and the one before it is used.

    Args:
      path: the phase's checkpoint directory (``ckpt/<phase>``).
      warn: called with one line when a checkpoint is set aside.
    """

    KEEP = 2
    FILES = "files.json"  # in each finished epoch: its files' sizes (``_list_files``)

    def __init__(self, path: Path, warn: Callable[[str], None] = print):
        self.path, self.warn = Path(path), warn
        self.set_aside_dir = self.path.parent / "set_aside"
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.path, options=ocp.CheckpointManagerOptions(max_to_keep=self.KEEP, create=True))

    def latest(self, like: list, meta_like: dict) -> tuple[list, dict] | None:
        """The latest epoch that restores whole, as leaves shaped as ``like`` and its record;
        None if none does.

        A checkpoint that does not restore, whose record lacks the keys and value kinds of
        ``meta_like``, whose arrays do not have the shapes of ``like`` or whose values are not
        the ones saved is set aside with one warning line, and the one before it is tried.
        """
        self.wait()
        aside = []
        found = None
        while (step := self.manager.latest_step()) is not None:
            try:
                found = self._restore(step, like, meta_like)
                break
            except ValueError as e:
                aside.append(self._set_aside(step, str(e)))
        then = (f"the phase resumes after epoch {found[1]['epoch']}" if found is not None
                else "the phase starts again")
        for line in aside:
            self.warn(f"{line}; {then}")
        return found

    def _list_files(self) -> None:
        """Records the files of every finished epoch that has no list yet, with their sizes:
        a missing or cut file is then found before orbax reads (and fails mid-way, its other
        reads still pending). A list that cannot be written is left out: its epoch restores
        through orbax alone."""
        for step in self.manager.all_steps():
            where = self.path / str(step)
            if where.is_dir() and not (where / self.FILES).exists():
                try:
                    files.write_json(where / self.FILES, files.sizes(where))
                except OSError:
                    continue

    def _check_files(self, step: int) -> None:
        """Raises ``ValueError`` naming the first file of epoch ``step`` that is missing or
        has other bytes than were written; nothing to check in an epoch without its list (one
        whose process was killed before writing it)."""
        where = self.path / str(step)
        if not (where / self.FILES).exists():
            return
        try:
            written = files.read_json(where / self.FILES, "list of files")
        except files.IntegrityError:
            raise ValueError("its list of files is damaged") from None
        found = files.sizes(where)
        for rel, size in written.items():
            if rel not in found:
                raise ValueError(f"its file {rel} is missing")
            if found[rel] != size:
                raise ValueError(f"its file {rel} has {found[rel]} bytes, {size} were written")

    def _read(self, step: int, **items) -> ocp.args.Composite:
        """Epoch ``step``'s ``items`` (orbax restore arguments by item name)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            raise ValueError(f"it cannot be restored ({type(e).__name__})") from None

    def _restore(self, step: int, like: list, meta_like: dict) -> tuple[list, dict]:
        """The record first (it names a state of another structure), then the arrays."""
        self._check_files(step)
        record = self._read(step, meta=ocp.args.JsonRestore()).meta
        if (why := _other_count(record, len(like))) is not None:
            raise ValueError(why)
        meta = ({k: v for k, v in record.items() if k not in ("digest", "arrays")}
                if isinstance(record, dict) else None)
        if meta is None or not _same_kinds(meta, meta_like):
            raise ValueError("its record is damaged")
        target = {str(i): np.asarray(v) for i, v in enumerate(like)}
        state = self._read(step, state=ocp.args.StandardRestore(target)).state
        leaves = []
        for i, want in enumerate(like):
            leaf = np.asarray(state[str(i)])
            if leaf.shape != np.shape(want):
                raise ValueError(f"array {i} has shape {leaf.shape}, this run needs "
                                 f"{np.shape(want)}")
            leaves.append(leaf)
        if record.get("digest") != _digest(leaves):
            raise ValueError("its arrays are not the ones saved")
        return leaves, meta

    def _set_aside(self, step: int, why: str) -> str:
        """Renames epoch ``step`` into ``set_aside``; returns the warning to give."""
        self.manager.close()
        self.set_aside_dir.mkdir(parents=True, exist_ok=True)
        n = 0
        while (dest := self.set_aside_dir / f"{self.path.name}-{step}"
                       f"{f'.{n}' if n else ''}").exists():
            n += 1
        (self.path / str(step)).rename(dest)
        self.manager = self._manager()
        return (f"baim-jax: warning: epoch checkpoint {self.path / str(step)}: {why}; set "
                f"aside as {dest}")

    def save(self, step: int, leaves: list, meta: dict) -> None:
        """Saves ``leaves`` and the JSON record ``meta`` as epoch ``step``. Returns once orbax
        holds its own copy of the arrays; the files are written in the background while the
        next epoch trains (an epoch is on disk only once whole: ``wait``)."""
        self.wait()  # what orbax's save does first anyway
        arrays = [np.asarray(v) for v in leaves]
        state = {str(i): a for i, a in enumerate(arrays)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({**meta, "digest": _digest(arrays), "arrays": len(arrays)})),
            force=True)

    def wait(self) -> None:
        """Waits until every epoch saved so far is on disk, and lists its files."""
        self.manager.wait_until_finished()
        self._list_files()

    def close(self, quietly: bool = False) -> None:
        """Waits for pending writes and stops the manager's threads; ``quietly`` drops an
        error of a pending write (when another error is already on its way)."""
        try:
            self.manager.close()
            self._list_files()
        except Exception:
            if not quietly:
                raise


def train_epochs(ckpt: PhaseCheckpoint, trainer: Trainer, epochs: int,
                 observe: Callable[[int, Any], dict], curves: Sequence[str],
                 on_step: Callable[[], None], on_resume: Callable[[int], None]) -> dict:
    """Trains a phase epoch by epoch, resumably: the one loop of every training phase.

    Restores the latest epoch checkpoint that restores whole (or starts afresh), runs the
    remaining epochs, and after each saves the trainer's state with the phase's record: the
    epoch, the elapsed seconds, and per name in ``curves`` one value a epoch from
    ``observe(epoch, what run_epoch returned)``. It ends early once ``trainer.finished``
    (edges that have all stopped early: ``edges.EdgeTrainer``).

    Args:
      on_step: called after every training step (progress).
      on_resume: called with the epoch the phase resumes after (0: from the start).

    Returns:
      the phase's record ``{"epoch", "elapsed", **curves}``.
    """
    meta = {"epoch": 0, "elapsed": 0.0, **{name: [] for name in curves}}
    restored = ckpt.latest(trainer.state_leaves(), meta)
    if restored is not None:
        leaves, meta = restored
        trainer.load_state(leaves)
    on_resume(meta["epoch"])
    start = time.perf_counter() - meta["elapsed"]
    for epoch in range(meta["epoch"], epochs):
        if getattr(trainer, "finished", False):
            break
        seen = observe(epoch, trainer.run_epoch(epoch, on_step))
        meta = {"epoch": epoch + 1, "elapsed": time.perf_counter() - start,
                **{name: meta[name] + [seen[name]] for name in curves}}
        ckpt.save(epoch + 1, trainer.state_leaves(), meta)
    return meta


def _other_count(record, count: int) -> str | None:
    """The reason to refuse an epoch whose record counts other than ``count`` arrays (saved
    by another version of the model); None when it agrees or has no count."""
    saved = record.get("arrays") if isinstance(record, dict) else None
    if not isinstance(saved, int) or isinstance(saved, bool) or saved == count:
        return None
    return f"it holds {saved} arrays, this run needs {count} (another version's state?)"


def _same_kinds(record, like: dict) -> bool:
    """``record`` has exactly ``like``'s keys, each a value of the same kind (a count, a
    number or a list)."""
    if not isinstance(record, dict) or set(record) != set(like):
        return False
    for key, want in like.items():
        got = record[key]
        if isinstance(want, int) and not (isinstance(got, int) and not isinstance(got, bool)
                                          and got >= 0):
            return False
        if isinstance(want, float) and not (isinstance(got, (int, float))
                                            and not isinstance(got, bool)):
            return False
        if isinstance(want, list) and not isinstance(got, list):
            return False
    return True


def run_config(workdir: Path) -> ml_collections.ConfigDict:
    """The config a run directory was claimed for (``claim``)."""
    record = Path(workdir) / "config.json"
    if not record.is_file():
        raise ValueError(f"workdir: {workdir} holds no baim-jax run (no config.json)")
    return ml_collections.ConfigDict(files.read_json(record, "run record"))


def claim(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Makes ``workdir`` this config's run directory, or refuses one holding another run."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir: {workdir} exists and is not a directory")
    record = workdir / "config.json"
    wanted = json.loads(json.dumps(config.to_dict()))
    if record.exists():
        if files.read_json(record, "run record") != wanted:
            raise ValueError(f"workdir: {workdir} holds a run of a different config; choose "
                             f"another --workdir (nothing was overwritten)")
    elif workdir.is_dir() and any(workdir.iterdir()):
        raise ValueError(f"workdir: {workdir} is not empty and holds no baim-jax run; choose "
                         f"another --workdir (nothing was overwritten)")
    else:
        files.write_json(record, wanted)
