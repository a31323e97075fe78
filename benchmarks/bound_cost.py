"""What does scoring the bound's draws at once save? Times ``likelihood.image_bounds`` (the
test-loss curves' and scores' estimator: ``BOUND_SAMPLES`` draws of every image, one program
per batch through ``model.bounds``) of the case study's BAIM and of a task model cut from it,
against the same draws one call of ``model.bound`` each (how it ran before: the gate and
encoders once a draw), checks that both give the same bounds, and prints one JSON object.

Random weights and connections (``case_study_baim``: cost does not depend on training).
Medians of ``--repeats`` calls after one warm-up call (the compile).

    python benchmarks/bound_cost.py [--num 500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import case_study_baim  # noqa: E402

from baim_jax.core.partition import partition  # noqa: E402
from baim_jax.evaluation import likelihood  # noqa: E402
from baim_jax.evaluation.data import Split  # noqa: E402


def one_at_a_time(model, data: Split) -> np.ndarray:
    """``image_bounds(model, data)["nelbo"]`` for one batch, drawn one ``bound`` call a key."""
    key = jax.random.fold_in(jax.random.key(0), 0)
    draws = [model.bound(data.images, task=data.tasks if len(model.tasks) > 1 else 0,
                         rng=jax.random.fold_in(key, s))["nelbo"]
             for s in range(likelihood.BOUND_SAMPLES)]
    return np.mean(np.asarray(draws, np.float64), axis=0)


def _median(fn, repeats: int) -> tuple[float, np.ndarray]:
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    case_study_baim.add_design_flags(parser)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    plan, baim = case_study_baim.build(args.latent, args.connect)
    rng = np.random.default_rng(1)
    x = rng.random((args.num, *plan.specs[0].image_shape), np.float32)
    tasks = rng.integers(0, len(plan.tasks), args.num)
    seconds, differs = {}, {}
    for name, model, data in (
            ("baim", baim, Split(x, np.zeros(args.num, np.int64), tasks)),
            ("task_model", partition(baim, plan.tasks[0]),
             Split(x, np.zeros(args.num, np.int64), np.zeros(args.num, np.int64)))):
        at_once, a = _median(lambda m=model, d=data: likelihood.image_bounds(
            m, d, batch=args.num)["nelbo"], args.repeats)
        each, b = _median(lambda m=model, d=data: one_at_a_time(m, d), args.repeats)
        seconds[name] = {"at_once": at_once, "one_at_a_time": each}
        differs[name] = float(np.max(np.abs(a - b)))
    print(json.dumps({"num": args.num, "draws": likelihood.BOUND_SAMPLES,
                      "latent": baim.config.latent, "connect": baim.config.connect,
                      "seconds": seconds, "max_abs_nelbo_difference": differs,
                      "repeats": args.repeats,
                      "load_average": [load_start, os.getloadavg()[0]],
                      "device": jax.devices()[0].device_kind}, indent=1))


if __name__ == "__main__":
    main()
