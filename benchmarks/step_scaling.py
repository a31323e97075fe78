"""Does the BAIM's step time follow K (active learners) rather than N (pool size)?

One squad of N equal MLP VAE learners (784-256-2x32 encoder, 32-256-784 decoder), K = 2,
batch 256, h = 1. Routing is forced balanced (DESIGN.md Sec. 9): example b goes to learners
(b + k N / K) mod N, with the gate's softmax weights there; the load it got is reported.

Connections: a pruned, compacted BAIM (pruned connections are gone) that keeps
``--kept-per-learner`` = r connections per learner, balanced like the routing: learner m feeds
learners m+1..m+r (mod N), each through one stage pair drawn at random from the h = 1 potential
set. (Random survivors of magnitude pruning would give some learner a fan-out of 3 or 4 at
N = 8, and the capacity, set by the busiest learner, would be B: exactness then costs dense
compute.) The capacity is the largest number of rows any learner needs (its own plus those it
feeds), so nothing is dropped.

Prints one JSON object: ``seconds_per_grad`` and ``seconds_per_train_step`` keyed by N (fast
capacity path), ``ratio_32_over_4``, ``grad_flops_per_s`` (useful work of the K active
learners at N = 4), ``matmul_flops_per_s``, ``fraction_of_matmul``, and for comparison the dense
reference path and the pool without connections, ``fraction_of_matmul_no_connections`` and
``fraction_of_matmul_executed`` (every row run counted, the feeders' stages included).

    python benchmarks/step_scaling.py [--sizes 4 8 16 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from baim_jax.core import connections as C
from baim_jax.core import dispatch as D
from baim_jax.core.baim import BAIM, BAIMConfig
from baim_jax.core.learners import LearnerSpec, learner_flops, stage_flops, stages
from baim_jax.core.pool import Member, PoolLayout

SPEC = LearnerSpec("mlp", (28, 28, 1), (256,), 32, (256,))
BATCH, K, H = 256, 2, 1


def balanced_selection(batch: int, n: int, k: int) -> np.ndarray:
    """``[B, N]``: example b on learners (b + j N / K) mod N, j < K: every learner B K / N rows."""
    sel = np.zeros((batch, n), bool)
    for j in range(k):
        sel[np.arange(batch), (np.arange(batch) + j * n // k) % n] = True
    return sel


def build(n: int, kept_per_learner: int, dispatch: str, seed: int = 0):
    """A compacted pruned BAIM of n learners and its balanced routing; capacity fits exactly."""
    members = [Member(SPEC, 0) for _ in range(n)]
    potential = C.potential_set(PoolLayout(members), H)
    rng = np.random.default_rng(seed)
    by_pair: dict[tuple[int, int], list] = {}
    for c in potential:
        by_pair.setdefault((c.src, c.tgt), []).append(c)
    chosen = sorted(by_pair[(m, (m + r) % n)][rng.integers(len(by_pair[(m, (m + r) % n)]))]
                    for m in range(n) for r in range(1, int(kept_per_learner) + 1))
    count = len(chosen)
    probe = C.ConnectionSet(PoolLayout(members), chosen)
    kernels = [(0.01 * rng.standard_normal(probe.real_kernel_shape(c))).astype(np.float32)
               for c in chosen]
    selected = balanced_selection(BATCH, n, K)
    model = BAIM(members, ["all"], BAIMConfig(k=K, h=H, dispatch=dispatch),
                 rngs=nnx.Rngs(seed), connections=chosen, connection_kernels=kernels)
    depths = model.layout.depths
    depth = np.asarray(D.chained_depth(D.needed_prefixes(
        jnp.asarray(selected), model.conns.flat_arrays(), jnp.ones(len(chosen), bool), depths)))
    loads = [int((depth > q).sum(0).max()) for q in range(sum(depths))]
    model.config = BAIMConfig(k=K, h=H, dispatch=dispatch,
                              capacity_factor=tuple(c * n / (BATCH * K) for c in loads))
    chain = [st for tower in ("enc", "dec") for st in stages(SPEC)[tower]]
    executed = 3 * n * sum(c * stage_flops(st) for c, st in zip(loads, chain))
    info = {"potential_connections": len(potential), "kept_connections": count,
            "capacity": loads[0], "capacity_per_position": loads,
            "active_learners_per_example": K,
            "needed_learners_per_example": float((depth > 0).sum(1).mean()),
            "largest_share_of_rows": float(loads[0] / BATCH),
            "executed_flops_per_grad": executed,
            "executed_over_useful": executed / (3 * K * BATCH * learner_flops(SPEC))}
    return model, jnp.asarray(selected), info


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_grad_and_step(model: BAIM, selected, repeats: int, with_step: bool):
    x = jax.random.uniform(jax.random.key(1), (BATCH, *SPEC.image_shape))
    task = jnp.zeros((BATCH,), jnp.int32)
    rng = jax.random.key(2)
    graphdef, state = nnx.split(model)

    @jax.jit
    def grad(state):
        m = nnx.merge(graphdef, state)
        return nnx.grad(lambda mm: mm.loss(x, task, rng, selected=selected)[0])(m)

    t_grad = median_seconds(lambda: grad(state), repeats)
    if not with_step:
        return t_grad, None
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef2, state2 = nnx.split((model, optimizer))

    @jax.jit
    def step(state):
        m, opt = nnx.merge(graphdef2, state)
        grads = nnx.grad(lambda mm: mm.loss(x, task, rng, selected=selected)[0])(m)
        opt.update(m, grads)
        return nnx.state((m, opt))

    box = {"s": state2}

    def run():
        box["s"] = step(box["s"])
        return box["s"]

    return t_grad, median_seconds(run, repeats)


def matmul_flops_per_s(repeats: int, size: int = 2048) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size))
    b = jax.random.normal(jax.random.key(1), (size, size))
    f = jax.jit(jnp.matmul)
    return 2 * size**3 / median_seconds(lambda: f(a, b), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kept-per-learner", type=int, default=1)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    out = {"device": str(jax.devices()[0].device_kind), "batch": BATCH, "k": K, "h": H,
           "learner": SPEC.to_json(), "kept_per_learner": args.kept_per_learner,
           "repeats": args.repeats, "seconds_per_grad": {}, "seconds_per_train_step": {},
           "seconds_per_grad_dense": {}, "seconds_per_grad_no_connections": {}, "load": {}}
    for n in args.sizes:
        model, selected, info = build(n, args.kept_per_learner, "capacity")
        t_grad, t_step = time_grad_and_step(model, selected, args.repeats, True)
        out["seconds_per_grad"][n], out["seconds_per_train_step"][n] = t_grad, t_step
        out["load"][n] = info
        dense, selected, _ = build(n, args.kept_per_learner, "dense")
        out["seconds_per_grad_dense"][n] = time_grad_and_step(dense, selected, args.repeats,
                                                              False)[0]
        bare, selected, _ = build(n, 0, "capacity")
        out["seconds_per_grad_no_connections"][n] = time_grad_and_step(
            bare, selected, args.repeats, False)[0]
    first, last = args.sizes[0], args.sizes[-1]
    out[f"ratio_{last}_over_{first}"] = out["seconds_per_grad"][last] / out["seconds_per_grad"][first]
    out[f"ratio_{last}_over_{first}_dense"] = (out["seconds_per_grad_dense"][last]
                                              / out["seconds_per_grad_dense"][first])
    out[f"ratio_{last}_over_{first}_no_connections"] = (
        out["seconds_per_grad_no_connections"][last] / out["seconds_per_grad_no_connections"][first])
    useful = 3 * K * BATCH * learner_flops(SPEC)
    out["useful_flops_per_grad"] = useful
    out["grad_flops_per_s"] = useful / out["seconds_per_grad"][first]
    out["matmul_flops_per_s"] = matmul_flops_per_s(args.repeats)
    out["fraction_of_matmul"] = out["grad_flops_per_s"] / out["matmul_flops_per_s"]
    out["fraction_of_matmul_executed"] = (out["load"][first]["executed_flops_per_grad"]
                                          / out["seconds_per_grad"][first]
                                          / out["matmul_flops_per_s"])
    out["fraction_of_matmul_no_connections"] = (useful / out["seconds_per_grad_no_connections"]
                                                [first] / out["matmul_flops_per_s"])
    out["loadavg_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
