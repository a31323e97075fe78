"""Where the case study's cloud train step spends its time, kernel by kernel (prints one JSON
object; XLA:CPU).

The step is ``cloud_step.py``'s (the case study's BAIM, or ``--config``'s; finetune, every
connection of its connected towers kept, a batch routed by task), compiled as ``baim-jax run``
compiles it (``cli.cpu_compile_flags``). ``--steps`` calls are timed (``wall_ms``: their
median), then as many are profiled with ``jax.profiler`` and XLA:CPU's trace event per kernel
(``--xla_cpu_enable_xprof_traceme``, added to ``XLA_FLAGS`` before JAX starts). Per step:

- ``thread_ms``: each XLA worker thread's busy time; ``cores_busy`` is their sum over
  ``wall_ms`` (2 would keep both cores of this machine busy);
- ``families``: kernel time by kind (the compiled instruction's name without its number:
  ``ynn_fusion`` and ``dot`` are the matmuls, ``concatenate_slice_fusion`` a slice of
  stacked weights, ``multiply_add_fusion`` mostly the optimiser's update);
- ``top``: the largest kernels, each with its result shape and JAX op name (from the
  compiled HLO).

``stored_learner_params`` counts the learners' parameters as the pool stores them (stacked,
padded to each position's widest stage), against ``real_learner_params``: the optimiser
updates every stored entry, and each step cuts every stage group's weights out of them.
``storage`` times both alone (``storage_costs``): what storing each group at its own shapes
would save a step, at most.

    python benchmarks/step_profile.py [--steps 10] [--top 20] [--latent ..] [--connect ..]
        [--config configs/case_study.py]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baim_jax import cli  # noqa: E402  (imports no JAX backend)

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TRACE_FLAG}".strip()
cli.cpu_compile_flags()

import case_study_baim  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from step_scaling import interleaved_medians  # noqa: E402

from baim_jax.core import learners, optim, pool, strategies  # noqa: E402
from baim_jax.core.baim import values  # noqa: E402

WORKER = "XLAEigen"  # XLA:CPU's worker threads, as the profiler names them
NOT_KERNELS = ("end: ", "SlinkyThreadPool")  # an asynchronous kernel's end; a wait


def instructions(hlo_text: str) -> dict[str, dict]:
    """``{name: {"shape", "op_name"}}`` of every instruction of a compiled HLO module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = {"shape": m.group(2), "op_name": op_name.group(1) if op_name
                               else ""}
    return out


def kernel_times(trace_dir: str) -> tuple[dict[str, int], dict[str, int]]:
    """``(per kernel, per worker thread)`` nanoseconds summed over a profile's worker events
    (a thread's ``ThunkExecutor`` events are its busy spans, the others its kernels, less
    the ``NOT_KERNELS`` markers)."""
    path = next(Path(trace_dir).rglob("*.xplane.pb"))
    kernels: dict[str, int] = {}
    threads: dict[str, int] = {}
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            if WORKER not in line.name:
                continue
            for event in line.events:
                if event.name.startswith("ThunkExecutor"):
                    threads[line.name] = threads.get(line.name, 0) + event.duration_ns
                elif not event.name.startswith(NOT_KERNELS):
                    kernels[event.name] = kernels.get(event.name, 0) + event.duration_ns
    return kernels, threads


def family(kernel: str) -> str:
    """A kernel's kind: its instruction name without the number XLA appends."""
    return re.sub(r"\.\d+$", "", kernel)


def storage_costs(model, repeats: int) -> dict:
    """What storing each stage group at its own shapes would save a step, at most (ms,
    medians of ``repeats``, timed in turn).

    ``group_cuts``: every group's parameters cut from the stacked leaves
    (``pool.group_params``) and their gradients put back, each cut feeding a matmul (so that
    it is materialised, as the step's matmuls need it), less the same matmuls on leaves cut
    beforehand. ``adam``: the optimiser's update of the stored learner leaves and of leaves of
    the groups' own shapes, with their entries.
    """
    layout, stacked = model.layout, values(model.learners)
    positions = [(t, p) for t in learners.TOWERS for p in range(len(layout.stages[t]))]

    def cut(tree):
        return [leaf for t, p in positions for group in pool.group_params(layout, tree[t][p], t, p)
                for leaf in group.values()]

    def consume(leaves):
        total = 0.0
        for leaf in leaves:
            flat = leaf.reshape(*leaf.shape[:2], -1) if leaf.ndim > 2 else leaf[..., None]
            rows = jnp.ones((leaf.shape[0], 8, flat.shape[1]), leaf.dtype)
            total = total + jnp.sum(jnp.einsum("gri,gio->gro", rows, flat))
        return total

    cut_leaves = cut(stacked)
    with_cuts = jax.jit(jax.grad(lambda tree: consume(cut(tree))))
    without = jax.jit(jax.grad(consume))
    tx = optim.adam(1e-3)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # in place, as the train step
    def adam(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def adam_call(leaves):
        grads = jax.tree.map(lambda v: jnp.full_like(v, 1e-3), leaves)
        box = {"params": jax.tree.map(jnp.copy, leaves), "state": tx.init(leaves)}

        def run():
            box["params"], box["state"] = adam(box["params"], box["state"], grads)
            return box["params"]

        return run

    calls = {"with_cuts": lambda: with_cuts(stacked), "without": lambda: without(cut_leaves)}
    entries = {}
    for name, leaves in (("stored", [stacked[t][p] for t, p in positions]),
                         ("group_shapes", cut_leaves)):
        calls[name] = adam_call(leaves)
        entries[name] = sum(v.size for v in jax.tree.leaves(leaves))
    ms = {k: 1e3 * v for k, v in interleaved_medians(calls, repeats).items()}
    return {"group_cuts_ms": ms["with_cuts"] - ms["without"],
            "adam_ms": {"stored": ms["stored"], "group_shapes": ms["group_shapes"]},
            "adam_entries": entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=20, help="the largest kernels listed")
    parser.add_argument("--config", default=str(case_study_baim.CASE_STUDY),
                        help="the configs/*.py file whose BAIM to build (default: the case "
                             "study)")
    case_study_baim.add_design_flags(parser)
    args = parser.parse_args()
    for flag in ("steps", "top"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be at least 1, got {getattr(args, flag)}")
    try:
        plan, model = case_study_baim.build(args.latent, args.connect, args.config)
    except ValueError as e:  # a missing or invalid config, named by the config's checks
        parser.error(str(e))
    batch = plan.config.cloud.batch_size
    optimizer = strategies.make_optimizer(model, "finetune", optim.adam(1e-3))
    step = strategies.make_train_step(model, optimizer, "finetune")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, *plan.specs[0].image_shape), np.float32))
    task = jnp.asarray(np.arange(batch) % len(plan.tasks), jnp.int32)
    params = model.spec.params
    stored = sum(leaf.size for leaf in jax.tree.leaves(values(model.learners)))
    storage = storage_costs(model, args.steps)
    compiled = step.lower(x, task, jax.random.key(0)).compile()
    state = nnx.state((model, optimizer))  # donated to each step: the model's arrays are gone

    def run(steps: int, first: int) -> list[float]:
        nonlocal state
        times = []
        for s in range(first, first + steps):
            start = time.perf_counter()
            state, metrics = compiled(state, x, task, jax.random.key(s))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return times

    run(2, 0)
    wall = float(np.median(run(args.steps, 2)))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run(args.steps, 2 + args.steps)
        kernels, threads = kernel_times(trace_dir)
    per_step = 1e-6 / args.steps  # ns summed over the steps -> ms a step
    families: dict[str, float] = {}
    for name, ns in kernels.items():
        families[family(name)] = families.get(family(name), 0.0) + ns * per_step
    hlo = instructions(compiled.as_text())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]
    thread_ms = sorted((ns * per_step for ns in threads.values()), reverse=True)
    print(json.dumps({
        "batch": batch, "latent": model.config.latent, "connect": model.config.connect,
        "steps": args.steps, "wall_ms": 1e3 * wall, "thread_ms": thread_ms,
        "cores_busy": sum(thread_ms) / (1e3 * wall) if thread_ms else None,
        "kernel_ms": sum(kernels.values()) * per_step,
        "families": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        "top": [{"kernel": name, "ms": ns * per_step, **hlo.get(name, {})} for name, ns in top],
        "stored_learner_params": stored, "real_learner_params": params.learners,
        "connection_params": params.connections, "storage": storage,
        "xla_flags": os.environ["XLA_FLAGS"],
        "device": jax.devices()[0].device_kind, "jax": jax.__version__}, indent=1))


if __name__ == "__main__":
    main()
