"""The learner pool: heterogeneous learners in stacked, padded parameter trees (docs/design.md §4).

Every tower is laid out in *positions*: hidden stages sit at positions ``0..e_n-1``, the tower's
last stage (latent head / output) sits at the pool's last position, and the positions between
(for learners shallower than the deepest) are identity stages. Each parameter leaf is stacked
along a leading learner axis and zero-padded at the end of every axis to the pool's largest
shape, dense kernels then flattened to ``[in, out]`` (``pool_shapes``; ``stack`` also returns a
box mask per leaf). Padded entries stay exactly zero through
training without masking the weights in the forward (which would read every weight three
times): padded units compute ReLU(0) = 0 with ReLU'(0) = 0, padded latent coordinates are
masked, depth-padding stages are selected away, so every padded parameter gets an exactly zero
gradient, and optimisers map a zero gradient history to a zero update (SGD, Adam, clipping,
decoupled weight decay of a zero). A learner inside the pool computes exactly what it computes
alone (tested, as is the zero padding after training).

A member may also keep only the first stages of a tower (a *feeder* in a partitioned task model,
which needs only the stages whose inputs feed other learners); its dropped stages are ``ABSENT``
and output zeros.

A position runs its REAL learners in a few *stage groups* (``PoolLayout.groups``), each padded
only to its own largest shapes, and skips its identity and absent learners: with learners of
32 to 512 units, one stack padded to the widest would run several times the FLOPs the real
stages need.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from baim_jax.core import bound, learners, losses

REAL, IDENTITY, ABSENT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Member:
    """A learner of a pool: its spec, its squad (None for a feeder) and the stages it keeps.

    Attributes:
      spec: the learner's spec.
      squad: its task's index; None for a feeder (not gated).
      keep: ``(encoder stages, decoder stages)`` kept from the start of each tower; None keeps
        the whole learner.
      stream: its latent noise stream (``bound.latent_noise``); None: its index in the pool.
        A task model keeps its learners' BAIM streams, so it draws the BAIM's noise.
    """

    spec: learners.LearnerSpec
    squad: int | None
    keep: tuple[int, int] | None = None
    stream: int | None = None

    def kept(self, tower: str) -> int:
        n = len(learners.stages(self.spec)[tower])
        return n if self.keep is None else self.keep[learners.TOWERS.index(tower)]

    def param_count(self) -> int:
        if self.keep is None:
            return learners.count_params(self.spec)
        return learners.count_params(self.spec, enc_stages=self.keep[0], dec_stages=self.keep[1])

    def to_json(self) -> dict:
        return {"spec": self.spec.to_json(), "squad": self.squad,
                "keep": None if self.keep is None else list(self.keep), "stream": self.stream}

    @classmethod
    def from_json(cls, d: dict) -> "Member":
        keep = d.get("keep")
        return cls(learners.LearnerSpec.from_json(d["spec"]), d["squad"],
                   None if keep is None else tuple(keep), d.get("stream"))


@dataclasses.dataclass(frozen=True)
class StageGroup:
    """REAL learners of one position that run as one stacked stage.

    Attributes:
      learners: their indices, increasing.
      stage: the position's stage padded to the largest real shapes of these learners only.
    """

    learners: tuple[int, ...]
    stage: learners.Stage

    def runs(self) -> list[tuple[int, int]]:
        """``learners`` as maximal runs of consecutive indices ``[(start, stop)]``."""
        out = []
        for n in self.learners:
            if out and out[-1][1] == n:
                out[-1] = (out[-1][0], n + 1)
            else:
                out.append((n, n + 1))
        return out


def bounding_stage(stages: Sequence[learners.Stage]) -> learners.Stage:
    """The first of ``stages`` with the elementwise-largest input and output shapes of all."""
    return dataclasses.replace(
        stages[0], in_shape=tuple(int(v) for v in np.max([s.in_shape for s in stages], axis=0)),
        out_shape=tuple(int(v) for v in np.max([s.out_shape for s in stages], axis=0)))


MAX_GROUPS = 3  # stage groups per position (each one more stacked matmul and weight copy)


def partition_stages(stages: Sequence[learners.Stage], max_groups: int = MAX_GROUPS
                     ) -> list[list[int]]:
    """Splits stages into at most ``max_groups`` groups with the fewest padded FLOPs.

    The stages are sorted by their FLOPs and cut into consecutive runs (dynamic programming);
    a group runs ``len(group)`` times the FLOPs of its elementwise-largest stage. Of partitions
    within 5% of the cheapest, the one with the fewest groups wins.

    Args:
      stages: one stage per learner (one op; shapes may differ).
      max_groups: the most groups to form.

    Returns:
      lists of indices into ``stages``, each increasing.
    """
    order = sorted(range(len(stages)), key=lambda i: (learners.stage_flops(stages[i]), i))

    def cost(a: int, b: int) -> int:
        return (b - a) * learners.stage_flops(bounding_stage([stages[i] for i in order[a:b]]))

    n = len(order)
    best = {(0, 0): (0, [])}  # (groups, stages covered) -> (cost, cuts)
    for g in range(1, max_groups + 1):
        for b in range(1, n + 1):
            options = [(best[(g - 1, a)][0] + cost(a, b), best[(g - 1, a)][1] + [b])
                       for a in range(b) if (g - 1, a) in best]
            if options:
                best[(g, b)] = min(options)
    full = [best[(g, n)] for g in range(1, min(max_groups, n) + 1)]
    cheapest = min(c for c, _ in full)
    _, cuts = next(f for f in full if f[0] <= 1.05 * cheapest)
    return [sorted(order[a:b]) for a, b in zip([0] + cuts[:-1], cuts)]


def pad_to(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-pads ``a`` at the end of every axis to ``shape`` (numpy: no per-shape compiles)."""
    a = np.asarray(a, np.float32)
    return np.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


def box_mask(real: tuple[int, ...], padded: tuple[int, ...]) -> np.ndarray:
    """Boolean mask, True on ``[0:real[0], 0:real[1], ...]`` inside ``padded``."""
    m = np.zeros(padded, bool)
    m[tuple(slice(0, r) for r in real)] = True
    return m


def stored_shapes(stage: learners.Stage) -> dict[str, tuple[int, ...]]:
    """A stage's parameter shapes as the pool stores them (``PoolLayout.pool_shapes``)."""
    shapes = learners.stage_param_shapes(stage)
    if stage.op not in ("dense", "head"):
        return shapes
    n_in = math.prod(stage.in_shape)
    return {name: (n_in, math.prod(shape) // n_in) if name.endswith("kernel")
            else (math.prod(shape),) for name, shape in shapes.items()}


class PoolLayout:
    """Static layout of a pool: positions, padded stage shapes, per-learner stage status.

    Attributes:
      members: the pool's members, in learner order ``n = 0..N-1``.
      stages: ``{tower: [Stage]}``, the padded stage of each position (shapes are maxima).
      status: ``{tower: int array [positions, N]}``: REAL, IDENTITY or ABSENT.
      stage_index: ``{tower: [[learner stage index or None] per learner] per position}``.
      latent: padded latent size.
    """

    def __init__(self, members: list[Member]):
        if not members:
            raise learners.SpecError("pool: no learners")
        self.members = tuple(members)
        specs = [m.spec for m in members]
        for field in ("kind", "image_shape", "likelihood"):
            values = {getattr(s, field) for s in specs}
            if len(values) > 1:
                raise learners.SpecError(
                    f"learner spec field '{field}': one pool needs a single value, got "
                    f"{sorted(map(str, values))}")
        self.kind = specs[0].kind
        self.image_shape = specs[0].image_shape
        self.likelihood = specs[0].likelihood
        self.latent = max(s.latent for s in specs)
        own = [learners.stages(s) for s in specs]
        self.stages, self.status, self.stage_index, self.in_shapes = {}, {}, {}, {}
        for tower in learners.TOWERS:
            depth = max(len(st[tower]) for st in own)
            index = [[None] * len(members) for _ in range(depth)]
            status = np.full((depth, len(members)), ABSENT, np.int32)
            in_shapes = [[None] * len(members) for _ in range(depth)]
            for n, (member, st) in enumerate(zip(members, own)):
                stages_n = st[tower]
                kept = member.kept(tower)
                carried = stages_n[0].in_shape
                for p in range(depth):
                    k = p if p < len(stages_n) - 1 else (
                        len(stages_n) - 1 if p == depth - 1 else None)
                    in_shapes[p][n] = stages_n[k].in_shape if k is not None else carried
                    if k is None:
                        status[p, n] = IDENTITY if kept >= len(stages_n) - 1 else ABSENT
                    else:
                        index[p][n] = k
                        status[p, n] = REAL if k < kept else ABSENT
                        carried = stages_n[k].out_shape
            pool_stages = []
            for p in range(depth):
                real = [own[n][tower][index[p][n]] for n in range(len(members))
                        if index[p][n] is not None]
                ops = {(s.op, s.stride, s.act) for s in real}
                if len(ops) > 1:
                    raise learners.SpecError(
                        f"learner specs: stage {p} of the {tower} tower differs in kind across "
                        f"learners ({sorted(ops)}); they cannot share a pool")
                in_pad = tuple(int(v) for v in np.max(in_shapes[p], axis=0))
                out_pad = (tuple(int(v) for v in np.max([s.out_shape for s in real], axis=0))
                           if real[0].op == "head" or p == depth - 1 else None)
                pool_stages.append((real[0], in_pad, out_pad))
            resolved = []
            for p, (proto, in_pad, out_pad) in enumerate(pool_stages):
                if out_pad is None:
                    out_pad = pool_stages[p + 1][1]
                resolved.append(dataclasses.replace(proto, in_shape=in_pad, out_shape=out_pad))
            self.stages[tower] = resolved
            self.status[tower] = status
            self.stage_index[tower] = index
            self.in_shapes[tower] = in_shapes
        self._groups = {tower: tuple(self._group(own, tower, p)
                                     for p in range(len(self.stages[tower])))
                        for tower in learners.TOWERS}

    def _group(self, own: list, tower: str, p: int) -> tuple[StageGroup, ...]:
        real = [n for n in range(self.size) if self.status[tower][p, n] == REAL]
        if not real:
            return ()
        mine = [own[n][tower][self.stage_index[tower][p][n]] for n in real]
        return tuple(StageGroup(tuple(real[i] for i in part),
                                bounding_stage([mine[i] for i in part]))
                     for part in partition_stages(mine))

    def groups(self, tower: str, p: int) -> tuple[StageGroup, ...]:
        """The stage groups of a position (its REAL learners, ``partition_stages``)."""
        return self._groups[tower][p]

    def __eq__(self, other) -> bool:
        """Layouts of the same members are equal (so equal models share compiled code)."""
        return isinstance(other, PoolLayout) and self.members == other.members

    def __hash__(self) -> int:
        return hash(self.members)

    @property
    def segment_of(self) -> np.ndarray:
        """``[N]`` int: each learner's squad, -1 for a feeder (not gated)."""
        return np.array([-1 if m.squad is None else m.squad for m in self.members], np.int32)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def streams(self) -> np.ndarray:
        """``[N]`` int: each learner's latent noise stream (``Member.stream``)."""
        return np.array([n if m.stream is None else m.stream
                         for n, m in enumerate(self.members)], np.int32)

    @property
    def depths(self) -> tuple[int, int]:
        """Positions of the encoder and decoder towers (the chain of ``dispatch.Layout.caps``
        is the encoder's, then the decoder's)."""
        return len(self.stages["enc"]), len(self.stages["dec"])

    def position(self, tower: str, n: int, k: int) -> int:
        """Pool position of learner ``n``'s own stage ``k``."""
        return next(p for p, idx in enumerate(self.stage_index[tower]) if idx[n] == k)

    def param_shapes(self, tower: str, p: int) -> dict[str, tuple[int, ...]]:
        """Padded parameter shapes of a position, as a learner's (``[*in, *out]`` kernels)."""
        return learners.stage_param_shapes(self.stages[tower][p])

    def pool_shapes(self, tower: str, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of a position's leaves in the stacked tree (learner axis left out): dense and
        head kernels flat ``[in, out]``, their biases ``[out]``, others as ``param_shapes``.

        Flat, because a size-1 axis in a stacked kernel (one image channel) makes XLA copy the
        whole gradient into the parameter's layout on every step (measured: 7 ms of a 60 ms
        step at N = 32 on a 2-core CPU).
        """
        return stored_shapes(self.stages[tower][p])

    def latent_mask(self) -> np.ndarray:
        """``[N, latent]``: True on each learner's real latent coordinates (when its head runs)."""
        real_head = self.status["enc"][-1] == REAL
        return np.stack([box_mask((m.spec.latent,), (self.latent,)) & h
                         for m, h in zip(self.members, real_head)])

    def stack(self, params: list[learners.Params]) -> tuple[dict, dict]:
        """Stacks unpadded per-learner parameters into padded pool trees.

        Args:
          params: per member, ``init_learner``-shaped parameters (stages it does not keep may be
            missing or present; they are ignored).

        Returns:
          ``(stacked, masks)``: ``{"enc": [per position {name: [N, *pool_shape]}], "dec": [...],
          "log_scale": [N]}`` and boolean masks of the same structure.
        """
        stacked, masks = {}, {}
        for tower in learners.TOWERS:
            stacked[tower], masks[tower] = [], []
            for p in range(len(self.stages[tower])):
                flat = self.pool_shapes(tower, p)
                leaves, leaf_masks = {}, {}
                for name, shape in self.param_shapes(tower, p).items():
                    rows, mrows = [], []
                    for n in range(self.size):
                        k = self.stage_index[tower][p][n]
                        if self.status[tower][p, n] == REAL:
                            a = np.asarray(params[n][tower][k][name], np.float32)
                            rows.append(pad_to(a, shape).reshape(flat[name]))
                            mrows.append(box_mask(a.shape, shape).reshape(flat[name]))
                        else:
                            rows.append(np.zeros(flat[name], np.float32))
                            mrows.append(np.zeros(flat[name], bool))
                    leaves[name] = jax.device_put(np.stack(rows))
                    leaf_masks[name] = jax.device_put(np.stack(mrows))
                stacked[tower].append(leaves)
                masks[tower].append(leaf_masks)
        stacked["log_scale"] = jax.device_put(
            np.array([p.get("log_scale", 0.0) for p in params], np.float32))
        masks["log_scale"] = jax.device_put(np.ones((self.size,), bool))
        return stacked, masks

    def real_stage(self, stacked: dict, tower: str, n: int, k: int) -> learners.Params:
        """Learner ``n``'s own stage ``k`` of ``tower``, its real (unpadded) parameters sliced
        from the stacked pool tree (numpy or jax arrays; traceable)."""
        p = self.position(tower, n, k)
        padded = self.param_shapes(tower, p)
        stage = learners.stages(self.members[n].spec)[tower][k]
        return {name: stacked[tower][p][name][n].reshape(padded[name])[
            tuple(slice(0, r) for r in shape)]
            for name, shape in learners.stage_param_shapes(stage).items()}

    def unstack(self, stacked: dict) -> list[learners.Params]:
        """Inverse of ``stack``: each member's real (unpadded) parameters, kept stages only."""
        stacked = jax.tree.map(np.asarray, stacked)
        out = []
        for n, member in enumerate(self.members):
            tree = ({"log_scale": stacked["log_scale"][n]}
                    if self.likelihood == "gaussian" else {})
            for tower in learners.TOWERS:
                tree[tower] = [self.real_stage(stacked, tower, n, k)
                               for k in range(member.kept(tower))]
            out.append(tree)
        return out

    def padding_waste(self) -> float:
        """Executed FLOPs of the grouped pool over the useful FLOPs of its real stages."""
        executed = useful = 0
        for tower in learners.TOWERS:
            for p in range(len(self.stages[tower])):
                for group in self.groups(tower, p):
                    executed += len(group.learners) * learners.stage_flops(group.stage)
                for n, member in enumerate(self.members):
                    if self.status[tower][p, n] == REAL:
                        k = self.stage_index[tower][p][n]
                        useful += learners.stage_flops(learners.stages(member.spec)[tower][k])
        return executed / max(useful, 1)


def _box(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x [..., *padded]`` sliced or zero-padded at the end of its last ``len(shape)`` axes to
    ``shape``."""
    lead = x.ndim - len(shape)
    x = x[(slice(None),) * lead + tuple(slice(0, d) for d in shape)]
    return jnp.pad(x, [(0, 0)] * lead + [(0, d - s) for s, d in zip(x.shape[lead:], shape)])


def _rows_of(runs: Sequence[tuple[int, int]], x: jax.Array) -> jax.Array:
    """The learners ``runs`` of ``x [N, ...]``, concatenated."""
    return jnp.concatenate([x[a:b] for a, b in runs]) if len(runs) > 1 else x[runs[0][0]:
                                                                               runs[0][1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_groups(x: jax.Array, groups: tuple) -> tuple[jax.Array, ...]:
    """Each group's learners of ``x [N, *shape]``, cut to the group's box.

    Args:
      x: a stacked leaf or activation.
      groups: per group ``(runs, box)``: ``StageGroup.runs()`` and the trailing shape it keeps
        (static).

    Returns:
      per group ``[learners, *box]``. Differentiated in one pass: the cotangent of ``x`` is one
      concatenation of the groups' padded cotangents in learner order (the transposes of
      slices, added up, would write a zero-padded copy of ``x`` per group).
    """
    return tuple(_box(_rows_of(runs, x), box) for runs, box in groups)


def _split_fwd(x, groups):
    return split_groups(x, groups), jnp.zeros((0, *x.shape), x.dtype)


def _in_learner_order(runs: Sequence[Sequence[tuple[int, int]]], values: Sequence[jax.Array],
                      size: int, fill: Callable[[int], jax.Array]) -> jax.Array:
    """``[size, ...]`` from each group's ``values [learners, ...]`` (its learners ``runs``), and
    ``fill(n) [1, ...]`` for every learner in no group."""
    pieces, covered = [], set()
    for group_runs, v in zip(runs, values):
        start = 0
        for a, b in group_runs:
            pieces.append((a, v[start:start + b - a]))
            covered.update(range(a, b))
            start += b - a
    pieces += [(n, fill(n)) for n in range(size) if n not in covered]
    pieces.sort(key=lambda piece: piece[0])
    return jnp.concatenate([v for _, v in pieces])


def _split_bwd(groups, shape_of, cotangents):
    trailing = shape_of.shape[2:]
    return (_in_learner_order([runs for runs, _ in groups],
                              [_box(ct, trailing) for ct in cotangents], shape_of.shape[1],
                              lambda n: jnp.zeros((1, *trailing), shape_of.dtype)),)


split_groups.defvjp(_split_fwd, _split_bwd)


def _flat_box(stage: learners.Stage, box: learners.Stage) -> bool:
    """Whether ``box``'s dense or head kernels are a top-left block of ``stage``'s flat
    ``[in, out]`` kernels (true unless a multi-axis input or output shape shrinks)."""
    return stage.op in ("dense", "head") and all(
        len(b) == 1 or b == s for s, b in ((stage.in_shape, box.in_shape),
                                           (stage.out_shape, box.out_shape)))


def group_params(layout: PoolLayout, params: dict, tower: str, p: int) -> list[dict]:
    """Each stage group's parameters at a position, cut from its stacked leaves.

    Args:
      params: the position's stacked leaves ``{name: [N, *pool_shape]}``.

    Returns:
      per group (``layout.groups``) ``{name: [learners, *box]}``, the kernels flat where the
      stored ones are (``stored_shapes``), else ``[*in, *out]``.
    """
    stage = layout.stages[tower][p]
    padded = layout.param_shapes(tower, p)
    groups = layout.groups(tower, p)
    runs = [tuple(group.runs()) for group in groups]
    leaves = [{} for _ in groups]
    flat = all(_flat_box(stage, group.stage) for group in groups)
    for name, leaf in params.items():
        if flat:  # boxes of the flat kernels as stored
            boxes = [stored_shapes(group.stage)[name] for group in groups]
        else:  # boxes of the [*in, *out] kernels
            leaf = leaf.reshape(-1, *padded[name])
            boxes = [learners.stage_param_shapes(group.stage)[name] for group in groups]
        for g, part in enumerate(split_groups(leaf, tuple(zip(runs, boxes)))):
            leaves[g][name] = part
    return leaves


def run_position(layout: PoolLayout, params: dict, tower: str, p: int, x: jax.Array):
    """One position for every learner: each stage group stacked at its own padded shapes, the
    identity learners passing their input on, the absent ones giving zeros.

    Args:
      params: the position's stacked leaves ``{name: [N, *pool_shape]}``.
      x: ``[N, R, *in_shape]`` at the pool's padded input shape.

    Returns:
      ``[N, R, *out_shape]`` at the pool's padded output shape (a head returns ``(mean,
      logvar)``, each ``[N, R, latent]``).
    """
    stage = layout.stages[tower][p]
    status = layout.status[tower][p]
    groups = layout.groups(tower, p)
    runs = [tuple(group.runs()) for group in groups]
    leaves = group_params(layout, params, tower, p)
    inputs = split_groups(x, tuple((r, group.stage.in_shape) for r, group in zip(runs, groups)))
    outputs = [jax.tree.map(lambda v: _box(v, stage.out_shape), jax.vmap(functools.partial(
        learners.apply_stage, group.stage))(group_leaves, group_x))
        for group, group_leaves, group_x in zip(groups, leaves, inputs)]
    passes = (stage.op != "head" and len(stage.in_shape) == len(stage.out_shape)
              and stage.in_shape[:-1] == stage.out_shape[:-1])

    def fill(n: int) -> jax.Array:  # a learner of no group
        if status[n] == IDENTITY and passes:
            return _box(x[n:n + 1], stage.out_shape[-1:])
        return jnp.zeros((1, x.shape[1], *stage.out_shape), x.dtype)

    if stage.op == "head":
        return tuple(_in_learner_order(runs, [y[i] for y in outputs], len(status), fill)
                     for i in range(2))
    return _in_learner_order(runs, outputs, len(status), fill)


Mix = Callable[[str, int, jax.Array, list], jax.Array]


def run_tower(layout: PoolLayout, params: dict, tower: str, a: jax.Array,
              mix: Mix | None = None, caps: Sequence[int] | None = None):
    """Every learner through one tower on its own rows.

    Args:
      layout: the pool's layout.
      params: stacked learner parameters (``PoolLayout.stack`` structure, arrays).
      tower: ``"enc"`` or ``"dec"``.
      a: ``[N, R, *in_shape]``, the input of position 0 per learner.
      mix: optional ``mix(tower, p, a, inputs) -> mixed`` that adds connection projections to
        the input ``a`` of position ``p`` (``inputs``: the original inputs of positions 0..p,
        each on all the rows its producing position ran).
      caps: rows each position runs on (the first ``caps[p]``, nonincreasing); None: all.

    Returns:
      ``[N, R', *out_shape]`` with ``R'`` the last position's rows (the encoder returns
      ``(mean, logvar)``).
    """
    inputs = []
    for p in range(len(layout.stages[tower])):
        inputs.append(a)
        if caps is not None:
            a = a[:, :caps[p]]
        mixed = a if mix is None else mix(tower, p, a, inputs)
        a = run_position(layout, params[tower][p], tower, p, mixed)
    return a


def run_pool(layout: PoolLayout, params: dict, x: jax.Array, eps: jax.Array,
             mix: Mix | None = None, caps: Sequence[int] | None = None) -> dict:
    """Every learner as a VAE on its own rows, with per-row losses.

    Args:
      x: ``[N, R, H, W, C]`` images per learner.
      eps: ``[N, R, latent]`` each learner's standard normal noise (zeros: posterior means).
      mix: see ``run_tower``.
      caps: rows run at each chained position (encoder positions, then decoder positions;
        see ``dispatch.Layout``); None: all ``R``.

    Returns:
      dict of ``[N, R', ...]``: ``mean``, ``logvar``, ``z``, ``kl`` and ``log_ratio``
      (``log q(z | x) - log p(z)`` of the draw) on the rows the latent head ran, ``out``
      (logits or means) and ``rec`` (negative log-likelihood) on the rows the output stage
      ran; ``rec``, ``kl`` and ``log_ratio`` are ``[N, R']`` in nats.
    """
    posterior = encode_pool(layout, params, x, mix, caps)
    return decode_pool(layout, params, x, posterior, eps, mix, caps)


def encode_pool(layout: PoolLayout, params: dict, x: jax.Array, mix: Mix | None = None,
                caps: Sequence[int] | None = None) -> tuple[jax.Array, jax.Array]:
    """The encoder tower of ``run_pool``: each learner's posterior ``(mean, logvar)``, each
    ``[N, R', latent]`` (draws of the latents can then share it, ``decode_pool``)."""
    enc_caps = None if caps is None else caps[:layout.depths[0]]
    return run_tower(layout, params, "enc", x, mix, enc_caps)


def decode_alone(layout: PoolLayout, params: dict, n: int, z: jax.Array) -> jax.Array:
    """Learner n's own decoder at its real widths, sliced from the pool's padded parameters (no
    padding, no connections), on ``z [R, >= L_n]``; returns ``[R, *image]``."""
    member = layout.members[n]
    a = z[:, :member.spec.latent]
    for k, stage in enumerate(learners.stages(member.spec)["dec"]):
        a = learners.apply_stage(stage, layout.real_stage(params, "dec", n, k), a)
    return a


def decode_pool(layout: PoolLayout, params: dict, x: jax.Array,
                posterior: tuple[jax.Array, jax.Array], eps: jax.Array,
                mix: Mix | None = None, caps: Sequence[int] | None = None,
                source: jax.Array | None = None) -> dict:
    """The rest of ``run_pool`` from the posteriors ``encode_pool`` gave: one draw of every
    latent, the decoder tower and the losses (``run_pool``'s dict).

    ``source`` (``[R]`` int, dense rows only): every decoder decodes the latent of learner
    ``source[r]`` on row r (``bound.shared_latents``); ``z``, ``kl`` and ``log_ratio`` stay
    each learner's own."""
    mean, logvar = posterior
    dec_caps = None if caps is None else caps[layout.depths[0]:]
    mask = jnp.asarray(layout.latent_mask())
    real = mask[:, None, :]
    eps = eps[:, :mean.shape[1]]
    z = jnp.where(real, mean + jnp.exp(0.5 * logvar) * eps, 0.0)
    decoded = z if source is None else bound.shared_latents(z, source, mask)
    out = run_tower(layout, params, "dec", decoded, mix, dec_caps)
    rec = losses.nll(out, params["log_scale"][:, None], x[:, :out.shape[1]], layout.likelihood)
    return {"mean": mean, "logvar": logvar, "z": z, "out": out, "rec": rec,
            "kl": losses.kl_standard_normal(mean, logvar, real),
            "log_ratio": losses.log_density_ratio(eps, z, logvar, real)}
