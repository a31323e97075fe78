"""Saving and loading models of every kind: a directory with ``spec.json`` (the model's
``ModelSpec`` with the SHA-256 of every file) and an orbax checkpoint of the unpadded state
(``state/``). ``save`` and ``load`` are ``baim_jax.save`` and ``baim_jax.load``.

Saving writes into a temporary sibling directory and renames it into place, so an interrupted
save never leaves a half-written model where a good one was. Loading needs nothing but the
directory and refuses anything inconsistent with one clear error (``CheckpointError``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from baim_jax import files
from baim_jax.core import connections, learners
from baim_jax.core.baim import BAIM
from baim_jax.core.edge_model import EdgeModel
from baim_jax.core.partition import TaskModel
from baim_jax.core.pool import PoolLayout
from baim_jax.core.router import TaskRouter
from baim_jax.core.spec import Model, ModelSpec

KINDS = {"baim": BAIM, "task": TaskModel, "edge": EdgeModel, "router": TaskRouter}


class CheckpointError(ValueError):
    """A model directory that cannot be loaded."""


def _to_dicts(tree):
    """Lists become dicts keyed "0", "1", ...; empty containers are dropped (orbax-friendly)."""
    if isinstance(tree, (list, tuple)):
        tree = {str(i): v for i, v in enumerate(tree)}
    if isinstance(tree, dict):
        out = {k: _to_dicts(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    return np.asarray(tree)


def _as_list(d, n: int, where: str) -> list:
    d = d or {}
    if not isinstance(d, dict) or set(d) - {str(i) for i in range(n)}:
        raise CheckpointError(f"{where}: unexpected entries in the checkpoint")
    return [d.get(str(i)) for i in range(n)]


def save(model: Model, path) -> None:
    """Writes ``model`` (a BAIM, TaskModel, EdgeModel or TaskRouter) to the directory ``path``:
    ``spec.json`` and an orbax checkpoint of its unpadded state, replaced atomically if the
    directory exists (``load`` reopens it)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    try:
        tree = model.export_tree()
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "state", _to_dicts(tree))
            ckpt.wait_until_finished()
        spec = model.spec.to_json()
        spec["files"] = files.digests(tmp / "state")
        spec["spec_sha256"] = _spec_digest(spec)
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
        files.replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _spec_digest(spec: dict) -> str:
    """SHA-256 of the spec's canonical JSON, its own digest left out."""
    body = {k: v for k, v in spec.items() if k != "spec_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read(path: Path) -> tuple[ModelSpec, dict]:
    """``spec.json`` of a model directory, checked: its own digest (an edited spec would load
    another model), then its content. Returns the spec and the recorded file digests."""
    if not (path / "spec.json").is_file():
        raise CheckpointError(f"{path}: not a baim_jax model directory (no spec.json)")
    try:
        raw = json.loads((path / "spec.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/spec.json: unreadable ({e})") from None
    try:
        ModelSpec.check_format(raw)
        if raw.get("spec_sha256") != _spec_digest(raw):
            raise ValueError("altered (its content does not match the SHA-256 it records)")
        spec = ModelSpec.from_json(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}/spec.json: {e}") from None
    return spec, raw.get("files")


def read_spec(path) -> ModelSpec:
    """The checked description of the model saved in ``path`` (nothing else is read)."""
    return _read(Path(path))[0]


def load(path, *, check_digests: bool = True) -> Model:
    """Opens a saved BAIM, TaskModel, EdgeModel or TaskRouter from its directory.

    Every file is checked against the SHA-256 digests in ``spec.json`` before anything is
    restored; a model is returned whole or not at all (``CheckpointError``).

    Args:
      path: the model directory.
      check_digests: False skips hashing the files, for a directory whose every file the
        caller has just checked against digests it trusts, and holds still while loading (the
        service's store and toolbox, under their locks). Everything else is still checked.
    """
    path = Path(path).absolute()
    spec, recorded = _read(path)
    if not (path / "state").is_dir():
        raise CheckpointError(f"{path}: the checkpoint directory 'state' is missing")
    if not isinstance(recorded, dict) or not recorded:
        raise CheckpointError(f"{path}/spec.json: no file digests ('files')")
    if check_digests:
        try:
            files.verify(path / "state", recorded)
        except files.IntegrityError as e:
            raise CheckpointError(str(e)) from None
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(path / "state")
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(f"{path}/state: cannot be restored ({type(e).__name__})") from None
    try:
        if spec.kind == "router":
            return TaskRouter(spec.tasks, tree.get("gate"))
        return _build(spec, tree)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _build(spec: ModelSpec, tree: dict) -> BAIM | EdgeModel:
    """A BAIM, TaskModel or EdgeModel from its spec and restored tree (ValueError if they
    disagree)."""
    members = [e.member for e in spec.learners]
    saved = _as_list(tree.get("learners"), len(members), "learners")
    params = []
    for n, p in enumerate(saved):
        if not isinstance(p, dict):
            raise ValueError(f"learner {n}: missing from the checkpoint")
        towers = {t: [v for v in _as_list(p.get(t), len(learners.stages(members[n].spec)[t]),
                                          f"learner {n} {t}") if v is not None]
                  for t in learners.TOWERS}
        params.append({**towers, **({"log_scale": p["log_scale"]} if "log_scale" in p else {})})
    if spec.kind == "edge":
        if len(members) != 1 or spec.connections:
            raise ValueError("an edge model has exactly one learner and no connections")
        return EdgeModel(members[0].spec, spec.tasks[0], params=params[0])
    conns = list(spec.connections)
    kernels = _as_list(tree.get("connections"), len(conns), "connections")
    probe = connections.ConnectionSet(PoolLayout(members), conns)
    for c, k in zip(conns, kernels):
        if k is None or tuple(np.shape(k)) != probe.real_kernel_shape(c):
            raise ValueError(f"connection {c.to_json()}: kernel shape "
                             f"{None if k is None else np.shape(k)}, expected "
                             f"{probe.real_kernel_shape(c)}")
        if not np.isfinite(k).all():
            raise ValueError(f"connection {c.to_json()}: non-finite values")
    return KINDS[spec.kind](members, spec.tasks, spec.config, rngs=nnx.Rngs(0),
                            learner_params=params, conns=conns, connection_kernels=kernels,
                            kept=list(spec.kept), gate_params=tree.get("gate"),
                            prior_logits=tree.get("prior"))
