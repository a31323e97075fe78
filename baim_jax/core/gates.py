"""HierGate: the TSGate picks a task, that squad's LSGate picks and weighs K learners.

Paper Sec. "Bottom-up BAIM" (Fig. 3). The HierGate's output is an N-vector cut into M squad
segments with exactly K non-zeros, all in the selected task's segment.

Ours: ``logits = W_t phi(x) + b_t`` with ``phi`` a small learned feature map; the function that
turns a squad's logits into K weights is pluggable by name (``register_gate``), since the gating
math is what our users research. Auxiliary losses: the Switch/GShard load-balancing loss and the
router z-loss (ST-MoE).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

GateFn = Callable[[jax.Array, jax.Array], jax.Array]
_GATES: dict[str, GateFn] = {}


def register_gate(name: str):
    """Registers ``fn(logits [B, N], selected [B, N] bool) -> weights [B, N]``.

    ``selected`` marks the K learners chosen for each row (top-K of the logits inside the task's
    segment); the gate function only decides their weights and must return zero elsewhere.
    The weights are ``q(n | x)`` of the bound (docs/design.md §3b), so each row must sum to 1.
    """

    def wrap(fn: GateFn) -> GateFn:
        _GATES[name] = fn
        return fn

    return wrap


def get_gate(name: str) -> GateFn:
    if name not in _GATES:
        raise ValueError(f"gate: unknown gate function {name!r}; registered: {sorted(_GATES)}")
    return _GATES[name]


def gate_names() -> list[str]:
    return sorted(_GATES)


@register_gate("topk_softmax")
def topk_softmax(logits: jax.Array, selected: jax.Array) -> jax.Array:
    """Softmax over the K selected logits (Shazeer et al. 2017). Rows sum to 1."""
    masked = jnp.where(selected, logits, -jnp.inf)
    return jnp.where(selected, jax.nn.softmax(masked, axis=-1), 0.0)


@register_gate("uniform")
def uniform(logits: jax.Array, selected: jax.Array) -> jax.Array:
    """Equal weights 1/K on the selected learners (routing by the logits only)."""
    del logits
    s = selected.astype(jnp.float32)
    return s / jnp.sum(s, axis=-1, keepdims=True)


class GateOutput(NamedTuple):
    """What the HierGate gives for a batch.

    Attributes:
      weights: ``[B, N]``, K non-zeros per row inside the task's segment.
      selected: ``[B, N]`` bool, the K chosen learners.
      task: ``[B]`` int, the task each row was routed to.
      logits: ``[B, N]`` LSGate logits (-inf outside the task segment).
      task_logits: ``[B, M]`` TSGate logits.
    """

    weights: jax.Array
    selected: jax.Array
    task: jax.Array
    logits: jax.Array
    task_logits: jax.Array


def segment_mask(segment_of: jax.Array, task: jax.Array) -> jax.Array:
    """``[B, N]`` bool: learner n is in the segment of row b's task."""
    return segment_of[None, :] == task[:, None]


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """``[B, N]`` bool with exactly k True per row: the k largest logits (ties to lower index)."""
    _, idx = jax.lax.top_k(logits, k)
    return jnp.sum(jax.nn.one_hot(idx, logits.shape[-1], dtype=jnp.int32), axis=1) > 0


def top_k_in_segment(raw: jax.Array, seg: jax.Array, k: int,
                     noise: jax.Array | None = None) -> jax.Array:
    """``[B, N]`` bool: the k largest of ``raw + noise`` among each row's segment ``seg``.

    Ranked on finite stand-ins (NaN lowest, then -inf; +inf highest), so that a diverged gate
    still selects exactly k learners of the task's squad; its NaN weights then make the loss
    NaN instead of an empty selection that scores 0.
    """
    big = jnp.finfo(raw.dtype).max
    rank = jnp.nan_to_num(raw, nan=-big, posinf=big, neginf=-big / 2)
    if noise is not None:
        rank = rank + noise
    return top_k_mask(jnp.where(seg, rank, -jnp.inf), k) & seg


def init_gate(rng: np.random.Generator, image_shape: tuple[int, int, int], features: int,
              learners: int, tasks: int) -> dict:
    """HierGate parameters: LeCun-normal kernels, zero biases (host arrays).

    Returns:
      ``{"phi": {kernel [H, W, C, F], bias [F]}, "ls": {kernel [F, N], bias [N]},
      "ts": {kernel [F, M], bias [M]}}``, drawn in that order.
    """
    def dense(fan_in, shape):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    fan_in = int(np.prod(image_shape))
    return {"phi": {"kernel": dense(fan_in, (*image_shape, features)),
                    "bias": np.zeros((features,), np.float32)},
            "ls": {"kernel": dense(features, (features, learners)),
                   "bias": np.zeros((learners,), np.float32)},
            "ts": {"kernel": dense(features, (features, tasks)),
                   "bias": np.zeros((tasks,), np.float32)}}


def features(params: dict, x: jax.Array) -> jax.Array:
    """``phi(x)``: ``[B, H, W, C] -> [B, F]``, one ReLU dense layer (one 2-D matmul: a
    contraction over three axes makes XLA relayout the kernel on every call)."""
    kernel = params["kernel"]
    flat = kernel.reshape(-1, kernel.shape[-1])
    return jax.nn.relu(x.reshape(x.shape[0], -1) @ flat + params["bias"])


def _head(params: dict, phi: jax.Array) -> jax.Array:
    """A gate's logits from the shared features: ``[B, F] -> [B, N or M]``."""
    return phi @ params["kernel"] + params["bias"]


def task_logits(params: dict, x: jax.Array) -> jax.Array:
    """The TSGate's logits ``[B, M]`` of images ``[B, H, W, C]`` (``params``: the HierGate's)."""
    return _head(params["ts"], features(params["phi"], x))


def hier_gate(params: dict, x: jax.Array, *, segment_of: jax.Array, k: int, gate: str,
              task: jax.Array | None = None, noise_std: float = 0.0,
              rng: jax.Array | None = None, selected: jax.Array | None = None) -> GateOutput:
    """Routes a batch.

    Args:
      params: ``{"phi": {kernel [H,W,C,F], bias [F]}, "ls": {kernel [F,N], bias [N]},
        "ts": {kernel [F,M], bias [M]}}``.
      x: ``[B, H, W, C]``.
      segment_of: ``[N]`` int, the squad of each learner (-1: not gated, a feeder).
      k: learners per input.
      gate: registered gate function name.
      task: ``[B]`` int task ids; None lets the TSGate choose (argmax of its logits).
      noise_std: noisy top-K (Shazeer et al. 2017, with a fixed scale): Gaussian noise of
        this std on the logits, which then both choose the K and weigh them (training). The
        auxiliary losses see the clean logits (``GateOutput.logits``).
      rng: key for the noise; no noise when None.
      selected: ``[B, N]`` bool, an imposed choice of learners (benchmarks, tests); its weights
        still come from the gate function on the logits.
    """
    phi = features(params["phi"], x)
    ts_logits = _head(params["ts"], phi)
    if task is None:
        task = jnp.argmax(ts_logits, axis=-1)
    seg = segment_mask(segment_of, task)
    raw = _head(params["ls"], phi)
    logits = jnp.where(seg, raw, -jnp.inf)
    noise = None
    if noise_std > 0.0 and rng is not None:
        noise = noise_std * jax.random.normal(rng, logits.shape)
    if selected is None:
        selected = top_k_in_segment(raw, seg, k, noise)
    weights = get_gate(gate)(logits if noise is None else logits + noise, selected)
    return GateOutput(weights, selected, task, logits, ts_logits)


def load_balancing_loss(out: GateOutput, segment_of: jax.Array, num_tasks: int,
                        k: int) -> jax.Array:
    """Switch/GShard load balance, per squad over its rows, averaged over squads present.

    For squad t with S_t learners: ``S_t * sum_i f_i P_i``, f_i the fraction of the squad's
    K-assignments given to learner i and P_i its mean softmax probability. 1 when balanced.
    ``segment_of`` ``[N]`` gives each learner's squad (-1: a feeder).
    """
    probs = jax.nn.softmax(out.logits, axis=-1)
    probs = jnp.where(jnp.isfinite(out.logits), probs, 0.0)
    onehot = jax.nn.one_hot(out.task, num_tasks)
    count = jnp.sum(onehot, axis=0)
    f = onehot.T @ out.selected.astype(jnp.float32) / jnp.maximum(count, 1.0)[:, None] / k
    p = onehot.T @ probs / jnp.maximum(count, 1.0)[:, None]
    size = jnp.sum(jax.nn.one_hot(segment_of, num_tasks), axis=0)
    per_task = size * jnp.sum(f * p, axis=1)
    present = (count > 0).astype(jnp.float32)
    return jnp.sum(per_task * present) / jnp.maximum(jnp.sum(present), 1.0)


def router_z_loss(out: GateOutput) -> jax.Array:
    """Mean squared log-sum-exp of each row's segment logits (ST-MoE)."""
    return jnp.mean(jax.nn.logsumexp(out.logits, axis=-1) ** 2)


def task_loss(out: GateOutput, labels: jax.Array) -> jax.Array:
    """TSGate cross-entropy against task labels ``[B]``."""
    logp = jax.nn.log_softmax(out.task_logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
