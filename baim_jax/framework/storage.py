"""The run directory: its config record and the phases' epoch checkpoints (orbax)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from baim_jax import files


class PhaseCheckpoint:
    """Epoch checkpoints of one phase: a flat list of arrays and a JSON record (orbax; the
    latest is kept, and a save cut short leaves the previous one readable)."""

    def __init__(self, path: Path):
        self.path = path
        self.manager = ocp.CheckpointManager(
            path, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def latest(self, like: list, meta_like: dict | None = None) -> tuple[list, dict] | None:
        """The latest saved leaves, shaped as ``like``, and their record; None if none.

        An array saved with another shape of the same size (the pool's dense kernels were
        stored image-shaped before they were flattened; both are row-major) is reshaped; any
        other mismatch, a checkpoint that does not restore and a record without the keys
        and value kinds of ``meta_like`` are refused (one ``ValueError`` line).
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        target = {str(i): np.asarray(v) for i, v in enumerate(like)}
        redo = f"remove {self.path} to redo the phase"
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged checkpoints
            raise ValueError(f"{self.path}: epoch checkpoint {step} cannot be restored "
                             f"({type(e).__name__}); {redo}") from None
        if meta_like is not None and not _same_kinds(got.meta, meta_like):
            raise ValueError(f"{self.path}: epoch checkpoint {step} has a damaged record; {redo}")
        leaves = []
        for i, want in enumerate(like):
            leaf = np.asarray(got.state[str(i)])
            if leaf.shape != np.shape(want):
                if leaf.size != np.size(want):
                    raise ValueError(f"{self.path}: array {i} has shape {leaf.shape}, this run "
                                     f"needs {np.shape(want)}; remove {self.path} to redo the "
                                     f"phase")
                leaf = leaf.reshape(np.shape(want))
            leaves.append(leaf)
        return leaves, got.meta

    def save(self, step: int, leaves: list, meta: dict) -> None:
        """Saves ``leaves`` and the JSON record ``meta`` as epoch ``step``."""
        state = {str(i): np.asarray(v) for i, v in enumerate(leaves)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def remove(self) -> None:
        self.manager.close()
        shutil.rmtree(self.path, ignore_errors=True)


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
