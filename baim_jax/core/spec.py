"""What a model is, apart from its arrays: one frozen description for every model kind (the
``spec.json`` of a model directory), and the contract the model kinds share.

``ModelSpec`` owns the format's name and version; models build theirs (``model.spec``),
``checkpoint`` writes and reads it, and the store, the pipeline and the CLI read its attributes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax

from baim_jax.core.config import BAIMConfig
from baim_jax.core.connections import Connection
from baim_jax.core.pool import Member

KINDS = ("baim", "task", "edge", "router")


@dataclasses.dataclass(frozen=True)
class LearnerEntry:
    """One learner of a model: its member (spec, squad, kept stages, noise stream), the task
    it serves (None for a feeder) and its real parameter count."""

    member: Member
    task: str | None
    params: int

    def to_json(self) -> dict:
        m = self.member
        return {"spec": m.spec.to_json(), "squad": m.squad, "task": self.task,
                "keep": None if m.keep is None else list(m.keep), "stream": m.stream,
                "params": self.params}

    @classmethod
    def from_json(cls, d: dict) -> "LearnerEntry":
        return cls(Member.from_json(d), d["task"], int(d["params"]))


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Real (unpadded) parameters: learners, gate (with the prior) and kept connections."""

    learners: int
    gate: int
    connections: int

    @property
    def total(self) -> int:
        return self.learners + self.gate + self.connections

    def to_json(self) -> dict:
        return {"learners": self.learners, "gate": self.gate, "connections": self.connections,
                "total": self.total}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The description of a model of any kind.

    Attributes:
      kind: ``"baim"``, ``"task"``, ``"edge"`` or ``"router"``.
      tasks: the task names, in the model's order.
      params: its real parameter counts.
      image_shape: ``(H, W, C)`` of the images it takes.
      learners: its learners (none for a router).
      config: the BAIM's hyper-parameters (None for an edge model or a router).
      connections: its connections, with ``kept`` saying which survived pruning.
      padding_waste: executed over useful FLOPs of its padded pool.
      feature_dim: the router's feature width (None otherwise).
    """

    FORMAT: ClassVar[str] = "baim_jax"
    VERSION: ClassVar[int] = 2

    kind: str
    tasks: tuple[str, ...]
    params: ParamCounts
    image_shape: tuple[int, int, int]
    learners: tuple[LearnerEntry, ...] = ()
    config: BAIMConfig | None = None
    connections: tuple[Connection, ...] = ()
    kept: tuple[bool, ...] = ()
    padding_waste: float = 1.0
    feature_dim: int | None = None

    @property
    def k(self) -> int:
        """Learners per input (1 for an edge model)."""
        return 1 if self.config is None else self.config.k

    @property
    def h(self) -> int:
        """Connection reach (0 for an edge model)."""
        return 0 if self.config is None else self.config.h

    @property
    def gated(self) -> int:
        """Learners the gate picks among (the others are feeders)."""
        return sum(e.member.squad is not None for e in self.learners)

    @property
    def feeders(self) -> int:
        return len(self.learners) - self.gated

    @property
    def connections_kept(self) -> int:
        return sum(self.kept)

    def to_json(self) -> dict:
        """A JSON-serialisable dict (the content of ``spec.json``)."""
        return {
            "format": self.FORMAT, "version": self.VERSION, "kind": self.kind,
            "tasks": list(self.tasks), "image_shape": list(self.image_shape),
            "config": None if self.config is None else dataclasses.asdict(self.config),
            "k": self.k, "h": self.h, "learners": [e.to_json() for e in self.learners],
            "connections": {"potential": len(self.connections), "kept": self.connections_kept,
                            "list": [c.to_json() + [bool(k)]
                                     for c, k in zip(self.connections, self.kept)]},
            "params": self.params.to_json(), "padding_waste": self.padding_waste,
            "feature_dim": self.feature_dim,
        }

    @classmethod
    def check_format(cls, d: Any) -> None:
        """Refuses (ValueError) a dict that is not a spec of this format, version and a kind."""
        if not isinstance(d, dict) or d.get("format") != cls.FORMAT:
            raise ValueError(f"not a {cls.FORMAT} spec")
        if d.get("version") != cls.VERSION:
            raise ValueError(f"format version {d.get('version')!r}, this baim_jax reads "
                             f"version {cls.VERSION}")
        if d.get("kind") not in KINDS:
            raise ValueError(f"unknown model kind {d.get('kind')!r}")

    @classmethod
    def from_json(cls, d: Any) -> "ModelSpec":
        """The spec of a ``to_json`` dict.

        Raises:
          ValueError: one line naming what is missing, malformed or of another format.
        """
        cls.check_format(d)
        try:
            conns = d["connections"]["list"]
            params = d["params"]
            spec = cls(
                kind=d["kind"], tasks=tuple(str(t) for t in d["tasks"]),
                params=ParamCounts(int(params["learners"]), int(params["gate"]),
                                   int(params["connections"])),
                image_shape=tuple(int(v) for v in d["image_shape"]),
                learners=tuple(LearnerEntry.from_json(e) for e in d["learners"]),
                config=None if d["config"] is None else BAIMConfig(**d["config"]),
                connections=tuple(Connection(*c[:5]) for c in conns),
                kept=tuple(bool(c[5]) for c in conns),
                padding_waste=float(d["padding_waste"]),
                feature_dim=None if d["feature_dim"] is None else int(d["feature_dim"]))
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed ({type(e).__name__}: {e})") from None
        normal = json.loads(json.dumps(spec.to_json()))
        if normal != {k: d.get(k) for k in normal}:
            raise ValueError("inconsistent (its counts or fields disagree with its content)")
        return spec


@runtime_checkable
class Model(Protocol):
    """What every model kind has: its kind, its tasks, its description and its arrays."""

    kind: str
    tasks: tuple[str, ...]

    @property
    def spec(self) -> ModelSpec: ...

    def export_tree(self) -> dict: ...


@runtime_checkable
class GenerativeModel(Model, Protocol):
    """What the BAIM, task models and edge models share (docs/design.md §3b): routing of a
    task given as a name or ids, reconstructions, the bound and its importance weights, and
    ancestral samples."""

    def task_ids(self, task, batch: int) -> jax.Array: ...

    def reconstruct(self, x, *, task=None, rng=None) -> dict: ...

    def bound(self, x, *, task=None, rng: jax.Array) -> dict: ...

    def bounds(self, x, *, task=None, rngs: jax.Array) -> dict: ...

    def log_weights(self, x: jax.Array, task: jax.Array, rngs: jax.Array) -> tuple: ...

    def draw(self, n: int, *, task, rng: jax.Array) -> dict: ...

    def sample(self, n: int, *, task, rng: jax.Array) -> jax.Array: ...


def learner_entries(members, tasks) -> tuple[LearnerEntry, ...]:
    """The entries of a pool's members, each with its task name and real parameter count."""
    return tuple(LearnerEntry(m, None if m.squad is None else tasks[m.squad], m.param_count())
                 for m in members)
