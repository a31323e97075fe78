"""What the store and the toolbox share beyond ``baim_jax.files``: model keys and their
directories, private incoming directories and locks. Every model directory is trusted only
after each of its files matches its SHA-256 (``files.verify``; ``checkpoint.load`` checks a
model's ``state/`` against ``spec.json`` the same way)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from baim_jax.files import IntegrityError, remove
from baim_jax.names import check_task_name

ROUTER = "_router"  # the router's key: not a valid task name, so no task can take it
HOUSEKEEPING = (".lock", ".incoming")  # what a store or toolbox holds besides its models


def only_housekeeping(root: Path) -> bool:
    """``root`` holds nothing but the lock and incoming directory (what ``locked`` and
    ``incoming`` make, also before a first publish or fill completed)."""
    return all(p.name in HOUSEKEEPING for p in root.iterdir())


def check_key(key: str) -> str:
    """A model's key in a store or toolbox: ``ROUTER`` or a safe task name."""
    return key if key == ROUTER else check_task_name(key)


def model_rel(key: str, revision: int | None = None) -> str:
    """The model ``key``'s directory relative to its root: ``models/<task>`` or ``router``,
    with ``@<revision>`` when given (``@`` is in no task name, so no two keys share one)."""
    rel = "router" if check_key(key) == ROUTER else f"models/{key}"
    return rel if revision is None else f"{rel}@{revision}"


def model_dir(root: Path, key: str, revision: int | None = None) -> Path:
    """Where the model ``key`` lives under ``root`` (``model_rel``), checked to stay inside
    ``root`` (no links, no escapes)."""
    path = root / model_rel(key, revision)
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise IntegrityError(f"{key!r}: its directory leads outside {root}, refused")
    return path


@contextlib.contextmanager
def incoming(root: Path, prefix: str):
    """A fresh private directory under ``root/.incoming`` (same file system: renames are
    atomic), removed on exit.

    While it is open its owner holds a lock on ``<directory>.lock`` beside it; both are made
    under a shared lock on ``root``. ``sweep_incoming``, under the exclusive lock, can then
    tell a directory in use from one that a killed process left. Not to be entered while this
    process holds the lock on ``root``.
    """
    folder = root / ".incoming"
    with locked(root, exclusive=False):
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".lock", dir=folder)
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp = Path(name[:-len(".lock")])
        tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.unlink(name)
        os.close(fd)


def sweep_incoming(root: Path) -> None:
    """Removes what killed processes left in ``root/.incoming``: directories whose lock is
    free, and anything without a lock. Call under the exclusive lock on ``root``."""
    folder = root / ".incoming"
    if not folder.is_dir():
        return
    for lock in sorted(folder.glob("*.lock")):
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            remove(Path(str(lock)[:-len(".lock")]))
            lock.unlink()
    for p in sorted(folder.iterdir()):
        if not p.name.endswith(".lock") and not Path(f"{p}.lock").exists():
            remove(p)


@contextlib.contextmanager
def locked(root: Path, exclusive: bool = True):
    """An advisory lock on ``root/.lock`` shared by every process using ``root``.

    A shared (reader's) lock opens an existing lock file read-only, so reading needs no write
    permission; where the file is missing and cannot be made (a read-only copy of a store
    without it), the read goes ahead unlocked.
    """
    path = root / ".lock"
    try:
        f = open(path, "r" if not exclusive and path.is_file() else "a")
    except OSError:
        if exclusive or path.exists():
            raise
        f = None
    if f is None:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
