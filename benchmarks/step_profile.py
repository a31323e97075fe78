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

    python benchmarks/step_profile.py [--steps 10] [--top 20] [--latent ..] [--connect ..]
        [--config configs/case_study.py]
"""

from __future__ import annotations

import argparse
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
from flax import nnx  # noqa: E402

from baim_jax.core import optim, strategies  # noqa: E402
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
        "connection_params": params.connections,
        "xla_flags": os.environ["XLA_FLAGS"],
        "device": jax.devices()[0].device_kind, "jax": jax.__version__}, indent=1))


if __name__ == "__main__":
    main()
