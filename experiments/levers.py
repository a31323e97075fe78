"""Which levers make the BAIM route honest winners? Each lever of the fine-tuned BAIM measured on
validation data only (the test split is not looked at), against FedAvg and the central
reference trained on the same images.

A validation set is cut from the cloud's common data (``--val-fraction``, stratified by task,
as ``tune_case_study.py`` does); the cloud, FedAvg's cloud rounds and the central reference
train on the rest, at the case study's epochs (equal total epochs). The edges train once, with
the config's settings, and every BAIM is aggregated from those uploads. Each lever changes one
thing of the base, the config's BAIM with own latents (``--levers`` picks them by name);
every model is scored by the
importance-weighted NLL (k = 64) and the negative bound on the validation images.

Budget levers (``BUDGET_LEVERS``) change the config itself: the edges' training (early
stopping on a local validation share of each edge's images) or the cloud's share of the data.
Each gets its own split, its own edges and its own FedAvg and central, at equal total epochs:
FedAvg runs as many rounds as the most epochs an edge trained (or the cloud's epochs, if more),
central that many epochs plus the cloud's.

Prints one JSON object and writes it to ``--out`` (budget levers: ``--budget-out``, where the
levers measured before and not rerun stay).

    python experiments/levers.py [--out docs/case_study/levers.json]
    python experiments/levers.py --levers "edges stop early" [--budget-out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune_case_study import CONFIG, cut_validation, train_cloud, train_edges, train_fl  # noqa: E402

from baim_jax.cli import load_config  # noqa: E402
from baim_jax.core.edge_model import EdgeModel  # noqa: E402
from baim_jax.evaluation import likelihood  # noqa: E402
from baim_jax.evaluation.data import Split  # noqa: E402
from baim_jax.framework import pipeline  # noqa: E402
from baim_jax.framework import plan as plan_lib  # noqa: E402

BASE = {"latent": "own"}  # every lever changes one thing of the config's BAIM with own latents
LEVERS = {
    "base": {},
    "encoder connections only": {"connect": ("enc",)},
    "no connections": {"connect": ()},
    "shared latents": {"latent": "shared"},
    "h = 0": {"h": 0},
    "h = 1": {"h": 1},
    "rho = 0.25": {"rho": 0.25},
    "K = 2": {"k": 2},
    "K = 1": {"k": 1},
    "no gate noise": {"noise_std": 0.0},
    "encoder connections only, K = 2": {"connect": ("enc",), "k": 2},
    "both towers": {"connect": ("enc", "dec")},
    "both towers, decoder links pruned by KL cost": {"connect": ("enc", "dec"),
                                                     "decoder_pruning": "kl_cost"},
}

BUDGET_LEVERS = {  # config overrides
    "case study": [],
    "edges stop early": ["--config.edge.epochs=100", "--config.edge.validation_fraction=0.15",
                         "--config.edge.patience=3"],
    "cloud share 0.4": ["--config.data.cloud_fraction=0.4"],
    "cloud share 0.1": ["--config.data.cloud_fraction=0.1"],
    "edges stop early, cloud share 0.4": ["--config.edge.epochs=100",
                                          "--config.edge.validation_fraction=0.15",
                                          "--config.edge.patience=3",
                                          "--config.data.cloud_fraction=0.4"],
    "edges stop early at rate 3e-3": ["--config.edge.epochs=100",
                                      "--config.edge.validation_fraction=0.15",
                                      "--config.edge.patience=3",
                                      "--config.edge.learning_rate=3e-3"],
    # FedAvg keeps its constant rate: its clients start a fresh Adam every round.
    "cosine schedules": ["--config.cloud.schedule=cosine", "--config.central.schedule=cosine"],
    "prior pi by parameters": ["--config.baim.prior_init=params"],
}


def score(model, val: Split) -> dict:
    bounds = likelihood.image_bounds(model, val)
    return {"val_nll": float(likelihood.image_nll(model, val).mean()),
            "val_loss": float(bounds["nelbo"].mean()),
            "val_loss_parts": {p: float(bounds[p].mean()) for p in ("rec", "kl", "gate_kl")}}


def train_central(plan, cloud: Split) -> EdgeModel:
    """The central phase's training (``pipeline.central_trainer``) on ``cloud``'s images and
    every edge's."""
    images = np.concatenate([cloud.images, *[s.images for s in plan.data.edges]])
    trainer = pipeline.central_trainer(plan, images)
    for epoch in range(plan.config.central.epochs):
        trainer.run_epoch(epoch)
    return EdgeModel(pipeline.fl_spec(plan), "all", params=trainer.params()[0])


def budget_lever(overrides: list[str], val_fraction: float) -> dict:
    """The case study with ``overrides``: its edges, its fine-tuned BAIM, and FedAvg and
    central at equal total epochs, all scored on its own validation cut."""
    config = load_config(str(CONFIG), overrides)
    plan = plan_lib.validate(config)
    cloud, val = cut_validation(plan.data.cloud, val_fraction, config.seed)
    uploads, stopping = train_edges(plan, config.edge.learning_rate)
    edge_epochs = max(stopping["epochs"]) if stopping else config.edge.epochs
    config.fl.rounds = max(edge_epochs, config.cloud.epochs)
    config.central.epochs = edge_epochs + config.cloud.epochs
    model = train_cloud(plan, uploads, cloud, "finetune", plan.cloud_learning_rate("finetune"))
    return {"overrides": overrides, "edge_epochs": stopping["epochs"] if stopping else
            [edge_epochs] * len(plan.specs),
            "edge_best_epochs": stopping["best_epoch"] if stopping else None,
            "fl_rounds": config.fl.rounds, "central_epochs": config.central.epochs,
            "validation_images": len(val.images), "cloud_train_images": len(cloud.images),
            "finetune": score(model, val), "fl": score(train_fl(plan, cloud,
                                                                config.fl.learning_rate), val),
            "central": score(train_central(plan, cloud), val)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--levers", nargs="*", default=list(LEVERS),
                        choices=[*LEVERS, *BUDGET_LEVERS])
    parser.add_argument("--out", default="docs/case_study/levers.json")
    parser.add_argument("--budget-out", default="docs/case_study/levers_budget.json")
    args = parser.parse_args()
    budget = [name for name in args.levers if name in BUDGET_LEVERS]
    if budget:
        start = time.perf_counter()
        path = Path(args.budget_out)
        out = {"levers": json.loads(path.read_text())["levers"] if path.exists() else {}}
        out["protocol"] = __doc__.split("\n\n")[2].replace("\n", " ")
        for name in tqdm(budget, desc="budget levers", unit="lever"):
            out["levers"][name] = budget_lever(BUDGET_LEVERS[name], args.val_fraction)
            tqdm.write(f"{name}: finetune {out['levers'][name]['finetune']['val_nll']:.1f}, "
                       f"fl {out['levers'][name]['fl']['val_nll']:.1f}, "
                       f"central {out['levers'][name]['central']['val_nll']:.1f}")
        out.update(wall_seconds=time.perf_counter() - start, device=jax.devices()[0].platform)
        Path(args.budget_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.budget_out).write_text(json.dumps(out, indent=1))
        print(json.dumps(out, indent=1))
        args.levers = [name for name in args.levers if name in LEVERS]
        if not args.levers:
            return
    config = load_config(str(CONFIG), [])
    plan = plan_lib.validate(config)
    cloud, val = cut_validation(plan.data.cloud, args.val_fraction, config.seed)
    start = time.perf_counter()
    bar = tqdm(total=3 + len(args.levers), desc="levers", unit="model")
    uploads, _ = train_edges(plan, config.edge.learning_rate)
    bar.update()
    rows = {"fl": score(train_fl(plan, cloud, config.fl.learning_rate), val)}
    bar.update()
    rows["central"] = score(train_central(plan, cloud), val)
    bar.update()
    levers = {}
    for name in args.levers:
        model = train_cloud(plan, uploads, cloud, "finetune",
                            plan.cloud_learning_rate("finetune"), **{**BASE, **LEVERS[name]})
        levers[name] = {"change": {k: list(v) if isinstance(v, tuple) else v
                                   for k, v in LEVERS[name].items()},
                        **score(model, val), "connections_kept": model.spec.connections_kept}
        bar.set_postfix(last=f"{name}: {levers[name]['val_nll']:.1f}")
        bar.update()
    bar.close()
    out = {"protocol": __doc__.split("\n\n")[1].replace("\n", " "), "base": BASE,
           "validation_images": len(val.images), "cloud_train_images": len(cloud.images),
           "baselines": rows, "finetune_levers": levers,
           "wall_seconds": time.perf_counter() - start, "device": jax.devices()[0].platform}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
