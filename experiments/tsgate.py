"""Why does the case study's TSGate route only 68-77% of the test images to their task?

The TSGate (docs/design.md §3) is a linear head on phi(x), one ReLU layer shared with the
LSGates; the cloud trains it with cross-entropy (weight ``baim.task_loss_weight``) beside the
gated bound, on its own data only, for ``cloud.epochs`` epochs. For a finished run this script
measures, on the held-out test images:

* ``baim``: each strategy's trained BAIM (its phi and TSGate);
* ``probe on the baim's phi``: a fresh TSGate head trained to convergence on that BAIM's
  frozen phi (cloud data): is phi the limit, or the head's training?
* ``alone, same recipe``: phi and TSGate trained with the cross-entropy only, with the cloud's
  batch size, learning rate and steps (no LSGate, no bound sharing phi);
* ``alone, 20x the steps``: the same, trained 20 times longer;
* ``alone, all training images``: as the previous, on every training image (cloud and edges;
  the edges' data is private in the paper's setting, so this is an upper reference only).

Each row gives the test accuracy and the cloud-data accuracy. Prints one JSON object and writes
it to ``--out``.

    python experiments/tsgate.py --workdir runs/case_study [--out docs/case_study/tsgate.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import baim_jax
from baim_jax.core import gates
from baim_jax.framework import plan as plan_lib
from baim_jax.framework import rundir
from baim_jax.framework.cloud import epoch_batches


def accuracy(gate: dict, x: np.ndarray, tasks: np.ndarray) -> float:
    return float(np.mean(np.asarray(jnp.argmax(gates.task_logits(gate, jnp.asarray(x)), -1))
                         == tasks))


def init_gate(shape: tuple[int, int, int], features: int, tasks: int, seed: int) -> dict:
    """phi and TSGate initialised as a BAIM's (``gates.init_gate``), without LSGate."""
    gate = gates.init_gate(np.random.default_rng(seed), shape, features, 0, tasks)
    return {"phi": gate["phi"], "ts": gate["ts"]}


def train(gate: dict, x: np.ndarray, tasks: np.ndarray, *, steps: int, batch_size: int,
          learning_rate: float, seed: int, train_phi: bool) -> dict:
    """Adam on the TSGate cross-entropy, ``steps`` steps of shuffled full batches."""
    tx = optax.adam(learning_rate)
    trainable = gate if train_phi else {"ts": gate["ts"]}
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, state, xb, yb):
        def loss(p):
            full = p if train_phi else {"phi": gate["phi"], "ts": p["ts"]}
            logp = jax.nn.log_softmax(gates.task_logits(full, xb), -1)
            return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], -1))
        grads = jax.grad(loss)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    done, epoch = 0, 0
    while done < steps:
        for idx in epoch_batches(len(x), batch_size, seed, epoch):
            if done == steps:
                break
            trainable, state = step(trainable, state, jnp.asarray(x[idx]), jnp.asarray(tasks[idx]))
            done += 1
        epoch += 1
    return trainable if train_phi else {"phi": gate["phi"], "ts": trainable["ts"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a finished run of the case study")
    parser.add_argument("--out", default="docs/case_study/tsgate.json")
    args = parser.parse_args()
    run = Path(args.workdir)
    config = rundir.run_config(run)
    plan = plan_lib.validate(config)
    cloud, test, train_all = plan.data.cloud, plan.data.test, plan.train
    cfg, seed = config.cloud, config.seed
    steps = cfg.epochs * len(epoch_batches(len(cloud.images), cfg.batch_size, 0, 0))
    recipe = {"batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "seed": seed}

    def row(gate: dict, steps_trained: int | None = None) -> dict:
        out = {"test_accuracy": accuracy(gate, test.images, test.tasks),
               "cloud_accuracy": accuracy(gate, cloud.images, cloud.tasks)}
        if steps_trained is not None:
            out["steps"] = steps_trained
        return out

    out = {"workdir": str(run), "cloud_images": len(cloud.images),
           "train_images": len(train_all.images), "test_images": len(test.images),
           "cloud_steps": steps, "feature_dim": config.baim.feature_dim,
           "task_loss_weight": config.baim.task_loss_weight,
           "test_share_of_largest_task": float(np.bincount(test.tasks).max() / len(test.tasks)),
           "baim": {}, "probe on the baim's phi": {}}
    for strategy in config.strategies:
        model = baim_jax.load(run / "baim" / strategy)
        gate = jax.tree.map(np.asarray, model.export_tree()["gate"])
        gate = {"phi": gate["phi"], "ts": gate["ts"]}
        out["baim"][strategy] = row(gate)
        probe = train(gate, cloud.images, cloud.tasks, steps=20 * steps, train_phi=False,
                      **recipe)
        out["probe on the baim's phi"][strategy] = row(probe, 20 * steps)
    shape = tuple(cloud.images.shape[1:])
    fresh = init_gate(shape, config.baim.feature_dim, len(plan.tasks), seed)
    out["alone, same recipe"] = row(train(fresh, cloud.images, cloud.tasks, steps=steps,
                                          train_phi=True, **recipe), steps)
    out["alone, 20x the steps"] = row(train(fresh, cloud.images, cloud.tasks, steps=20 * steps,
                                            train_phi=True, **recipe), 20 * steps)
    out["alone, all training images"] = row(train(
        fresh, train_all.images, train_all.tasks, steps=20 * steps, train_phi=True, **recipe),
        20 * steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
