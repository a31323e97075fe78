"""The case study's cloud train step: executed FLOPs against what its real parameters need,
and its time (prints one JSON object).

The BAIM is the case study's (configs/case_study.py: 10 MLP learners of 0.05M to 1.09M
parameters, h = 2, every connection of its connected towers kept), assembled with random weights
and connections, and trained on random batches of its batch size routed by task. ``useful`` is 6
FLOPs per real parameter per image (forward and backward of every parameter once: every learner
runs every image here, as each feeds the others); ``executed`` is XLA's cost analysis of the
compiled step. Medians of ``--repeats`` timed steps after two warm-up steps; the 1-minute load
average is recorded at start and end. ``--latent`` overrides the config's latent design (shared
latents decode once per selected slot, so their executed FLOPs count K decoder passes).

    python benchmarks/cloud_step.py [--repeats 20] [--latent own|shared] [--connect enc dec]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import case_study_baim  # noqa: E402

from baim_jax.core import optim, strategies  # noqa: E402
from baim_jax.framework import edges  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    case_study_baim.add_design_flags(parser)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    plan, model = case_study_baim.build(args.latent, args.connect)
    rng = np.random.default_rng(0)
    batch = plan.config.cloud.batch_size
    optimizer = strategies.make_optimizer(model, "finetune", optim.adam(1e-3))
    step = strategies.make_train_step(model, optimizer, "finetune")
    x = jnp.asarray(rng.random((batch, *plan.specs[0].image_shape), np.float32))
    task = jnp.asarray(np.arange(batch) % len(plan.tasks), jnp.int32)
    executed = edges.compiled_flops(step.lower(x, task, jax.random.key(0)))
    params = model.spec.params
    useful = 6.0 * params.total * batch
    for s in range(2):
        jax.block_until_ready(step(x, task, jax.random.key(s)))
    times = []
    for s in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(x, task, jax.random.key(100 + s)))
        times.append(time.perf_counter() - start)
    print(json.dumps({
        "batch": batch, "latent": model.config.latent, "connect": model.config.connect,
        "params": params.to_json(),
        "connections": len(model.conns),
        "connection_groups": len(model.conns.groups),
        "executed_flops": executed, "useful_flops": useful,
        "executed_over_useful": executed / useful,
        "pool_padding_waste": model.layout.padding_waste(),
        "step_seconds_median": float(np.median(times)), "repeats": args.repeats,
        "load_average": [load_start, os.getloadavg()[0]],
        "device": jax.devices()[0].device_kind, "jax": jax.__version__}, indent=1))


if __name__ == "__main__":
    main()
