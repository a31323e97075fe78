"""Tunes the case study on validation data, giving every approach its fair chance (issue 4).

The held-out test set is never looked at. A validation set is cut from the cloud's common data
(``--val-fraction``, by seed); the cloud and FedAvg's cloud epochs train on the rest. At the
case study's fixed epoch budget (equal total epochs, DESIGN.md Sec. 1), coordinate search by
validation negative ELBO (nats/image, posterior mean, routing by task id):

1. the edges' learning rate (every edge model's loss on its own task's validation images);
2. with those uploads, the cloud learning rate of each strategy (finetune, freeze, scratch);
3. K, then rho, then h, with finetune at its chosen rate (the toolkit strategy; the same
   architecture then serves all three strategies);
4. FedAvg's learning rate.

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
from baim_jax.core import learners as L
from baim_jax.core import strategies
from baim_jax.core.edge_model import EdgeModel
from baim_jax.evaluation.data import Split
from baim_jax.framework import edges as edges_lib
from baim_jax.framework import fedavg, plan as plan_lib
from baim_jax.framework.cloud import Pruning, Trainer, aggregate, epoch_batches, test_loss

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "case_study.py"
RATES = [1e-3, 3e-3, 1e-2]


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


def train_edges(plan, lr: float) -> list[EdgeModel]:
    cfg = plan.config.edge
    trainer = edges_lib.EdgeTrainer(plan.specs, [s.images for s in plan.data.edges],
                                    batch_size=cfg.batch_size, learning_rate=lr,
                                    seed=plan.config.seed)
    for epoch in range(cfg.epochs):
        trainer.run_epoch(epoch)
    return [EdgeModel(s, plan.tasks[t], params=p)
            for s, t, p in zip(plan.specs, plan.edge_tasks, trainer.params())]


def train_cloud(plan, uploads, cloud: Split, strategy: str, lr: float, **baim_changes):
    cfg, seed = plan.config.cloud, plan.config.seed
    baim_config = dataclasses.replace(plan.baim, **{k: v for k, v in baim_changes.items()
                                                    if k in ("k", "h")})
    rho = baim_changes.get("rho", cfg.rho)
    model = aggregate(uploads, plan.tasks, baim_config, seed=seed,
                      max_upload_params=cfg.max_upload_params)
    strategies.prepare(model, strategy, seed + 1)
    steps = len(epoch_batches(len(cloud.images), cfg.batch_size, 0, 0))
    total = cfg.epochs * steps
    pruning = Pruning(rho, int(cfg.prune_start * total), max(int(cfg.prune_end * total), 1),
                      cfg.prune_every)
    trainer = Trainer(model, strategy, learning_rate=lr, batch_size=cfg.batch_size,
                      seed=seed + 2, pruning=pruning)
    for epoch in range(cfg.epochs):
        trainer.run_epoch(cloud, epoch)
    return model


def train_fl(plan, cloud: Split, lr: float) -> EdgeModel:
    cfg, seed = plan.config.fl, plan.config.seed
    spec = max(plan.specs, key=L.count_params)
    shards = [s.images for s in plan.data.edges]
    kw = dict(batch_size=cfg.batch_size, learning_rate=lr)
    edge_trainer = edges_lib.EdgeTrainer([spec] * len(shards), shards, seed=seed + 4, **kw)
    cloud_trainer = edges_lib.EdgeTrainer([spec], [cloud.images], seed=seed + 5, **kw)
    params = L.init_learner(spec, jax.random.key(seed + 3))
    for r in range(cfg.rounds):
        params = fedavg.fedavg_round(params, edge_trainer, cloud_trainer, r)
    return EdgeModel(spec, "all", params=params)


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
    bar = tqdm(total=2 + 3 * len(RATES) + 3 * 3 + len(RATES), desc="tuning", unit="trial")

    def record(stage: str, setting: dict, loss: float) -> float:
        trials.append({"stage": stage, **setting, "val_loss": loss})
        bar.set_postfix(last=f"{stage} {setting} {loss:.1f}")
        bar.update()
        return loss

    def best(stage: str, key: str):
        rows = [t for t in trials if t["stage"] == stage]
        return min(rows, key=lambda t: t["val_loss"])[key]

    uploads_by_lr = {}
    for lr in RATES[:2]:
        uploads = train_edges(plan, lr)
        uploads_by_lr[lr] = uploads
        losses = [test_loss(m, take(val, np.flatnonzero(val.tasks == plan.edge_tasks[e])))
                  for e, m in enumerate(uploads)]
        record("edges", {"learning_rate": lr}, float(np.mean(losses)))
    chosen["edge.learning_rate"] = best("edges", "learning_rate")
    uploads = uploads_by_lr[chosen["edge.learning_rate"]]
    for strategy in config.strategies:
        for lr in RATES:
            model = train_cloud(plan, uploads, cloud, strategy, lr)
            record(f"cloud_{strategy}", {"learning_rate": lr}, test_loss(model, val))
        chosen[f"cloud.learning_rate[{strategy}]"] = best(f"cloud_{strategy}", "learning_rate")
    ft_lr = chosen["cloud.learning_rate[finetune]"]
    arch = {"k": config.baim.k, "rho": config.cloud.rho, "h": config.baim.h}
    base = min(t["val_loss"] for t in trials if t["stage"] == "cloud_finetune")
    for name, values in (("k", [1, 3]), ("rho", [0.25, 1.0]), ("h", [0, 2])):
        record(name, {name: arch[name]}, base)  # the current setting, already measured
        for v in values:
            model = train_cloud(plan, uploads, cloud, "finetune", ft_lr, **{**arch, name: v})
            record(name, {name: v}, test_loss(model, val))
        arch[name] = best(name, name)
        base = min(t["val_loss"] for t in trials if t["stage"] == name)
    chosen.update({"baim.k": arch["k"], "cloud.rho": arch["rho"], "baim.h": arch["h"]})
    for lr in RATES:
        record("fl", {"learning_rate": lr}, test_loss(train_fl(plan, cloud, lr), val))
    chosen["fl.learning_rate"] = best("fl", "learning_rate")
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
