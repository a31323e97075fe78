"""Projection connections between learners' stages, and their pruning (docs/design.md §2).

A connection ``(m, i) -> (n, j)`` linearly projects ``a[m, i]``, the ORIGINAL input of learner
m's stage at pool position ``i``, to the input size of learner n's stage at position ``j`` and
adds it there:  ``mixed[n, j] = a[n, j] + sum_kept P[(m,i)->(n,j)] a[m, i]``.

The potential set (ours, from the paper's rule): same tower, ``m != n``, ``0 <= j - i <= h``,
both stages real (not depth padding). Encoder position 0 is excluded as a source: ``a[m, 0]`` is
the shared image x, not a feature of learner m, and a projection of x would only duplicate the
target's own first layer. The decoder's position 0 source is learner m's latent z_m.

Flat sources use a dense projection (kernel ``[*src, *tgt]``); feature maps use a 1x1
convolution (kernel ``[C_src, C_tgt]``) after resampling to the target's resolution (average
pooling down, nearest-neighbour up): both are linear maps.

Pruning (ours): iterative magnitude pruning on each connection's Frobenius norm, with the cubic
schedule of Zhu & Gupta (2017) from all kept down to a kept fraction rho. Pruned connections are
zeroed and masked; they never come back.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from baim_jax.core import learners
from baim_jax.core.pool import REAL, PoolLayout


@dataclasses.dataclass(frozen=True, order=True)
class Connection:
    """``a[src, src_stage] -> input of tgt's tgt_stage`` (stage indices are the learners' own)."""

    tower: str
    src: int
    src_stage: int
    tgt: int
    tgt_stage: int

    def to_json(self) -> list:
        return [self.tower, self.src, self.src_stage, self.tgt, self.tgt_stage]


def potential_set(layout: PoolLayout, h: int,
                  towers: tuple[str, ...] = learners.TOWERS) -> list[Connection]:
    """All connections the rule allows inside ``towers``, sorted (tower, src, src_stage, tgt,
    tgt_stage)."""
    if h < 0:
        raise ValueError(f"h: must be >= 0, got {h}")
    out = []
    for tower in towers:
        status, index = layout.status[tower], layout.stage_index[tower]
        depth = len(layout.stages[tower])
        first = 1 if tower == "enc" else 0
        for i in range(first, depth):
            for j in range(i, min(depth, i + h + 1)):
                for m in range(layout.size):
                    if status[i, m] != REAL:
                        continue
                    for n in range(layout.size):
                        if n != m and status[j, n] == REAL:
                            out.append(Connection(tower, m, index[i][m], n, index[j][n]))
    return sorted(out)


def kernel_shape(src: tuple[int, ...], tgt: tuple[int, ...]) -> tuple[int, ...]:
    """Kernel shape projecting features ``src`` onto ``tgt`` (dense if src is flat, else 1x1)."""
    if len(src) == 1:
        return src + tgt
    if len(tgt) == 1:
        raise ValueError("connections from a feature map to a flat input are not defined")
    return (src[-1], tgt[-1])


@dataclasses.dataclass(frozen=True)
class Group:
    """Connections sharing (tower, source position i, target position j) and the real shapes
    of their source and target; stacked together, each kernel of its own exact shape (no
    padding: a projection costs what its learners' real widths need).

    Attributes:
      index: positions of the group's connections in ``ConnectionSet.connections``.
      src, tgt: ``[G]`` learner indices (numpy).
      src_shape, tgt_shape: the real stage-input shapes of the sources and the targets.
      tgt_pad: the pool's padded stage-input shape at position j (projections are padded to
        it with zeros before they are added).
    """

    tower: str
    i: int
    j: int
    index: tuple[int, ...]
    src: np.ndarray
    tgt: np.ndarray
    src_shape: tuple[int, ...]
    tgt_shape: tuple[int, ...]
    tgt_pad: tuple[int, ...]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return kernel_shape(self.src_shape, self.tgt_shape)


class ConnectionSet:
    """The (static) connections of a pool, grouped by stage positions."""

    def __init__(self, layout: PoolLayout, connections: list[Connection]):
        self.layout = layout
        self.connections = tuple(connections)
        by_key: dict[tuple, list[int]] = {}
        for c_idx, c in enumerate(self.connections):
            i = layout.position(c.tower, c.src, c.src_stage)
            j = layout.position(c.tower, c.tgt, c.tgt_stage)
            if j < i:
                raise ValueError(f"connection {c}: runs from position {i} back to {j}")
            by_key.setdefault((c.tower, i, j, self.real_shapes(c)), []).append(c_idx)
        self.groups = tuple(
            Group(t, i, j, tuple(idx),
                  np.array([self.connections[k].src for k in idx], np.int32),
                  np.array([self.connections[k].tgt for k in idx], np.int32),
                  src_shape, tgt_shape, layout.stages[t][j].in_shape)
            for (t, i, j, (src_shape, tgt_shape)), idx in sorted(by_key.items()))

    def __len__(self) -> int:
        return len(self.connections)

    def __eq__(self, other) -> bool:
        return (isinstance(other, ConnectionSet) and self.layout == other.layout
                and self.connections == other.connections)

    def __hash__(self) -> int:
        return hash((self.layout, self.connections))

    def real_shapes(self, c: Connection) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The real input shapes of the connection's source and target stages."""
        src = learners.stages(self.layout.members[c.src].spec)[c.tower][c.src_stage].in_shape
        tgt = learners.stages(self.layout.members[c.tgt].spec)[c.tower][c.tgt_stage].in_shape
        return tuple(src), tuple(tgt)

    def real_kernel_shape(self, c: Connection) -> tuple[int, ...]:
        return kernel_shape(*self.real_shapes(c))

    def param_count(self, c: Connection) -> int:
        return math.prod(self.real_kernel_shape(c))

    def zeros(self) -> list[jax.Array]:
        """Zero-initialised kernels, one ``[G, *kernel]`` array per group."""
        return [jax.device_put(np.zeros((len(g.index), *g.kernel_shape), np.float32))
                for g in self.groups]

    def stack(self, kernels: list) -> list[jax.Array]:
        """Per-connection kernels (in ``connections`` order) as group arrays."""
        return [jax.device_put(np.stack([np.asarray(kernels[k], np.float32) for k in g.index]))
                for g in self.groups]

    def unstack(self, group_kernels: list) -> list[np.ndarray]:
        """Each connection's kernel, in ``connections`` order."""
        out: list = [None] * len(self.connections)
        for g, arr in zip(self.groups, group_kernels):
            arr = np.asarray(arr)
            for row, k in enumerate(g.index):
                out[k] = arr[row]
        return out

    def flat_arrays(self) -> dict[str, np.ndarray]:
        """Per connection, in group order (as the kept masks concatenate): src, tgt, tower
        (0 enc, 1 dec), source position i, target position j; ``[P]`` each."""
        cols = {k: [] for k in ("src", "tgt", "tower", "i", "j")}
        for g in self.groups:
            size = len(g.index)
            cols["src"].append(g.src)
            cols["tgt"].append(g.tgt)
            cols["tower"].append(np.full(size, learners.TOWERS.index(g.tower), np.int32))
            cols["i"].append(np.full(size, g.i, np.int32))
            cols["j"].append(np.full(size, g.j, np.int32))
        return {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in cols.items()}


def resample(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Average-pools or nearest-upsamples ``[..., h, w, c]`` to ``[..., *size, c]``."""
    h, w = x.shape[-3:-1]
    if (h, w) == tuple(size):
        return x
    if h > size[0]:
        f = h // size[0]
        lead = x.shape[:-3]
        x = x.reshape(*lead, size[0], f, size[1], f, x.shape[-1])
        return x.mean(axis=(-4, -2))
    f = size[0] // h
    return jnp.repeat(jnp.repeat(x, f, axis=-3), f, axis=-2)


def project(group: Group, kernel: jax.Array, src_feat: jax.Array) -> jax.Array:
    """Applies a group's projections, padded with zeros to the pool's target shape.

    Args:
      group: the group.
      kernel: ``[G, *kernel]`` (pruned ones zeroed).
      src_feat: ``[G, R, *src_shape]`` source features (real shape), one row set per
        connection.

    Returns:
      ``[G, R, *tgt_pad]``.
    """
    if len(group.src_shape) == 1:
        out = jnp.einsum("grd,gd...->gr...", src_feat, kernel)
    else:
        x = resample(src_feat, group.tgt_shape[:2])
        out = jnp.einsum("grhwc,gcd->grhwd", x, kernel)
    pad = [(0, 0), (0, 0)] + [(0, p - r) for r, p in zip(group.tgt_shape, group.tgt_pad)]
    return jnp.pad(out, pad) if any(p for _, p in pad) else out


@jax.jit
def norms(kernels: list[jax.Array]) -> jax.Array:
    """Frobenius norm of every connection, ``[P]`` in group order (one compiled call: a
    pruning step runs it on every group's kernels)."""
    parts = [jnp.sqrt(jnp.sum(k.reshape(k.shape[0], -1) ** 2, axis=1)) for k in kernels]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,))


@jax.jit
def zero_pruned(kernels: list[jax.Array], kept: list[jax.Array]) -> list[jax.Array]:
    """Each group's kernels ``[G, *kernel]`` times its kept mask ``[G]`` (one compiled call)."""
    return [k * m.astype(k.dtype).reshape((-1,) + (1,) * (k.ndim - 1))
            for k, m in zip(kernels, kept)]


def kept_fraction(step: int, rho: float, start: int, end: int) -> float:
    """Cubic pruning schedule: 1 before ``start``, ``rho`` from ``end`` on."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho: must be in (0, 1], got {rho}")
    if step <= start:
        return 1.0
    progress = min(1.0, (step - start) / max(end - start, 1))
    return rho + (1.0 - rho) * (1.0 - progress) ** 3


def prune_mask(norm: np.ndarray, kept: np.ndarray, n_keep: int) -> np.ndarray:
    """Keeps the ``n_keep`` largest-norm connections among those still kept.

    Ties break towards the lower index (stable), so the result is deterministic.

    Args:
      norm: ``[P]`` Frobenius norms.
      kept: ``[P]`` bool, currently kept.
      n_keep: how many to keep (never more than are kept now).

    Returns:
      ``[P]`` bool, a subset of ``kept``.
    """
    score = np.where(kept, np.asarray(norm, np.float64), -np.inf)
    order = np.argsort(-score, kind="stable")
    out = np.zeros_like(kept, dtype=bool)
    out[order[: min(n_keep, int(kept.sum()))]] = True
    return out & kept
