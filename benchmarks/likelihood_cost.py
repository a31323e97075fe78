"""How many importance draws to vectorise per loop step (``bound.DRAWS_AT_ONCE``)? Times
``likelihood.image_nll`` (k = 64) of a case-study task model and of its largest learner alone
on ``--num`` images for each value of ``--at-once``, and for a plain ``jax.lax.map`` (one draw
a step, no batch axis: ``"lax.map"``), checks that every way gives the same NLLs, and prints
one JSON object.

The task model is cut from the case study's BAIM (random weights and connections, as in
``request_cost.py``: cost does not depend on training). Medians of ``--repeats`` calls after
one warm-up call (the compile).

    python benchmarks/likelihood_cost.py [--num 250] [--at-once 1 2 4 8 16 64] [--repeats 3]
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

from baim_jax.core import bound  # noqa: E402
from baim_jax.core.edge_model import EdgeModel  # noqa: E402
from baim_jax.core.partition import partition  # noqa: E402
from baim_jax.evaluation import likelihood  # noqa: E402
from baim_jax.evaluation.data import Split  # noqa: E402


def _timed(model, data: Split, repeats: int) -> tuple[float, np.ndarray]:
    nll = likelihood.image_nll(model, data)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        likelihood.image_nll(model, data)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=250)
    parser.add_argument("--at-once", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    case_study_baim.add_design_flags(parser)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    plan, baim = case_study_baim.build(args.latent, args.connect)
    model = partition(baim, plan.tasks[0])
    gated = [e for e in model.spec.learners if e.member.squad is not None]
    largest = max(gated, key=lambda e: e.params)
    alone = EdgeModel(largest.member.spec, model.task, seed=0)
    x = np.random.default_rng(1).random((args.num, *model.spec.image_shape), np.float32)
    data = Split(x, np.zeros(args.num, np.int64), np.zeros(args.num, np.int64))
    default, map_draws = bound.DRAWS_AT_ONCE, bound.map_draws
    seconds, first, differs = {}, {}, {}
    try:
        for at_once in ["lax.map", *args.at_once]:
            if at_once == "lax.map":
                bound.map_draws = jax.lax.map
            else:
                bound.map_draws, bound.DRAWS_AT_ONCE = map_draws, at_once
            jax.clear_caches()  # the jitted estimator reads both when it traces
            for name, m in (("task_model", model), ("largest_learner", alone)):
                t, nll = _timed(m, data, args.repeats)
                seconds.setdefault(name, {})[str(at_once)] = t
                first.setdefault(name, nll)
                differs[name] = max(differs.get(name, 0.0),
                                    float(np.max(np.abs(nll - first[name]))))
    finally:
        bound.map_draws, bound.DRAWS_AT_ONCE = map_draws, default
    print(json.dumps({"num": args.num, "k": likelihood.IW_SAMPLES, "default": default,
                      "latent": model.config.latent, "connect": model.config.connect,
                      "task_model_params": model.spec.params.total,
                      "largest_learner_params": largest.params, "seconds": seconds,
                      "max_abs_nll_difference": differs, "repeats": args.repeats,
                      "load_average": [load_start, os.getloadavg()[0]],
                      "device": jax.devices()[0].device_kind}, indent=1))


if __name__ == "__main__":
    main()
