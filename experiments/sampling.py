"""Why do a trained BAIM's samples score worse FID than its learners' (issue 4)?

DESIGN.md Sec. 3 samples a BAIM by decoding one shared standard normal vector in every learner
(learner n takes its first d_n coordinates), so that connected decoders see consistent noise.
But the connections were trained on the learners' *posterior* latents of the same image, which
do not share coordinates. This script measures, for each strategy's BAIM of a finished run:

* ``mixture``: the default (one learner per image, drawn with the prior gate);
* ``blend``: the prior-weighted average of the K learners' outputs;
* ``connections off``: ``mixture`` with every connection masked (each learner decodes alone);
* ``mixture + refine r``: the ``mixture`` samples re-encoded and decoded through the BAIM
  (posterior mean) r times, which gives every learner latents of one and the same image;

and, for comparison, the FedAvg model's samples with and without one refinement. FID is the
run's (its feature network, the held-out test images as reference, as many samples per task as
the reference holds). Prints one JSON object and writes it to ``--out``.

    python experiments/sampling.py --workdir runs/case_study [--out docs/case_study/sampling.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import baim_jax
from baim_jax.evaluation.fid import fid
from baim_jax.framework import measures
from baim_jax.framework import plan as plan_lib
from baim_jax.framework import storage


def per_task(model, test, fn) -> np.ndarray:
    """``fn(task name, n, key)`` for every task, concatenated in the reference's task order."""
    return np.concatenate([np.asarray(fn(name, int(np.sum(test.tasks == t)),
                                         jax.random.fold_in(jax.random.key(0), t)))
                           for t, name in enumerate(model.tasks)])


def refine(model, images: np.ndarray, test, rounds: int) -> np.ndarray:
    out = images
    for _ in range(rounds):
        parts, start = [], 0
        for t, name in enumerate(model.tasks):
            n = int(np.sum(test.tasks == t))
            parts.append(np.asarray(model.reconstruct(out[start:start + n], task=name)["mean"]))
            start += n
        out = np.concatenate(parts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a finished run of the case study")
    parser.add_argument("--out", default="docs/case_study/sampling.json")
    args = parser.parse_args()
    run = Path(args.workdir)
    config = storage.run_config(run)
    plan = plan_lib.validate(config)
    test = plan.data.test
    extract, _ = measures.feature_space(run / "feature_nets", config.data.dataset, plan.train,
                                        test, num_classes=10, epochs=config.fid.feature_epochs,
                                        seed=config.seed)
    score = lambda images: float(fid(test.images, images, extract))  # noqa: E731
    out = {"workdir": str(run), "fid_floor": json.loads(
        (run / "results.json").read_text())["fid_floor"], "baim": {}}
    for strategy in config.strategies:
        model = baim_jax.load(run / "baim" / strategy)
        mixture = per_task(model, test, lambda name, n, key: model.sample(n, task=name, rng=key))
        row = {"mixture": score(mixture),
               "blend": score(per_task(model, test, lambda name, n, key: model.sample(
                   n, task=name, rng=key, mode="blend"))),
               "mixture + refine 1": score(refine(model, mixture, test, 1)),
               "mixture + refine 2": score(refine(model, mixture, test, 2))}
        for m in model.kept:
            m[...] = jnp.zeros_like(m[...])
        row["connections off"] = score(per_task(
            model, test, lambda name, n, key: model.sample(n, task=name, rng=key)))
        out["baim"][strategy] = row
    fl = baim_jax.load(run / "fl")
    samples = np.asarray(fl.sample(len(test.images), task=None, rng=jax.random.key(0)))
    out["fl"] = {"sample": score(samples),
                 "sample + refine 1": score(np.asarray(fl.reconstruct(samples)["mean"]))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
