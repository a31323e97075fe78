"""Does the BAIM's step time follow K (active learners) rather than N (pool size)?

One squad of N equal MLP VAE learners (784-256-2x32 encoder, 32-256-784 decoder by default;
``--hidden``, ``--latent``, ``--image-size``), K = 2, batch 256 (``--batch``), h = 1. Routing is
forced balanced (docs/design.md §9): example b goes to learners (b + k N / K) mod N, with the
gate's softmax weights there; the load it got is reported.

Connections: a pruned, compacted BAIM (pruned connections are gone) that keeps
``--kept-per-learner`` = r connections per learner, balanced like the routing: learner m feeds
learners m+1..m+r (mod N), each through one stage pair drawn at random from the h = 1 potential
set. (Random survivors of magnitude pruning would give some learner a fan-out of 3 or 4 at
N = 8, and the capacity, set by the busiest learner, would be B: exactness then costs dense
compute.) The capacity is the largest number of rows any learner needs (its own plus those it
feeds), so nothing is dropped.

Prints one JSON object: ``seconds_per_grad`` and ``seconds_per_train_step`` keyed by N (fast
capacity path), ``ratio_32_over_4``, ``grad_flops_per_s`` (useful work of the K active
learners at the first size), ``matmul_flops_per_s`` (a square float32 matmul of
``--matmul-size``), ``fraction_of_matmul``, and for comparison the dense reference path and the
pool without connections, ``fraction_of_matmul_no_connections`` and
``fraction_of_matmul_executed`` (every row run counted, the feeders' stages and the
connections' projections included). On a device of ``PEAK_FLOPS`` (or with ``--peak-flops``),
``mfu`` and ``mfu_no_connections``: useful FLOP/s over that peak, keyed by N.

``seconds_per_grad_pool_only`` times the learner pool alone (``pool.run_pool``) on the same
buffers and per-position capacities, with no gate, no dispatch and no connections: the cost of
the stacked per-learner weights on this machine, which no dispatch can go below.
``grad_over_pool_only`` is what the BAIM adds to it.

Every variant of every size is compiled first and then timed in turn, ``--repeats`` rounds
(medians reported): on a shared machine a slow spell then slows all of them alike, and the
ratios between sizes and variants compare times taken side by side. ``--variants`` times a
subset (the dense path at large widths needs N times the memory of the others).

    python benchmarks/step_scaling.py [--sizes 4 8 16 32] [--repeats 20] [--trace DIR]
    python benchmarks/step_scaling.py --sizes 8 32 --batch 8192 --hidden 2048 \
        --matmul-size 8192 --variants seconds_per_grad seconds_per_grad_no_connections
"""

from __future__ import annotations

import argparse
import functools
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
from baim_jax.core.baim import BAIM, BAIMConfig, values
from baim_jax.core.learners import LearnerSpec, learner_flops, stage_flops, stages
from baim_jax.core.pool import Member, PoolLayout, run_pool

BATCH, K, H = 256, 2, 1
# Dense matmul peak of float32 operands at JAX's default precision (TF32 tensor cores on these
# GPUs), FLOP/s, from NVIDIA's data sheets (without sparsity), by ``device_kind``.
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 494.7e12, "NVIDIA H100 PCIe": 378e12,
              "NVIDIA H200": 494.7e12, "NVIDIA A100-SXM4-80GB": 156e12,
              "NVIDIA A100-SXM4-40GB": 156e12}


def balanced_selection(batch: int, n: int, k: int) -> np.ndarray:
    """``[B, N]``: example b on learners (b + j N / K) mod N, j < K: every learner B K / N rows."""
    sel = np.zeros((batch, n), bool)
    for j in range(k):
        sel[np.arange(batch), (np.arange(batch) + j * n // k) % n] = True
    return sel


def learner_spec(hidden: int = 256, latent: int = 32, image_size: int = 28) -> LearnerSpec:
    """The benchmark's learner: an MLP VAE image-hidden-2xlatent / latent-hidden-image."""
    return LearnerSpec("mlp", (image_size, image_size, 1), (hidden,), latent, (hidden,))


SPEC = learner_spec()


def build(n: int, kept_per_learner: int, dispatch: str, seed: int = 0, spec: LearnerSpec = SPEC,
          batch: int = BATCH):
    """A compacted pruned BAIM of n learners ``spec``, its balanced routing (``[batch, N]``),
    the load figures and the capacity layout; the capacity fits exactly."""
    members = [Member(spec, 0) for _ in range(n)]
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
    selected = balanced_selection(batch, n, K)
    model = BAIM(members, ["all"], BAIMConfig(k=K, h=H, dispatch=dispatch),
                 rngs=nnx.Rngs(seed), conns=chosen, connection_kernels=kernels)
    depths = model.layout.depths
    depth = np.asarray(D.chained_depth(D.needed_prefixes(
        jnp.asarray(selected), model.conns.flat_arrays(), jnp.ones(len(chosen), bool), depths)))
    loads = [int((depth > q).sum(0).max()) for q in range(sum(depths))]
    model.config = BAIMConfig(k=K, h=H, dispatch=dispatch,
                              capacity_factor=tuple(c * n / (batch * K) for c in loads))
    chain = [st for tower in ("enc", "dec") for st in stages(spec)[tower]]
    # Each connection's projection runs on its target position's rows (as a stage does,
    # counted as 3 times its forward FLOPs, like the learners' work).
    connection_flops = 3 * sum(
        2 * probe.param_count(c) * loads[model.layout.position(c.tower, c.tgt, c.tgt_stage)
                                         + (0 if c.tower == "enc" else depths[0])]
        for c in chosen)
    executed = 3 * n * sum(c * stage_flops(st) for c, st in zip(loads, chain)) + connection_flops
    info = {"potential_connections": len(potential), "kept_connections": count,
            "capacity": loads[0], "capacity_per_position": loads,
            "active_learners_per_example": K,
            "needed_learners_per_example": float((depth > 0).sum(1).mean()),
            "largest_share_of_rows": float(loads[0] / batch),
            "executed_flops_per_grad": executed, "connection_flops_per_grad": connection_flops,
            "executed_over_useful": executed / (3 * K * batch * learner_flops(spec))}
    return model, jnp.asarray(selected), info, D.capacity_layout(depth, loads)


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """Median seconds of each zero-argument call, after two warm-up calls each.

    The calls are timed in turn, ``repeats`` rounds of all of them, so that a slow spell of a
    shared machine slows every variant and size alike and their ratios stay comparable. Each
    timed call follows an untimed one of the same call, so that it finds the caches as a
    training loop, repeating one step, does.
    """
    for fn in calls.values():
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            jax.block_until_ready(fn())  # untimed: caches warm again, as in a training loop
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[key].append(time.perf_counter() - t)
    return {key: float(np.median(t)) for key, t in times.items()}


def images(model: BAIM, batch: int) -> jax.Array:
    """The benchmark's one batch of images ``[batch, H, W, C]`` (uniform, fixed key)."""
    return jax.random.uniform(jax.random.key(1), (batch, *model.layout.image_shape))


def objective(model: BAIM, selected):
    """``model -> loss``: the BAIM's training objective on the benchmark's one batch (fixed
    images, task 0, noise key) with the imposed choice ``selected`` ``[B, N]``."""
    batch = selected.shape[0]
    x = images(model, batch)
    task = jnp.zeros((batch,), jnp.int32)
    rng = jax.random.key(2)
    return lambda m: m.loss(x, task, rng, selected=selected)[0]


def grad_call(model: BAIM, selected):
    """Loss and gradients of the BAIM's training objective (jitted)."""
    loss = objective(model, selected)
    graphdef, state = nnx.split(model)

    @jax.jit
    def grad(state):
        return nnx.grad(loss)(nnx.merge(graphdef, state))

    return lambda: grad(state)


def step_call(model: BAIM, selected):
    """The full train step, optimizer update included (jitted; the state is carried on)."""
    loss = objective(model, selected)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state = jax.tree.map(jnp.copy, state)  # donated below; the other calls share the model's

    @functools.partial(jax.jit, donate_argnums=0)  # as strategies.make_train_step
    def step(state):
        m, opt = nnx.merge(graphdef, state)
        grads = nnx.grad(loss)(m)
        opt.update(m, grads)
        return nnx.state((m, opt))

    box = {"s": state}

    def run():
        box["s"] = step(box["s"])
        return box["s"]

    return run


def pool_only_call(model: BAIM, layout: D.Layout):
    """Loss and gradients of the learner pool alone on the layout's buffers (see module doc)."""
    batch = layout.slot_of.shape[0] - 1
    buffers = D.gather_rows(images(model, batch), layout.rows_of)
    eps = D.gather_rows(jax.random.normal(jax.random.key(2), (batch, model.layout.latent)),
                        layout.rows_of)

    @jax.jit
    @jax.grad
    def grad(params):
        out = run_pool(model.layout, params, buffers, eps, caps=layout.caps)
        return (jnp.sum(out["rec"]) + jnp.sum(out["kl"][:, :out["rec"].shape[1]])) / batch

    params = values(model.learners)
    return lambda: grad(params)


def matmul_call(size: int = 2048):
    a = jax.random.normal(jax.random.key(0), (size, size))
    b = jax.random.normal(jax.random.key(1), (size, size))
    f = jax.jit(jnp.matmul)
    return lambda: f(a, b)


VARIANTS = ("seconds_per_grad", "seconds_per_train_step", "seconds_per_grad_pool_only",
            "seconds_per_grad_dense", "seconds_per_grad_no_connections")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kept-per-learner", type=int, default=1)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--hidden", type=int, default=256, help="each learner's hidden width")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=28, help="square, one channel")
    parser.add_argument("--matmul-size", type=int, default=2048,
                        help="side of the square matmul that sets the machine's rate")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="what to time (seconds_per_grad always)")
    parser.add_argument("--peak-flops", type=float,
                        help="the device's peak FLOP/s for mfu (default: PEAK_FLOPS)")
    parser.add_argument("--trace", metavar="DIR",
                        help="also write a profiler trace (TensorBoard / Perfetto) of 10 grad "
                             "steps at each size to DIR, after the timings")
    args = parser.parse_args()
    if min(args.batch, args.hidden, args.latent, args.image_size, args.matmul_size) < 1:
        parser.error("--batch, --hidden, --latent, --image-size, --matmul-size: must be >= 1")
    variants = ["seconds_per_grad"] + [v for v in args.variants if v != "seconds_per_grad"]
    spec = learner_spec(args.hidden, args.latent, args.image_size)
    batch = args.batch
    load_start = os.getloadavg()[0]
    device = str(jax.devices()[0].device_kind)
    out = {"device": device, "batch": batch, "k": K, "h": H,
           "learner": spec.to_json(), "kept_per_learner": args.kept_per_learner,
           "repeats": args.repeats, "timing": "medians, every variant and size timed in turn",
           **{v: {} for v in variants}, "load": {}}
    calls = {("matmul", 0): matmul_call(args.matmul_size)}
    for n in args.sizes:
        model, selected, out["load"][n], layout = build(n, args.kept_per_learner, "capacity",
                                                        spec=spec, batch=batch)
        calls["seconds_per_grad", n] = grad_call(model, selected)
        if "seconds_per_train_step" in variants:
            calls["seconds_per_train_step", n] = step_call(model, selected)
        if "seconds_per_grad_pool_only" in variants:
            calls["seconds_per_grad_pool_only", n] = pool_only_call(model, layout)
        if "seconds_per_grad_dense" in variants:
            dense, selected, _, _ = build(n, args.kept_per_learner, "dense", spec=spec,
                                          batch=batch)
            calls["seconds_per_grad_dense", n] = grad_call(dense, selected)
        if "seconds_per_grad_no_connections" in variants:
            bare, selected, _, _ = build(n, 0, "capacity", spec=spec, batch=batch)
            calls["seconds_per_grad_no_connections", n] = grad_call(bare, selected)
    medians = interleaved_medians(calls, args.repeats)
    if args.trace:
        with jax.profiler.trace(args.trace, create_perfetto_trace=True):
            for n in args.sizes:
                with jax.profiler.TraceAnnotation(f"grad N={n}"):
                    for _ in range(10):
                        jax.block_until_ready(calls["seconds_per_grad", n]())
    for (variant, n), t in medians.items():
        if variant != "matmul":
            out[variant][n] = t
    if "seconds_per_grad_pool_only" in variants:
        out["grad_over_pool_only"] = {n: out["seconds_per_grad"][n]
                                      / out["seconds_per_grad_pool_only"][n] for n in args.sizes}
    first, last = args.sizes[0], args.sizes[-1]
    for variant, suffix in (("seconds_per_grad", ""), ("seconds_per_grad_dense", "_dense"),
                            ("seconds_per_grad_no_connections", "_no_connections"),
                            ("seconds_per_grad_pool_only", "_pool_only")):
        if variant in variants:
            out[f"ratio_{last}_over_{first}{suffix}"] = out[variant][last] / out[variant][first]
    useful = 3 * K * batch * learner_flops(spec)
    out["useful_flops_per_grad"] = useful
    out["grad_flops_per_s"] = useful / out["seconds_per_grad"][first]
    out["matmul_size"] = args.matmul_size
    out["matmul_flops_per_s"] = 2 * args.matmul_size**3 / medians["matmul", 0]
    out["fraction_of_matmul"] = out["grad_flops_per_s"] / out["matmul_flops_per_s"]
    out["fraction_of_matmul_executed"] = (out["load"][first]["executed_flops_per_grad"]
                                          / out["seconds_per_grad"][first]
                                          / out["matmul_flops_per_s"])
    if "seconds_per_grad_no_connections" in variants:
        out["fraction_of_matmul_no_connections"] = (
            useful / out["seconds_per_grad_no_connections"][first] / out["matmul_flops_per_s"])
    peak = args.peak_flops or PEAK_FLOPS.get(device)
    out["peak_flops"] = peak
    if peak:
        for variant, key in (("seconds_per_grad", "mfu"),
                             ("seconds_per_grad_no_connections", "mfu_no_connections")):
            if variant in variants:
                out[key] = {n: useful / out[variant][n] / peak for n in args.sizes}
    out["loadavg_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
