"""The bottom-up BAIM: learner pool + HierGate + projection connections (paper Sec. III, Fig. 3).

``BAIM`` holds the stacked learner pool (``LearnerParam``), the gate and the prior over each
squad's learners (``GateParam``, ``PriorParam``) and the connection kernels
(``ConnectionParam``) as NNX variables, plus non-trainable state: padding masks and
kept-connection masks. Its forward advances all learners stage by stage in lockstep
(docs/design.md §2); which learners run on which rows is the dispatch layout (``dispatch.py``):
``"dense"`` (the reference) or ``"capacity"`` (the fast path). Its loss is the bound of
docs/design.md §3b (``bound.py``): every latent a selected decoder consumes pays its KL, each
latent has its own noise, and the gate pays ``KL(w || pi)``; with ``latent = "shared"`` a
path's decoders all decode its learner's latent (one pass per selected slot).

A ``TaskModel`` (``partition.py``) is the same machine with one squad, its feeders and its kept
connections only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baim_jax.core import bound, connections, dispatch, gates, learners, losses
from baim_jax.core.config import BAIMConfig
from baim_jax.core.pool import (
    Member,
    PoolLayout,
    decode_alone,
    decode_pool,
    encode_pool,
    run_pool,
    run_tower,
)
from baim_jax.core.spec import ModelSpec, ParamCounts, learner_entries


class LearnerParam(nnx.Param):
    """Parameters of the learners (the uploaded edge models)."""


class GateParam(nnx.Param):
    """Parameters of the HierGate (phi, LSGates, TSGate)."""


class ConnectionParam(nnx.Param):
    """Kernels of the projection connections."""


class KeptMask(nnx.Variable):
    """Which connections survive pruning ``[G]`` per group."""


class NoiseStreams(nnx.Variable):
    """Each learner's latent noise stream ``[N]`` int32 (``pool.PoolLayout.streams``), held as
    an array so that task models which differ only in their streams share compiled code."""


class PriorParam(GateParam):
    """Logits ``[N]`` of the prior pi over each squad's learners: the mixture's weights, from
    which the sampler draws a learner (``bound.log_prior``). Trained with the bound."""


def _check_params(spec: learners.LearnerSpec, params: Any, where: str, keep=None) -> None:
    """Refuses uploaded parameters that do not match their declared spec or are not finite."""
    own = learners.stages(spec)
    for t_idx, tower in enumerate(learners.TOWERS):
        n_keep = len(own[tower]) if keep is None else keep[t_idx]
        got = params.get(tower) if isinstance(params, dict) else None
        if got is None or len(got) < n_keep:
            raise ValueError(f"{where}: the {tower} tower has {0 if got is None else len(got)} "
                             f"stages, its spec declares {n_keep}")
        for k in range(n_keep):
            for name, shape in learners.stage_param_shapes(own[tower][k]).items():
                leaf = got[k].get(name) if isinstance(got[k], dict) else None
                if leaf is None or tuple(np.shape(leaf)) != tuple(shape):
                    raise ValueError(
                        f"{where}: {tower} stage {k} '{name}' has shape "
                        f"{None if leaf is None else tuple(np.shape(leaf))}, spec says {shape}")
                if not np.all(np.isfinite(np.asarray(leaf))):
                    raise ValueError(f"{where}: {tower} stage {k} '{name}' has non-finite values")
    if spec.likelihood == "gaussian" and (
            "log_scale" not in params or not np.isfinite(np.asarray(params["log_scale"])).all()):
        raise ValueError(f"{where}: 'log_scale' is missing or not finite")


def _check_gate(gate: Any, layout: PoolLayout, gated: int, tasks: int, features: int) -> None:
    """Refuses gate parameters whose shapes do not fit the pool."""
    h, w, c = layout.image_shape
    want = {("phi", "kernel"): [(h, w, c, features)], ("phi", "bias"): [(features,)],
            ("ls", "kernel"): [(features, gated), (features, layout.size)],
            ("ls", "bias"): [(gated,), (layout.size,)],
            ("ts", "kernel"): [(features, tasks)], ("ts", "bias"): [(tasks,)]}
    for (part, name), shapes in want.items():
        leaf = gate.get(part, {}).get(name) if isinstance(gate, dict) else None
        if leaf is None or tuple(np.shape(leaf)) not in shapes:
            raise ValueError(f"gate '{part}/{name}': shape "
                             f"{None if leaf is None else tuple(np.shape(leaf))}, "
                             f"expected {shapes[0]}")
        if not np.isfinite(np.asarray(leaf)).all():
            raise ValueError(f"gate '{part}/{name}': non-finite values")


def _pad_gate_columns(gate: dict, size: int) -> dict:
    """Gives feeders (saved without LSGate columns) zero columns, up to ``size``."""
    short = size - np.shape(gate["ls"]["bias"])[0]
    if short == 0:
        return gate
    kernel, bias = np.asarray(gate["ls"]["kernel"]), np.asarray(gate["ls"]["bias"])
    ls = {"kernel": jax.device_put(np.pad(kernel, [(0, 0), (0, short)])),
          "bias": jax.device_put(np.pad(bias, [(0, short)]))}
    return {**gate, "ls": ls}


def init_learners(members: Sequence[Member], key: jax.Array) -> list[learners.Params]:
    """Fresh parameters of every member (drawn on the host, see ``learners.numpy_rng``)."""
    return [learners.init_learner(m.spec, jax.random.fold_in(key, n))
            for n, m in enumerate(members)]


def initial_prior(layout: PoolLayout, how: str) -> np.ndarray:
    """Prior logits ``[N]`` of a fresh BAIM (``BAIMConfig.prior_init``): zeros, uniform over
    each squad; or ``"params"``, each gated learner's log parameter count, so that pi is
    proportional to it within its squad (feeders 0: never drawn)."""
    if how == "uniform":
        return np.zeros(layout.size, np.float32)
    return np.array([np.log(learners.count_params(m.spec)) if m.squad is not None else 0.0
                     for m in layout.members], np.float32)


def sample_rows(n: int) -> int:
    """The rows a sampler draws for ``n`` images: the least power of two >= n.

    One compiled sampler then serves every n of a power-of-two bucket, and a request never
    computes more than twice the rows it asks for. Row i's noise and learner draw do not
    depend on the number of rows drawn (``jax.random`` draws by position), so the first n rows
    are the n images a sampler of exactly n rows would give.
    """
    return 1 << (int(n) - 1).bit_length()


def _is_var(v) -> bool:
    return isinstance(v, nnx.Variable)


def values(tree):
    """The arrays of a tree of NNX variables."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=_is_var)


class BAIM(nnx.Module):
    """The assembled big model.

    Build one with ``BAIM.assemble`` (from edge uploads or fresh specs); ``partition`` cuts it
    into ``TaskModel``s; ``baim_jax.save`` writes it and ``baim_jax.load`` reopens it.
    """

    kind = "baim"

    def __init__(self, members: Sequence[Member], tasks: Sequence[str], config: BAIMConfig,
                 *, rngs: nnx.Rngs, learner_params: Sequence[learners.Params] | None = None,
                 conns: Sequence[connections.Connection] | None = None,
                 connection_kernels: Sequence[Any] | None = None,
                 kept: Sequence[bool] | None = None, gate_params: dict | None = None,
                 prior_logits: Any = None):
        config.validate()
        self.config = config
        self.tasks = tuple(tasks)
        self.layout = PoolLayout(list(members))
        dispatch.check_capacity_factor(config.capacity_factor, sum(self.layout.depths))
        squads = [m.squad for m in self.layout.members]
        for t, name in enumerate(self.tasks):
            size = squads.count(t)
            if size == 0:
                raise ValueError(f"tasks: task {name!r} has no learner")
            if config.k > size:
                raise ValueError(
                    f"k: {config.k} is larger than squad {name!r}, which has {size} learners")
        bad = [s for s in squads if s is not None and not 0 <= s < len(self.tasks)]
        if bad:
            raise ValueError(f"squads: {bad[0]} is not a task index in 0..{len(self.tasks) - 1}")
        gated = [s is not None for s in squads]
        if gated != sorted(gated, reverse=True):
            raise ValueError("members: gated learners must come before feeders")
        self.num_gated = sum(gated)
        self.streams = NoiseStreams(jax.device_put(self.layout.streams.astype(np.int32)))

        if learner_params is None:
            learner_params = init_learners(self.layout.members, rngs.params())
        for n, (m, p) in enumerate(zip(self.layout.members, learner_params)):
            _check_params(m.spec, p, f"learner {n}", m.keep)
        stacked, _ = self.layout.stack(list(learner_params))
        self.learners = nnx.data(jax.tree.map(LearnerParam, stacked))

        self.conns = connections.ConnectionSet(
            self.layout, connections.potential_set(self.layout, config.h, config.connect)
            if conns is None else list(conns))
        kernels = (self.conns.zeros() if connection_kernels is None
                   else self.conns.stack(list(connection_kernels)))
        self.connections = nnx.data([ConnectionParam(k) for k in kernels])
        kept_flat = np.ones(len(self.conns), bool) if kept is None else np.asarray(kept, bool)
        self.kept = nnx.data([KeptMask(jax.device_put(kept_flat[list(g.index)]))
                              for g in self.conns.groups])

        if gate_params is None:
            gate_params = self._init_gate(rngs.params())
        _check_gate(gate_params, self.layout, self.num_gated, len(self.tasks),
                    config.feature_dim)
        gate_params = _pad_gate_columns(gate_params, self.layout.size)
        self.gate = nnx.data(jax.tree.map(GateParam, gate_params))
        if prior_logits is None:
            prior_logits = initial_prior(self.layout, config.prior_init)
        if np.shape(prior_logits) != (self.layout.size,):
            raise ValueError(f"prior: shape {np.shape(prior_logits)}, expected "
                             f"({self.layout.size},)")
        if not np.isfinite(np.asarray(prior_logits)).all():
            raise ValueError("prior: non-finite values")
        self.prior = PriorParam(jax.device_put(np.asarray(prior_logits, np.float32)))
        self.order = tuple(range(self.layout.size))

    # ----------------------------------------------------------------------------- assembly

    @classmethod
    def assemble(cls, specs: Sequence[learners.LearnerSpec], squads: Sequence[int],
                 tasks: Sequence[str], config: BAIMConfig | None = None, *, seed: int = 0,
                 params: Sequence[learners.Params] | None = None) -> "BAIM":
        """Assembles a BAIM from learners (fresh, or uploaded ``params``).

        Learners are ordered by squad (stable), so the gate's N-vector is cut into contiguous
        task segments; the BAIM's learner ``n`` is upload ``order[n]``.
        """
        config = config or BAIMConfig()
        if len(squads) != len(specs):
            raise ValueError(f"squads: {len(squads)} given for {len(specs)} learners")
        if params is not None and len(params) != len(specs):
            raise ValueError(f"params: {len(params)} uploads for {len(specs)} learner specs")
        order = sorted(range(len(specs)), key=lambda n: squads[n])
        members = [Member(specs[n], int(squads[n])) for n in order]
        model = cls(members, tasks, config, rngs=nnx.Rngs(seed),
                    learner_params=None if params is None else [params[n] for n in order])
        model.order = tuple(order)
        return model

    def _init_gate(self, key: jax.Array) -> dict:
        return gates.init_gate(learners.numpy_rng(key), self.layout.image_shape,
                               self.config.feature_dim,
                           self.layout.size, len(self.tasks))

    # ------------------------------------------------------------------------------ forward

    def _mix(self, tower: str, j: int, a: jax.Array, inputs: list, layout: dispatch.Layout):
        """``mixed[n, j] = a[n, j] + sum of kept projections into (n, j)``; a: ``[N, R, ...]``."""
        into: dict[int, list] = {}
        for g_idx, g in enumerate(self.conns.groups):
            if g.tower != tower or g.j != j:
                continue
            src = inputs[g.i][(slice(None), slice(None)) + tuple(slice(0, r) for r in g.src_shape)]
            rows = src.shape[1]
            src = jnp.concatenate([src, jnp.zeros_like(src[:, :1])], axis=1)
            examples = layout.rows_of[g.tgt, :a.shape[1]]
            slots = layout.slot_of[examples, g.src[:, None]]
            feat = src[g.src[:, None], jnp.minimum(slots, rows)]
            kept = self.kept[g_idx][...].astype(a.dtype)
            kernel = self.connections[g_idx][...] * kept.reshape((-1,) + (1,) * len(g.kernel_shape))
            proj = connections.project(g, kernel, feat)
            for row, n in enumerate(g.tgt.tolist()):  # static: no scatter
                into.setdefault(n, []).append(proj[row])
        if not into:
            return a
        zero = jnp.zeros_like(a[0])
        return a + jnp.stack([sum(into[n][1:], into[n][0]) if n in into else zero
                              for n in range(a.shape[0])])

    def _tower(self, tower: str, a: jax.Array, layout: dispatch.Layout):
        caps = layout.caps[self.layout.depths[0]:] if tower == "dec" else layout.caps
        return run_tower(self.layout, values(self.learners), tower, a,
                         lambda t, j, a, inputs: self._mix(t, j, a, inputs, layout), caps)

    def _latent_mask(self) -> jax.Array:
        return jnp.asarray(self.layout.latent_mask())

    def _buffers(self, x: jax.Array, eps: jax.Array, layout: dispatch.Layout) -> dict:
        """Runs every learner on its buffer rows (``eps [N, B, L]``, each learner's own noise).
        Returns ``[N, R, ...]`` arrays and losses."""
        return run_pool(self.layout, values(self.learners), dispatch.gather_rows(x, layout.rows_of),
                        dispatch.gather_own_rows(eps, layout.rows_of),
                        lambda t, j, a, inputs: self._mix(t, j, a, inputs, layout), layout.caps)

    def _shared_buffers(self, x: jax.Array, eps: jax.Array, selected: jax.Array,
                        layout: dispatch.Layout) -> dict:
        """``_buffers`` when paths share their latent (dense ``layout``): one decoder pass per
        selected slot, each computing that slot's path. ``out [N, B, ...]`` and ``rec
        [N, B]`` hold path n's output on row b (zero where n is not selected); ``kl`` is
        each learner's own."""
        params = values(self.learners)
        images = dispatch.gather_rows(x, layout.rows_of)

        def mix(t, j, a, inputs):
            return self._mix(t, j, a, inputs, layout)

        posterior = encode_pool(self.layout, params, images, mix)
        _, paths = jax.lax.top_k(selected.astype(jnp.float32), self.config.k)   # [B, K]
        rows = jnp.arange(x.shape[0])
        outs, recs = [], []
        for slot in range(self.config.k):
            buf = decode_pool(self.layout, params, images, posterior, eps, mix,
                              source=paths[:, slot])
            outs.append(buf["out"][paths[:, slot], rows])
            recs.append(buf["rec"][paths[:, slot], rows])
        onehot = jax.nn.one_hot(paths, self.layout.size, dtype=x.dtype)        # [B, K, N]
        return {**buf, "out": jnp.einsum("bkn,kb...->nb...", onehot, jnp.stack(outs)),
                "rec": jnp.einsum("bkn,kb->nb", onehot, jnp.stack(recs))}

    def _layout(self, selected: jax.Array, path: str, dropless: bool) -> dispatch.Layout:
        """The rows each learner runs (``path``: ``"dense"`` or ``"capacity"``; a model whose
        paths share their latent always runs dense)."""
        batch, num = selected.shape
        depths = self.layout.depths
        if path == "dense" or self.config.latent == "shared":
            return dispatch.dense_layout(batch, num, sum(depths))
        prefixes = dispatch.needed_prefixes(selected, self.conns.flat_arrays(),
                                            self.kept_by_group(), depths)
        caps = dispatch.capacities(batch, self.config.k, num,
                            None if dropless else self.config.capacity_factor, sum(depths))
        return dispatch.capacity_layout(dispatch.chained_depth(prefixes), caps)

    def _noise(self, rng: jax.Array | None, batch: int) -> jax.Array:
        """Each learner's latent noise ``[N, batch, L]`` (zeros without a key: posterior means)."""
        if rng is None:
            return jnp.zeros((self.layout.size, batch, self.layout.latent))
        return bound.latent_noise(rng, self.streams[...], batch, self.layout.latent)

    def consumed(self) -> jax.Array:
        """``[N, N]`` bool: row n marks the latents learner n's path consumes
        (``bound.consumed``; the diagonal when paths share their latent)."""
        if self.config.latent == "shared":
            return jnp.eye(self.layout.size, dtype=bool)
        return bound.consumed(self.conns.flat_arrays(), self.kept_by_group(), self.layout.depths,
                              self.layout.size)

    def log_prior(self) -> jax.Array:
        """``log pi`` ``[N]`` over each squad's learners (-inf for feeders)."""
        return bound.log_prior(self.prior[...], jnp.asarray(self.layout.segment_of))

    def route(self, x: jax.Array, task=None, *, rng=None, train=False,
              selected=None) -> gates.GateOutput:
        """The HierGate's routing of ``x [B, H, W, C]`` (see ``gates.hier_gate``)."""
        gate = values(self.gate)
        noise = self.config.noise_std if train else 0.0
        return gates.hier_gate(gate, x, segment_of=jnp.asarray(self.layout.segment_of),
                               k=self.config.k, gate=self.config.gate, task=task,
                               noise_std=noise, rng=rng, selected=selected)

    def forward(self, x: jax.Array, task=None, *, rng: jax.Array | None = None,
                train: bool = False, dispatch: str | None = None,
                selected: jax.Array | None = None, dropless: bool = False) -> dict:
        """Full forward: routing, learners on their rows, combination and the bound.

        Args:
          x: ``[B, H, W, C]`` in [0, 1].
          task: ``[B]`` int task ids, or None (the TSGate chooses).
          rng: key for the latent noise (and gate noise in training); None: posterior means
            (then ``nelbo`` is not a bound).
          train: adds the gate's noise.
          dispatch: overrides the config's dispatch (``"dense"`` or ``"capacity"``).
          selected: ``[B, N]`` imposed learner choice (benchmarks, tests).
          dropless: ignore ``capacity_factor`` (capacity B): what inference and evaluation use,
            so that reported outputs and losses never miss a dropped learner.

        Returns:
          dict with ``recon`` ``[B, H, W, C]`` (mean image); the bound's parts ``rec``
          (reconstruction), ``kl`` (every consumed latent's KL), ``gate_kl`` (``KL(w || pi)``)
          and their sum ``nelbo``, each ``[B]`` nats; ``gate`` (GateOutput), ``dropped`` and
          the auxiliary losses.
        """
        rng_gate, rng_eps = (None, None) if rng is None else jax.random.split(rng)
        out = self.route(x, task, rng=rng_gate, train=train, selected=selected)
        layout = self._layout(out.selected, dispatch or self.config.dispatch, dropless)
        eps = self._noise(rng_eps, x.shape[0])
        buf = (self._shared_buffers(x, eps, out.selected, layout)
               if self.config.latent == "shared" else self._buffers(x, eps, layout))
        seg = jnp.asarray(self.layout.segment_of)
        return {**self._combine(buf, out, layout), "gate": out, "dropped": layout.dropped,
                "load_balance": gates.load_balancing_loss(out, seg, len(self.tasks), self.config.k),
                "z_loss": gates.router_z_loss(out)}

    def _combine(self, buf: dict, out: gates.GateOutput, layout: dispatch.Layout) -> dict:
        """The mean image and the bound's parts ``[B]`` from the learners' buffers."""
        weights = dispatch.surviving_weights(out.weights, out.selected, layout)
        recon = dispatch.combine(losses.pixel_mean(buf["out"], self.layout.likelihood), weights,
                                 layout)
        rec = dispatch.combine(buf["rec"], weights, layout)
        # Latent m's KL counts once for every selected path that consumes z_m, by its weight.
        kl = dispatch.combine(buf["kl"], weights @ self.consumed().astype(weights.dtype), layout)
        gate_kl = bound.gate_kl(weights, self.log_prior())
        return {"recon": recon, "rec": rec, "kl": kl, "gate_kl": gate_kl,
                "nelbo": rec + kl + gate_kl}

    def log_weights(self, x: jax.Array, task: jax.Array, rngs: jax.Array) -> tuple:
        """Importance draws for every learner of each row's squad
        (``bound.mixture_log_likelihood``), one per key of ``rngs``.

        Every learner of the task's squad runs (not only the gate's top K), each path on its
        own posterior draws of the latents it consumes. The encoders run once; each draw
        decodes (once per gated learner when paths share their latent).

        Args:
          x: ``[B, H, W, C]``; task: ``[B]`` int task ids; rngs: ``[k]`` keys, one a draw.

        Returns:
          ``(log_w, log_pi)``: ``[k, B, N]`` ``log p_n(x | z) + sum_{m in C(n)}
          (log p(z_m) - log q(z_m | x))`` and ``[B, N]`` ``log pi_n``, both -inf outside the
          row's squad.
        """
        seg = jnp.asarray(self.layout.segment_of)
        in_squad = gates.segment_mask(seg, task)
        layout = self._layout(in_squad, self.config.dispatch, dropless=True)
        params = values(self.learners)
        images = dispatch.gather_rows(x, layout.rows_of)

        def mix(t, j, a, inputs):
            return self._mix(t, j, a, inputs, layout)

        posterior = encode_pool(self.layout, params, images, mix, layout.caps)
        consumed = self.consumed().T

        def shared_draw(rng):
            eps = self._noise(rng, x.shape[0])

            def path(n):
                buf = decode_pool(self.layout, params, images, posterior, eps, mix,
                                  source=jnp.full(x.shape[:1], n))
                return buf["rec"][n] + buf["log_ratio"][n]                       # [B]

            gated = -jax.lax.map(path, jnp.arange(self.num_gated)).T           # [B, gated]
            feeders = jnp.full((x.shape[0], self.layout.size - self.num_gated), -jnp.inf)
            return jnp.where(in_squad, jnp.concatenate([gated, feeders], axis=1), -jnp.inf)

        def draw(rng):
            eps = dispatch.gather_own_rows(self._noise(rng, x.shape[0]), layout.rows_of)
            buf = decode_pool(self.layout, params, images, posterior, eps, mix, layout.caps)
            rec = dispatch.row_values(buf["rec"], layout)
            ratio = dispatch.row_values(buf["log_ratio"], layout)
            return jnp.where(in_squad, -rec - ratio @ consumed.astype(ratio.dtype), -jnp.inf)

        log_pi = jnp.broadcast_to(self.log_prior(), in_squad.shape)
        draws = shared_draw if self.config.latent == "shared" else draw
        return bound.map_draws(draws, rngs), jnp.where(in_squad, log_pi, -jnp.inf)

    def loss(self, x: jax.Array, task: jax.Array, rng: jax.Array,
             selected: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Training objective: mean negative bound + weighted auxiliary losses.

        Args:
          x: ``[B, H, W, C]``; task: ``[B]`` int task labels (routing by id, TSGate supervised).
          rng: latent (and gate) noise.
          selected: optional imposed ``[B, N]`` learner choice (benchmarks).

        Returns:
          ``(total, metrics)``: the scalar objective, and scalars ``loss``, ``nelbo``, ``rec``,
          ``kl``, ``gate_kl``, ``load_balance``, ``z_loss``, ``task_loss``, ``dropped``.
        """
        out = self.forward(x, task, rng=rng, train=True, selected=selected)
        cfg = self.config
        ts = gates.task_loss(out["gate"], task) if len(self.tasks) > 1 else jnp.zeros(())
        total = (jnp.mean(out["nelbo"]) + cfg.load_balance_weight * out["load_balance"]
                 + cfg.z_loss_weight * out["z_loss"] + cfg.task_loss_weight * ts)
        metrics = {"loss": total, "load_balance": out["load_balance"], "z_loss": out["z_loss"],
                   "task_loss": ts, "dropped": out["dropped"],
                   **{k: jnp.mean(out[k]) for k in bound.PARTS}}
        return total, metrics

    def reinit_learners(self, seed: int) -> None:
        """Re-initialises every learner at random with the same specs (the scratch strategy)."""
        stacked, _ = self.layout.stack(init_learners(self.layout.members, jax.random.key(seed)))
        for var, value in zip(jax.tree.leaves(self.learners, is_leaf=_is_var),
                              jax.tree.leaves(stacked)):
            var[...] = value

    def prune_connections(self, kept_fraction: float) -> int:
        """Iterative magnitude pruning step: keeps ``ceil(kept_fraction * potential)`` of the
        connections by Frobenius norm (never reviving one) and zeroes the rest.

        Returns:
          the number of connections kept.
        """
        if not 0.0 < kept_fraction <= 1.0:
            raise ValueError(f"kept_fraction: must be in (0, 1], got {kept_fraction}")
        if not self.conns.groups:
            return 0
        norm = np.asarray(connections.norms([k[...] for k in self.connections]))
        kept = np.asarray(self.kept_by_group())
        n_keep = int(np.ceil(kept_fraction * len(self.conns) - 1e-9))
        new = connections.prune_mask(norm, kept, n_keep)
        flat = np.zeros(len(self.conns), bool)  # group order -> conns.connections order
        flat[[i for g in self.conns.groups for i in g.index]] = new
        self.set_kept(flat, zero=True)
        return int(new.sum())

    def set_kept(self, kept: np.ndarray, *, zero: bool = False) -> None:
        """Sets which connections are kept, ``[P]`` bool in ``conns.connections`` order.

        Args:
          kept: the mask.
          zero: also zero the kernels of the connections not kept (as pruning does); else
            they stay, and a connection kept again projects as before.
        """
        kept = np.asarray(kept, bool)
        if kept.shape != (len(self.conns),):
            raise ValueError(f"kept: shape {kept.shape}, expected ({len(self.conns)},)")
        parts = [jax.device_put(kept[list(g.index)]) for g in self.conns.groups]
        for kvar, part in zip(self.kept, parts):
            kvar[...] = part
        if zero:
            zeroed = connections.zero_pruned([var[...] for var in self.connections], parts)
            for var, kernel in zip(self.connections, zeroed):
                var[...] = kernel

    def padding_max_abs(self) -> float:
        """Largest magnitude among the pool's padded learner parameters (0 when none leaks)."""
        _, masks = self.layout.stack(self.layout.unstack(values(self.learners)))
        return max(float(np.max(np.abs(np.where(m, 0.0, np.asarray(v))), initial=0.0))
                   for v, m in zip(jax.tree.leaves(values(self.learners)),
                                   jax.tree.leaves(masks)))

    def compacted(self) -> "BAIM":
        """The same model without its pruned connections (their parameters are gone, so the
        forward no longer spends compute on them). Optimiser state does not carry over."""
        tree = self.export_tree()
        kept = self.kept_flat()
        conns = [c for c, k in zip(self.conns.connections, kept) if k]
        kernels = [k for k, on in zip(tree["connections"], kept) if on]
        model = type(self)(self.layout.members, self.tasks, self.config, rngs=nnx.Rngs(0),
                           learner_params=tree["learners"], conns=conns,
                           connection_kernels=kernels, gate_params=tree["gate"],
                           prior_logits=tree["prior"])
        model.order = self.order
        return model

    # ------------------------------------------------------------------------- public API

    def task_ids(self, task, batch: int) -> jax.Array | None:
        """Resolves a task given as None, a name, an int or ``[B]`` ints; refuses unknown ones."""
        if task is None:
            return None
        if isinstance(task, str):
            if task not in self.tasks:
                raise ValueError(f"task: unknown task {task!r}; this model has {list(self.tasks)}")
            return jnp.full((batch,), self.tasks.index(task), jnp.int32)
        ids = np.asarray(task)
        if ids.ndim == 0:
            ids = np.full((batch,), int(ids))
        if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"task: expected a name, an int or [{batch}] ints, got {task!r}")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.tasks)):
            bad = int(ids.max() if ids.max() >= len(self.tasks) else ids.min())
            raise ValueError(f"task: id {bad} is unknown; this model has tasks "
                             f"0..{len(self.tasks) - 1}")
        return jnp.asarray(ids, jnp.int32)

    def _images(self, x) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        learners.check_image_shape(self.layout.image_shape, x.shape)
        return x

    def reconstruct(self, x, *, task=None, rng: jax.Array | None = None) -> dict:
        """Reconstructs images.

        Args:
          x: ``[B, H, W, C]`` float32 in [0, 1].
          task: a task name or id (or ``[B]`` ids); None lets the TSGate choose.
          rng: latent noise key; None uses the posterior mean.

        Returns:
          ``{"mean": [B, H, W, C] in [0, 1], "gate": [B, N gated], "task": [B],
          "dropped": int}``.
        """
        x = self._images(x)
        return _reconstruct(self, x, self.task_ids(task, x.shape[0]), rng)

    def bound(self, x, *, task=None, rng: jax.Array) -> dict:
        """One-draw estimate of the negative bound of docs/design.md §3b, per image.

        Args:
          x: ``[B, H, W, C]`` float32 in [0, 1].
          task: a task name or id (or ``[B]`` ids); None lets the TSGate choose.
          rng: the draw's key (latent noise; the gate has none outside training).

        Returns:
          ``{"nelbo", "rec", "kl", "gate_kl"}``, each ``[B]`` nats: ``nelbo = rec + kl +
          gate_kl``, an unbiased estimate of ``-sum_n w_n (ELBO_n + log pi_n - log w_n)``.
        """
        return {k: v[0] for k, v in self.bounds(x, task=task, rngs=rng[None]).items()}

    def bounds(self, x, *, task=None, rngs: jax.Array) -> dict:
        """``bound`` for each key of ``rngs`` ``[S]``: ``{"nelbo", "rec", "kl", "gate_kl"}``,
        each ``[S, B]``. One program: the gate and the encoders, which no draw changes, run
        once, the decoders once a draw."""
        x = self._images(x)
        return _bounds(self, x, self.task_ids(task, x.shape[0]), rngs)

    def _sample_task(self, task) -> jax.Array:
        if task is None and len(self.tasks) > 1:
            raise ValueError(f"task: required to sample from a model of several tasks "
                             f"{list(self.tasks)}")
        return self.task_ids(task, 1)[0] if task is not None else jnp.int32(0)

    def draw(self, n: int, *, task, rng: jax.Array) -> dict:
        """Ancestral samples of the model (docs/design.md §3b): a learner ``n ~ pi`` of the
        task's squad, an independent ``z_m ~ N(0, I)`` for every latent its path consumes, and
        the decoders stage by stage with the connections.

        Args:
          n: how many samples.
          task: a task name or id; None only for a model of one task (a task model).
          rng: the samples' key.

        Returns:
          ``{"images": [n, H, W, C] mean images in [0, 1], "out": [n, H, W, C] the drawn
          decoder's raw output (logits or Gaussian means), "learner": [n] int}``.
        """
        check_count(n)
        t = self._sample_task(task)
        out, learner = _draw(self, sample_rows(n), t, rng)
        return {"images": losses.pixel_mean(out[:n], self.layout.likelihood), "out": out[:n],
                "learner": learner[:n]}

    def sample(self, n: int, *, task, rng: jax.Array) -> jax.Array:
        """``n`` mean images ``[n, H, W, C]`` in [0, 1] drawn from the model (``draw``)."""
        return self.draw(n, task=task, rng=rng)["images"]

    def task_accuracy(self, x, task) -> jax.Array:
        """The TSGate's accuracy on images ``x`` of the tasks ``task`` (a scalar)."""
        x = self._images(x)
        return jnp.mean(_route(self, x).task == self.task_ids(task, x.shape[0]))

    # ---------------------------------------------------------------------------- spec/save

    def kept_by_group(self) -> jax.Array:
        """``[P]`` bool in group order, aligned with ``conns.flat_arrays()``."""
        if not self.kept:
            return jnp.zeros((0,), bool)
        return jnp.concatenate([m[...] for m in self.kept])

    def kept_flat(self) -> np.ndarray:
        """``[P]`` bool in ``conns.connections`` order."""
        out = np.zeros(len(self.conns), bool)
        for g, m in zip(self.conns.groups, self.kept):
            out[list(g.index)] = np.asarray(m[...])
        return out

    def gate_param_count(self) -> int:
        """Real HierGate parameters: phi, the LSGate columns and prior logits of the gated
        learners and the TSGate (0 for a model of one task, which routes by id)."""
        cols = self.num_gated
        g = self.gate
        phi = g["phi"]["kernel"][...].size + g["phi"]["bias"][...].size
        ls = (g["ls"]["kernel"][...].shape[0] + 2) * cols
        ts = (g["ts"]["kernel"][...].size + g["ts"]["bias"][...].size) if len(self.tasks) > 1 else 0
        return int(phi + ls + ts)

    @property
    def spec(self) -> ModelSpec:
        """The model's description: learners (with their noise streams), tasks, config,
        connections and which are kept, real parameter counts, padding waste."""
        kept = self.kept_flat()
        conn_params = sum(self.conns.param_count(c)
                          for c, k in zip(self.conns.connections, kept) if k)
        members = [dataclasses.replace(m, stream=int(stream))
                   for m, stream in zip(self.layout.members, self.layout.streams)]
        entries = learner_entries(members, self.tasks)
        return ModelSpec(
            kind=self.kind, tasks=self.tasks,
            params=ParamCounts(sum(e.params for e in entries), self.gate_param_count(),
                               conn_params),
            image_shape=self.layout.image_shape, learners=entries, config=self.config,
            connections=self.conns.connections, kept=tuple(bool(k) for k in kept),
            padding_waste=self.layout.padding_waste())

    def export_tree(self) -> dict:
        """Unpadded state: per-learner parameters, gate, connection kernels, prior logits."""
        stacked = values(self.learners)
        gate = jax.tree.map(np.asarray, values(self.gate))
        gate["ls"] = {"kernel": gate["ls"]["kernel"][:, : self.num_gated],
                      "bias": gate["ls"]["bias"][: self.num_gated]}
        return {
            "learners": self.layout.unstack(stacked),
            "gate": gate,
            "connections": self.conns.unstack([k[...] for k in self.connections]),
            "prior": np.where(self.layout.segment_of >= 0, np.asarray(self.prior[...]), 0.0
                              ).astype(np.float32),
        }


def check_count(n) -> None:
    """Refuses a sample count that is not a positive integer."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")


@nnx.jit(graph=False)
def _reconstruct(model: BAIM, x, task, rng):
    out = model.forward(x, task, rng=rng, dropless=True)
    return {"mean": out["recon"], "gate": out["gate"].weights[:, : model.num_gated],
            "task": out["gate"].task, "dropped": out["dropped"]}


@nnx.jit(graph=False)
def _bounds(model: BAIM, x, task, rngs):
    def draw(rng):
        out = model.forward(x, task, rng=rng, dropless=True)
        return {k: out[k] for k in bound.PARTS}

    return jax.vmap(draw)(rngs)  # what does not depend on the key stays unbatched


@nnx.jit(graph=False)
def _route(model: BAIM, x):
    return model.route(x)


@nnx.jit(static_argnums=(1,), graph=False)
def _draw(model: BAIM, n: int, task: jax.Array, rng):
    """``n`` ancestral samples of ``task``: raw outputs ``[n, H, W, C]``, learners ``[n]``."""
    seg = jnp.asarray(model.layout.segment_of)
    rng_pick, rng_z = jax.random.split(rng)
    pi = jnp.where(seg == task, jnp.exp(model.log_prior()), 0.0)
    learner = bound.draw_learners(pi, jax.random.uniform(rng_pick, (n,)))
    mask = model._latent_mask()
    z = jnp.where(mask[:, None, :], model._noise(rng_z, n), 0.0)
    if not any(g.tower == "dec" for g in model.conns.groups):
        # Decoders alone: each drawable learner at its own widths, not the pool's padded ones.
        out = jnp.stack([decode_alone(model.layout, values(model.learners), m, z[m])
                         for m in range(model.num_gated)])                   # [gated, n, ...]
        return out[learner, jnp.arange(n)], learner
    if model.config.latent == "shared":
        z = bound.shared_latents(z, learner, mask)
    layout = dispatch.dense_layout(n, model.layout.size, sum(model.layout.depths))
    out = model._tower("dec", z, layout)                                     # [N, n, ...]
    return out[learner, jnp.arange(n)], learner
