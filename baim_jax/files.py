"""Files on disk that can be trusted: SHA-256 digests and their verification, verified
copies, atomic replacement of directories and atomic JSON records.

Saved models (``checkpoint``), the run directory and the model store and toolbox
(``service``) all build on these; they import nothing of the package.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


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
    file or directory (a symlink could point anywhere), ``root`` itself included."""
    if root.is_symlink():
        raise IntegrityError(f"{root}: a symbolic link, refused")
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


def sizes(root: Path) -> dict[str, int]:
    """Bytes of every file under ``root``, keyed by relative path."""
    return {rel: p.stat().st_size for rel, p in _files(root).items()}


def size(root: Path) -> int:
    """Bytes of every file under ``root``."""
    return sum(sizes(root).values())


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


def sync(path: Path) -> None:
    """Flushes a file, or a directory's entries, to disk (a file system that cannot flush a
    directory, as some network ones, is let be)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def copy_verified(src: Path, files: dict[str, str], dst: Path, *,
                  durable: bool = False) -> int:
    """Copies the files of ``src`` to the new directory ``dst``, checking each digest on the
    copy. Returns the bytes copied; on any failure ``dst`` is removed.

    ``durable``: every file and directory of the copy is flushed to disk before returning
    (for a copy that a record will name, so that it outlives a power loss as the record does).
    """
    if src.is_symlink():
        raise IntegrityError(f"{src}: a symbolic link, refused")
    copied = 0

    def copy(rel: str) -> str:
        nonlocal copied
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)
        if durable:
            sync(target)
        copied += target.stat().st_size
        return sha256(target)

    try:
        _compare(src, _files(src), files, copy)
        if durable:
            for folder in sorted({(dst / rel).parent for rel in files} | {dst}, reverse=True):
                sync(folder)
        return copied
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


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
    """Writes JSON atomically through a temporary file of its own (safe between processes);
    makes the parent directory if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync(path.parent)


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
