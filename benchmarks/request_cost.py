"""Does a request cost what it needs? A case-study task model against its largest learner
alone (prints one JSON object).

The task model is cut from the case study's BAIM (configs/case_study.py: 5 learners of 0.05M to
1.09M parameters per task, h = 2, every connection of its connected towers kept; random weights
and connections: cost does not depend on training), or read from a finished run with
``--workdir``. For ``sample(n)`` the work a request needs is the decoder stages and kept decoder
connections of the paths its drawn learners consume, for ``reconstruct(n)`` the encoders too;
``ratio`` is that parameter count over the largest learner's (its decoder alone for sampling),
and the goal is a time ratio of at most twice it. With shared latents (``--latent`` overrides
the config's) ``reconstruct`` decodes once per selected learner, so its decoders count K times.
Medians of ``--repeats`` calls after two warm-up calls.

    python benchmarks/request_cost.py [--workdir runs/case_study] [--num 16] [--repeats 20]
                                      [--latent own|shared] [--connect enc dec]
"""

from __future__ import annotations

import argparse
import json
import math
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

import baim_jax  # noqa: E402
from baim_jax.core import learners  # noqa: E402
from baim_jax.core.edge_model import EdgeModel  # noqa: E402
from baim_jax.core.partition import partition  # noqa: E402


def task_model(workdir: str | None, latent: str | None, connect: list[str] | None):
    if workdir:
        results = json.loads((Path(workdir) / "results.json").read_text())
        name = sorted(results["toolkit"])[0]
        return baim_jax.load(Path(workdir) / "toolkit" / name)
    plan, model = case_study_baim.build(latent, connect)
    return partition(model, plan.tasks[0])


def _median(fn, repeats: int) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(0))
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(r + 1))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _decoder_params(member) -> int:
    """The decoder parameters a member keeps (a feeder: its first stages only)."""
    stages = learners.stages(member.spec)["dec"]
    kept = len(stages) if member.keep is None else member.keep[1]
    return sum(math.prod(v) for s in stages[:kept]
               for v in learners.stage_param_shapes(s).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir")
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    case_study_baim.add_design_flags(parser)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    model = task_model(args.workdir, args.latent, args.connect)
    spec = model.spec
    gated = [e for e in spec.learners if e.member.squad is not None]
    largest = max(gated, key=lambda e: e.params)
    alone = EdgeModel(largest.member.spec, model.task, seed=0)
    # A request of 16 draws every learner of the squad (nearly surely): it runs every decoder
    # stage its learners and feeders keep and every kept decoder connection.
    dec = sum(_decoder_params(e.member) for e in spec.learners)
    dec_conn = sum(math.prod(model.conns.real_kernel_shape(c))
                   for c, kept in zip(spec.connections, spec.kept) if kept and c.tower == "dec")
    passes = model.config.k if model.config.latent == "shared" else 1
    need = {"sample": (dec + dec_conn) / _decoder_params(largest.member),
            "reconstruct": (spec.params.total + (passes - 1) * (dec + dec_conn)) / largest.params}
    x = jnp.asarray(np.random.default_rng(1).random((args.num, *spec.image_shape), np.float32))
    times = {}
    for name, m in (("task_model", model), ("largest_learner", alone)):
        times[name] = {
            "sample": _median(lambda r: m.sample(args.num, task=None, rng=jax.random.key(r)),
                              args.repeats),
            "reconstruct": _median(lambda r: m.reconstruct(x, rng=jax.random.key(r))["mean"],
                                   args.repeats)}
    out = {}
    for request in ("sample", "reconstruct"):
        ratio = times["task_model"][request] / times["largest_learner"][request]
        out[request] = {"task_model_seconds": times["task_model"][request],
                        "largest_learner_seconds": times["largest_learner"][request],
                        "time_ratio": ratio, "params_ratio": need[request],
                        "goal_time_ratio": 2 * need[request],
                        "met": ratio <= 2 * need[request]}
    print(json.dumps({"num": args.num, "latent": model.config.latent,
                      "connect": model.config.connect,
                      "task_model_params": spec.params.total,
                      "largest_learner_params": largest.params, **out,
                      "repeats": args.repeats, "load_average": [load_start, os.getloadavg()[0]],
                      "device": jax.devices()[0].device_kind}, indent=1))


if __name__ == "__main__":
    main()
