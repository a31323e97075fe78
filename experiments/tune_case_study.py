"""Tunes the case study on validation data, giving every approach its fair chance (issue 4).

The held-out test set is never looked at. A validation set is cut from the cloud's common data
(``--val-fraction``, by seed); the cloud and FedAvg's cloud epochs train on the rest. At the
case study's fixed epoch budget (equal total epochs, docs/design.md §1), coordinate search by
validation negative ELBO (nats/image, ``likelihood.test_loss``, routing by task id):

1. the edges' learning rate (every edge model's loss on its own task's validation images);
2. with those uploads, the cloud learning rate of each strategy (finetune, freeze, scratch);
3. K, then rho, then h, with finetune at its chosen rate (the toolkit strategy; the same
   architecture then serves all three strategies);
4. FedAvg's learning rate.

Each search walks a ladder of values (learning rates 1e-4 to 3e-2 in steps of about 3, K 1 to
5, rho 0.25 / 0.5 / 1, h 0 to 2): it tries a few neighbouring rungs, then keeps stepping past
whichever end of the tried range is best, so that no choice sits at the edge of its grid
unless the ladder ends there. One seed: differences of a few nats are within its noise.

Prints one JSON object (every trial and the choices) and writes it to ``--out``.

    python experiments/tune_case_study.py [--out docs/case_study/tuning.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from baim_jax.cli import load_config
from baim_jax.core.edge_model import EdgeModel
from baim_jax.evaluation.data import Split
from baim_jax.evaluation.likelihood import test_loss
from baim_jax.framework import pipeline
from baim_jax.framework import plan as plan_lib

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "case_study.py"
LADDERS = {"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "k": [1, 2, 3, 4, 5],
           "rho": [0.25, 0.5, 1.0], "h": [0, 1, 2]}


def take(split: Split, idx: np.ndarray) -> Split:
    return Split(split.images[idx], split.labels[idx], split.tasks[idx])


def cut_validation(cloud: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """``(train, validation)`` from the cloud's data, stratified by task."""
    rng = np.random.default_rng(seed)
    val = np.concatenate([
        rng.permutation(np.flatnonzero(cloud.tasks == t))[: max(1, round(fraction * np.sum(
            cloud.tasks == t)))] for t in np.unique(cloud.tasks)])
    keep = np.setdiff1d(np.arange(len(cloud.images)), val)
    return take(cloud, keep), take(cloud, np.sort(val))


def train_edges(plan, lr: float) -> tuple[list[EdgeModel], dict | None]:
    """The edges phase's training (``pipeline.edge_trainer``) at rate ``lr``: the uploads,
    and with early stopping each edge's epochs (``EdgeTrainer.stopping``), else None."""
    trainer = pipeline.edge_trainer(plan, lr)
    for epoch in range(plan.config.edge.epochs):
        trainer.run_epoch(epoch)  # a no-op once every edge has stopped early
    uploads = [EdgeModel(s, plan.tasks[t], params=p)
               for s, t, p in zip(plan.specs, plan.edge_tasks, trainer.params())]
    return uploads, trainer.stopping() if plan.config.edge.patience else None


def train_cloud(plan, uploads, cloud: Split, strategy: str, lr: float, **baim_changes):
    """A cloud phase's training (``pipeline.cloud_trainer``) on ``cloud``, with rho, the
    decoder pruning or any field of the BAIM's config (K, h, connect, ...) changed."""
    cloud_keys = ("rho", "decoder_pruning")
    baim_config = dataclasses.replace(plan.baim, **{k: v for k, v in baim_changes.items()
                                                    if k not in cloud_keys})
    trainer = pipeline.cloud_trainer(plan, uploads, strategy, lr, cloud, baim=baim_config,
                                     rho=baim_changes.get("rho"),
                                     decoder_pruning=baim_changes.get("decoder_pruning"))
    for epoch in range(plan.config.cloud.epochs):
        trainer.run_epoch(epoch)
    return trainer.model


def train_fl(plan, cloud: Split, lr: float) -> EdgeModel:
    """The FL phase's rounds (``pipeline.fl_trainers``) with ``cloud`` as the cloud's data."""
    trainer = pipeline.fl_trainer(plan, lr, cloud)
    for r in range(plan.config.fl.rounds):
        trainer.run_epoch(r)
    return trainer.model()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--out", default="docs/case_study/tuning.json")
    args = parser.parse_args()
    config = load_config(str(CONFIG), [])
    plan = plan_lib.validate(config)
    cloud, val = cut_validation(plan.data.cloud, args.val_fraction, config.seed)
    trials, chosen = [], {}
    start = time.perf_counter()
    bar = tqdm(total=2 + 4 * 3 + 3 * 2, desc="tuning", unit="trial")

    def search(stage: str, name: str, first: list, evaluate, known: dict | None = None):
        """Tries ``first`` (neighbouring rungs of ``LADDERS[name]``), then the next rung beyond
        whichever end of the tried range is best, until the best is inside it or the ladder
        ends. Returns the value with the lowest validation loss."""
        ladder, tried = LADDERS[name], dict(known or {})
        for value, loss in tried.items():  # measured by the previous stage
            trials.append({"stage": stage, name: value, "val_loss": loss, "reused": True})

        def trial(value):
            loss = evaluate(value)
            finite = bool(np.isfinite(loss))
            tried[value] = loss if finite else float("inf")  # diverged: worst of all
            trials.append({"stage": stage, name: value, "val_loss": loss if finite else None,
                           "diverged": not finite})
            bar.set_postfix(last=f"{stage} {name}={value} {loss:.1f}")
            bar.update()

        for value in first:
            if value not in tried:
                trial(value)
        while True:
            best = min(tried, key=tried.get)
            rungs = sorted(ladder.index(v) for v in tried)
            if ladder.index(best) == rungs[0] and rungs[0] > 0:
                nxt = ladder[rungs[0] - 1]
            elif ladder.index(best) == rungs[-1] and rungs[-1] < len(ladder) - 1:
                nxt = ladder[rungs[-1] + 1]
            else:
                return best, tried[best]
            bar.total += 1
            trial(nxt)

    uploads = {}

    def edges_loss(lr):
        uploads[lr], _ = train_edges(plan, lr)
        return float(np.mean([
            test_loss(m, take(val, np.flatnonzero(val.tasks == plan.edge_tasks[e])))
            for e, m in enumerate(uploads[lr])]))

    chosen["edge.learning_rate"], _ = search("edges", "learning_rate", [1e-3, 3e-3], edges_loss)
    best_uploads = uploads[chosen["edge.learning_rate"]]
    best_loss = {}
    for strategy in config.strategies:
        chosen[f"cloud.learning_rate[{strategy}]"], best_loss[strategy] = search(
            f"cloud_{strategy}", "learning_rate", [1e-3, 3e-3, 1e-2],
            lambda lr: test_loss(train_cloud(plan, best_uploads, cloud, strategy, lr), val))
    ft_lr = chosen["cloud.learning_rate[finetune]"]
    arch = {"k": config.baim.k, "rho": config.cloud.rho, "h": config.baim.h}
    base = best_loss["finetune"]
    for name, first in (("k", [1, 3]), ("rho", [0.25, 1.0]), ("h", [0, 2])):
        arch[name], base = search(name, name, first, lambda v: test_loss(train_cloud(
            plan, best_uploads, cloud, "finetune", ft_lr, **{**arch, name: v}), val),
            known={arch[name]: base})
    chosen.update({"baim.k": arch["k"], "cloud.rho": arch["rho"], "baim.h": arch["h"]})
    chosen["fl.learning_rate"], _ = search(
        "fl", "learning_rate", [1e-3, 3e-3, 1e-2],
        lambda lr: test_loss(train_fl(plan, cloud, lr), val))
    bar.close()
    out = {"protocol": __doc__.split("\n\n")[1].replace("\n", " "),
           "validation_images": len(val.images), "cloud_train_images": len(cloud.images),
           "epochs": {"edge": config.edge.epochs, "cloud": config.cloud.epochs,
                      "fl_rounds": config.fl.rounds},
           "trials": trials, "chosen": chosen,
           "wall_seconds": time.perf_counter() - start,
           "device": jax.devices()[0].platform}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
