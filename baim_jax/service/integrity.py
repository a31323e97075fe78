"""What saved models, the store and the toolbox share: digests, verified copies, safe paths,
locks and atomic records. Every model directory is trusted only after each of its files matches
its SHA-256 (``checkpoint.load`` checks a model's ``state/`` against ``spec.json`` the same
way)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from baim_jax.names import check_task_name

_CHUNK = 1 << 20


ROUTER = "_router"  # the router's key: not a valid task name, so no task can take it


class IntegrityError(ValueError):
    """A stored model that is damaged, incomplete, unsafe or not what its record says."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> dict[str, Path]:
    """Every entry under ``root`` by relative path; refuses links and anything not a plain
    file or directory (a symlink could point anywhere)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            raise IntegrityError(f"{root}/{rel}: a symbolic link, refused")
        if p.is_file():
            out[rel] = p
        elif not p.is_dir():
            raise IntegrityError(f"{root}/{rel}: not a plain file, refused")
    return out


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, keyed by relative path."""
    return {rel: sha256(p) for rel, p in _files(root).items()}


def size(root: Path) -> int:
    """Bytes of every file under ``root``."""
    return sum(p.stat().st_size for p in _files(root).values())


def _compare(where: Path, found: dict[str, Path], files: dict[str, str], digest_of) -> None:
    """Checks ``found`` (relative path -> file) against ``files`` (relative path -> SHA-256):
    nothing extra, nothing missing, every ``digest_of(rel)`` as recorded."""
    extra = sorted(set(found) - set(files))
    if extra:
        raise IntegrityError(f"{where}/{extra[0]}: not part of the model")
    for rel, digest in files.items():
        if rel not in found:
            raise IntegrityError(f"{where}/{rel}: missing")
        if digest_of(rel) != digest:
            raise IntegrityError(f"{where}/{rel}: damaged (SHA-256 differs from the recorded one)")


def verify(root: Path, files: dict[str, str]) -> None:
    """Checks that ``root`` holds exactly ``files`` (relative path -> SHA-256)."""
    if not root.is_dir() or root.is_symlink():
        raise IntegrityError(f"{root}: missing")
    found = _files(root)
    _compare(root, found, files, lambda rel: sha256(found[rel]))


def copy_verified(src: Path, files: dict[str, str], dst: Path) -> int:
    """Copies the files of ``src`` to the new directory ``dst``, checking each digest on the
    copy. Returns the bytes copied; on any failure ``dst`` is removed."""
    if src.is_symlink():
        raise IntegrityError(f"{src}: a symbolic link, refused")
    copied = 0

    def copy(rel: str) -> str:
        nonlocal copied
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)
        copied += target.stat().st_size
        return sha256(target)

    try:
        _compare(src, _files(src), files, copy)
        return copied
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


def check_key(key: str) -> str:
    """A model's key in a store or toolbox: ``ROUTER`` or a safe task name."""
    return key if key == ROUTER else check_task_name(key)


def model_dir(root: Path, key: str) -> Path:
    """Where the model ``key`` lives under ``root`` (``models/<task>`` or ``router``), checked
    to stay inside ``root`` (no links, no escapes)."""
    path = root / "router" if check_key(key) == ROUTER else root / "models" / key
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


def remove(path: Path) -> None:
    """Removes a directory tree, or a file or link (a link is never followed); nothing if
    missing."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Puts the directory ``tmp`` at ``final`` atomically (the old one, if any, is removed
    after the rename, so ``final`` is never missing or half-written)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically through a temporary file of its own (safe between processes)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing; not a {what}") from None
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{path}: not a {what} record")
    return obj


@contextlib.contextmanager
def locked(root: Path, exclusive: bool = True):
    """An advisory lock on ``root/.lock`` shared by every process using ``root``."""
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
