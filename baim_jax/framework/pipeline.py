"""The edge-cloud workflow as one resumable job (paper Sec. III, steps 1 to 6, and FedAvg).

Phases, in order; each leaves ``phases/<name>.json`` in the workdir when it is finished:

* ``features``: the FID feature network of the dataset (trained on the run's real training
  images, cached in ``feature_nets/``) and the real-vs-real FID floor.
* ``edges``: every edge trains its model on its shard (sharded over ``edge``) and uploads it;
  ``edges/<id>/initial/``.
* ``cloud_<strategy>``: aggregation of the uploads into a BAIM and its training on the cloud's
  common data with the strategy, pruning connections; ``baim/<strategy>/``.
* ``toolkit``: the toolkit strategy's BAIM cut into one task model per task; ``toolkit/<task>/``,
  and its TSGate alone, ``router/`` (serves requests that carry images but no task).
* ``personalize``: every edge downloads its task's model and fine-tunes it on its shard;
  ``edges/<id>/personalized/``.
* ``fl``: the FedAvg baseline; ``fl/``.

Inside a phase, training state (model, optimiser, curves, elapsed time) is checkpointed with
orbax after every epoch (``ckpt/<phase>/``). Models are saved atomically. Data order and noise
are functions of (seed, epoch, step), so a rerun after an interruption at any moment resumes
from the last checkpoint and ends with the same results as an uninterrupted run.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from baim_jax import checkpoint
from baim_jax.core import learners, optim, strategies
from baim_jax.core.baim import BAIMConfig
from baim_jax.core.edge_model import EdgeModel
from baim_jax.core.partition import partition
from baim_jax.core.router import TaskRouter
from baim_jax.evaluation import claims, likelihood, measures
from baim_jax.evaluation.data import Split
from baim_jax.evaluation.fid import fid
from baim_jax.files import read_json, write_json
from baim_jax.framework import accounting, fedavg
from baim_jax.framework import edges as edges_lib
from baim_jax.framework.cloud import Pruning, Trainer, aggregate, epoch_batches
from baim_jax.framework.plan import Plan, validate
from baim_jax.framework.rundir import PhaseCheckpoint, claim, train_epochs

PHASE_BARS = {"edges": "edges: local training", "fl": "fl: FedAvg rounds",
              "central": "central: all training images"}


def _bar(total: int, done: int, desc: str, show: bool):
    return tqdm(total=total, initial=done, desc=desc, unit="step", dynamic_ncols=True,
                disable=not show, leave=False)


# ----------------------------------------------------------------------------------- phases


def _devices(plan: Plan):
    devices = jax.devices()
    return devices[:plan.config.devices] if plan.config.devices else devices


def edge_trainer(plan: Plan, learning_rate: float) -> edges_lib.EdgeTrainer:
    """Every edge's local training (paper step 1), as the edges phase runs it: with
    ``edge.patience``, each edge stops early on its local validation images."""
    return edges_lib.EdgeTrainer(
        plan.specs, plan.edge_train, batch_size=plan.config.edge.batch_size,
        learning_rate=learning_rate, seed=plan.config.seed, devices=_devices(plan),
        validation=plan.edge_validation, patience=plan.config.edge.patience)


def cloud_trainer(plan: Plan, uploads: list[EdgeModel], strategy: str, learning_rate: float,
                  data: Split, *, baim: BAIMConfig | None = None,
                  rho: float | None = None, decoder_pruning: str | None = None) -> Trainer:
    """A BAIM aggregated from ``uploads``, prepared for ``strategy`` and set to train on
    ``data`` with the pruning schedule (paper steps 2 to 4), as the cloud phases run it;
    ``baim``, ``rho`` and ``decoder_pruning`` override the plan's (tuning). With
    ``decoder_pruning = "kl_cost"`` the decoder links are pruned by their KL cost on ``data``
    at the schedule's end. The BAIM is ``trainer.model``."""
    cfg, seed = plan.config.cloud, plan.config.seed
    model = aggregate(uploads, plan.tasks, baim or plan.baim, seed=seed,
                      max_upload_params=cfg.max_upload_params)
    strategies.prepare(model, strategy, seed + 1)
    total = cfg.epochs * len(epoch_batches(len(data.images), cfg.batch_size, 0, 0))
    by_cost = (decoder_pruning or cfg.decoder_pruning) == "kl_cost"
    pruning = Pruning.over(total, cfg.rho if rho is None else rho, cfg.prune_start,
                           cfg.prune_end, cfg.prune_every, links=data if by_cost else None)
    return Trainer(model, strategy, data, learning_rate=learning_rate,
                   batch_size=cfg.batch_size, seed=seed + 2, pruning=pruning,
                   decay_steps=optim.decay_steps(cfg.schedule, total))


def fl_trainer(plan: Plan, learning_rate: float, cloud: Split) -> fedavg.FedAvg:
    """FedAvg of the homogeneous model with ``cloud`` as the cloud's data, as the FL phase
    runs it."""
    spec, seed = fl_spec(plan), plan.config.seed
    kw = dict(batch_size=plan.config.fl.batch_size, learning_rate=learning_rate,
              devices=_devices(plan))
    edges = edges_lib.EdgeTrainer([spec] * len(plan.data.edges),
                                  [s.images for s in plan.data.edges], seed=seed + 4, **kw)
    at_cloud = edges_lib.EdgeTrainer([spec], [cloud.images], seed=seed + 5, **kw)
    return fedavg.FedAvg(spec, edges, at_cloud,
                         learners.init_learner(spec, jax.random.key(seed + 3)))


def central_trainer(plan: Plan, images: np.ndarray) -> edges_lib.EdgeTrainer:
    """The central reference's training on ``images``, as the central phase runs it."""
    cfg = plan.config.central
    total = cfg.epochs * math.ceil(len(images) / cfg.batch_size)
    return edges_lib.EdgeTrainer([fl_spec(plan)], [images], batch_size=cfg.batch_size,
                                 learning_rate=cfg.learning_rate, seed=plan.config.seed + 6,
                                 devices=_devices(plan),
                                 decay_steps=optim.decay_steps(cfg.schedule, total))


def _train(workdir: Path, phase: str, trainer, epochs: int, show: bool,
           observe=lambda epoch, out: {}, curves=()) -> dict:
    """``rundir.train_epochs`` of one phase, with its progress bar and its test-loss postfix.
    The epoch checkpoints stay until the phase's record is written (``run``), so a phase
    killed after its training resumes from its last epoch."""
    steps = trainer.steps_per_epoch
    ckpt = PhaseCheckpoint(workdir / "ckpt" / phase, warn=lambda line: tqdm.write(line,
                                                                                 file=sys.stderr))
    desc = PHASE_BARS.get(phase) or phase.replace("_", ": ", 1)
    with _bar(epochs * steps, 0, desc, show) as bar:
        def watch(epoch, out):
            seen = observe(epoch, out)
            if seen.get("curve") is not None:
                bar.set_postfix(test=f"{seen['curve']:.1f}")
            return seen

        try:
            meta = train_epochs(ckpt, trainer, epochs, watch, curves, bar.update,
                                lambda done: bar.update(done * steps - bar.n))
        except BaseException:
            ckpt.close(quietly=True)  # its threads stopped; the error above is what counts
            raise
    ckpt.close()
    return meta


def scores(model, data: Split, suffix: str = "") -> dict:
    """The held-out likelihood of ``model`` on ``data`` (docs/design.md §6): ``test_loss``
    (the negative bound), ``test_loss_parts`` (its reconstruction, latent KL and gate KL),
    ``test_nll`` (importance-weighted, k = 64) and both per class, keys ending in ``suffix``."""
    bounds = likelihood.image_bounds(model, data)
    nll = likelihood.image_nll(model, data)
    record = {"test_loss": float(bounds["nelbo"].mean()),
              "test_loss_parts": {p: float(bounds[p].mean()) for p in ("rec", "kl", "gate_kl")},
              "test_nll": float(nll.mean()),
              "test_loss_per_class": likelihood.per_class(bounds["nelbo"], data.labels),
              "test_nll_per_class": likelihood.per_class(nll, data.labels)}
    return {key.replace("test_loss", "test_loss" + suffix, 1).replace(
        "test_nll", "test_nll" + suffix, 1): value for key, value in record.items()}


def _curve_point(plan: Plan, model, epoch: int, epochs: int, extract) -> dict:
    """The test-loss and FID curves' values after ``epoch`` (0-based): measured every
    ``curve_every`` epochs and after the last, None between."""
    if (epoch + 1) % plan.config.curve_every and epoch + 1 != epochs:
        return {"curve": None, "fid": None}
    return {"curve": likelihood.test_loss(model, plan.data.test),
            "fid": measures.model_fid(model, plan.data.test, extract,
                                      plan.config.seed + epoch)}


def _extractor(plan: Plan, workdir: Path):
    return measures.feature_space(
        workdir / "feature_nets", plan.config.data.dataset, plan.train, plan.data.test,
        num_classes=int(plan.train.labels.max()) + 1, epochs=plan.config.fid.feature_epochs,
        seed=plan.config.seed)


def phase_features(plan: Plan, workdir: Path, show: bool) -> dict:
    """Trains (or loads) the FID feature network; measures the real-vs-real floor."""
    del show
    start = time.perf_counter()
    extract, record = _extractor(plan, workdir)
    test, train = plan.data.test, plan.train
    pick = np.random.default_rng(plan.config.seed).permutation(len(train.images))
    floor = fid(test.images, train.images[pick[:len(test.images)]], extract)
    return {"feature_net": record, "floor": floor, "wall_seconds": time.perf_counter() - start}


def phase_edges(plan: Plan, workdir: Path, show: bool) -> dict:
    cfg = plan.config.edge
    trainer = edge_trainer(plan, cfg.learning_rate)
    meta = _train(workdir, "edges", trainer, cfg.epochs, show,
                  lambda epoch, loss: {"train_loss": [None if np.isnan(v) else v
                                                      for v in loss.tolist()]},
                  ["train_loss"])
    start = time.perf_counter() - meta["elapsed"]
    stopping = trainer.stopping() if cfg.patience else None
    records = []
    extract, _ = _extractor(plan, workdir)
    for e, (eid, params) in enumerate(zip(plan.edge_ids, trainer.params())):
        model = EdgeModel(plan.specs[e], plan.tasks[plan.edge_tasks[e]], params=params)
        checkpoint.save(model, workdir / "edges" / eid / "initial")
        real = plan.task_test(plan.edge_tasks[e])
        records.append({"id": eid, "task": model.task,
                        "params": learners.count_params(plan.specs[e]),
                        "data_size": len(plan.data.edges[e].images),
                        "train_size": trainer.sizes[e],
                        "epochs": stopping["epochs"][e] if stopping else meta["epoch"],
                        "best_epoch": stopping["best_epoch"][e] if stopping else meta["epoch"],
                        **scores(model, real, "_initial"),
                        "fid_initial": measures.model_fid(model, real, extract,
                                                          plan.config.seed)})
    for spec, rec in zip(plan.specs, records):  # step_flops compiles once per distinct spec
        rec["flops_per_epoch"] = (edges_lib.step_flops(spec, cfg.batch_size)
                                  * math.ceil(rec["train_size"] / cfg.batch_size))
    return {"edges": records, "train_loss": meta["train_loss"],
            "validation_loss": stopping["validation_loss"] if stopping else None,
            "wall_seconds": time.perf_counter() - start}


def _uploads(plan: Plan, workdir: Path) -> list[EdgeModel]:
    """The edges' uploads, each checked to be the model its edge of the config trained."""
    uploads = []
    for e, eid in enumerate(plan.edge_ids):
        path = workdir / "edges" / eid / "initial"
        model = checkpoint.load(path)
        task = plan.tasks[plan.edge_tasks[e]]
        if model.kind != "edge" or model.learner_spec != plan.specs[e] or (
                model.task != task):
            raise ValueError(f"{path}: not the upload of {eid} (a {plan.specs[e].kind} edge "
                             f"model of task {task!r} with encoder {list(plan.specs[e].encoder)}"
                             f", latent {plan.specs[e].latent}); remove {path.parent} and its "
                             f"phases/ record to train it again")
        uploads.append(model)
    return uploads


def phase_cloud(plan: Plan, workdir: Path, show: bool, strategy: str) -> dict:
    cfg = plan.config.cloud
    trainer = cloud_trainer(plan, _uploads(plan, workdir), strategy,
                            plan.cloud_learning_rate(strategy), plan.data.cloud)
    model = trainer.model
    trainable = accounting.cloud_trainable_params(model, strategy)
    extract, _ = _extractor(plan, workdir)

    def observe(epoch, metrics):
        return {**_curve_point(plan, model, epoch, cfg.epochs, extract), "train": metrics}

    meta = _train(workdir, f"cloud_{strategy}", trainer, cfg.epochs, show, observe,
                  ["curve", "fid", "train"])
    start = time.perf_counter() - meta["elapsed"]
    checkpoint.save(model, workdir / "baim" / strategy)
    task_params = {t: partition(model, t).spec.params.total for t in plan.tasks}
    flops = edges_lib.compiled_flops(trainer.lower()) * trainer.steps_per_epoch
    return {"test_loss_curve": meta["curve"], "fid_curve": meta["fid"], "train": meta["train"],
            **scores(model, plan.data.test),
            "trainable_params": trainable, "flops_per_epoch": flops,
            "connections": model.spec.connections_kept, "task_model_params": task_params,
            "task_accuracy": _task_accuracy(model, plan.data.test),
            "wall_seconds": time.perf_counter() - start}


def _task_accuracy(model, test: Split) -> float:
    return float(model.task_accuracy(test.images, test.tasks))


def phase_toolkit(plan: Plan, workdir: Path, show: bool) -> dict:
    del show
    start = time.perf_counter()
    baim = checkpoint.load(workdir / "baim" / plan.config.toolkit_strategy)
    toolkit = {}
    for t, name in enumerate(plan.tasks):
        model = partition(baim, name)
        path = workdir / "toolkit" / name
        checkpoint.save(model, path)
        spec = model.spec
        toolkit[name] = {
            "learners": spec.gated, "feeders": spec.feeders, "params": spec.params.total,
            "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            "connections_kept": spec.connections_kept,
            **scores(model, plan.task_test(t))}
    checkpoint.save(TaskRouter.from_baim(baim), workdir / "router")
    return {"toolkit": toolkit, "wall_seconds": time.perf_counter() - start}


def phase_personalize(plan: Plan, workdir: Path, show: bool) -> dict:
    cfg = plan.config.personalize
    start = time.perf_counter()
    extract, _ = _extractor(plan, workdir)
    records = []
    steps = [len(epoch_batches(len(s.images), cfg.batch_size, 0, 0)) for s in plan.data.edges]
    total = cfg.epochs * sum(steps)
    with _bar(total, 0, "edges: personalisation", show) as bar:
        for e, eid in enumerate(plan.edge_ids):
            path = workdir / "edges" / eid / "personalized"
            shard = plan.data.edges[e]
            local = Split(shard.images, shard.labels, np.zeros_like(shard.tasks))
            if (path / "spec.json").exists():  # personalised before an interruption
                model = checkpoint.load(path)
                bar.update(cfg.epochs * steps[e])
            else:
                model = checkpoint.load(workdir / "toolkit" / plan.tasks[plan.edge_tasks[e]])
                trainer = Trainer(model, "finetune", local, learning_rate=cfg.learning_rate,
                                  batch_size=cfg.batch_size, seed=plan.config.seed + 10 + e)
                for epoch in range(cfg.epochs):
                    trainer.run_epoch(epoch, bar.update)
                checkpoint.save(model, path)
            real = plan.task_test(plan.edge_tasks[e])
            records.append({"id": eid, "params": model.spec.params.total,
                            **scores(model, real, "_personalized"),
                            "fid_personalized": measures.model_fid(model, real, extract,
                                                                   plan.config.seed)})
    return {"edges": records, "wall_seconds": time.perf_counter() - start}


def fl_spec(plan: Plan) -> learners.LearnerSpec:
    """FedAvg's homogeneous model: the largest edge model's spec."""
    return max(plan.specs, key=learners.count_params)


def phase_fl(plan: Plan, workdir: Path, show: bool) -> dict:
    cfg = plan.config.fl
    shards = [s.images for s in plan.data.edges]
    trainer = fl_trainer(plan, cfg.learning_rate, plan.data.cloud)
    extract, _ = _extractor(plan, workdir)

    def observe(r, _):
        return _curve_point(plan, trainer.model(), r, cfg.rounds, extract)

    meta = _train(workdir, "fl", trainer, cfg.rounds, show, observe, ["curve", "fid"])
    start = time.perf_counter() - meta["elapsed"]
    model = trainer.model()
    checkpoint.save(model, workdir / "fl")
    step = edges_lib.step_flops(trainer.spec, cfg.batch_size)
    return {"test_loss_curve": meta["curve"], "fid_curve": meta["fid"],
            **scores(model, plan.data.test),
            "params": learners.count_params(trainer.spec),
            "spec": trainer.spec.to_json(),
            "edge_flops_per_epoch": [step * math.ceil(len(s) / cfg.batch_size) for s in shards],
            "cloud_flops_per_epoch": step * math.ceil(len(plan.data.cloud.images)
                                                      / cfg.batch_size),
            "wall_seconds": time.perf_counter() - start}


def phase_central(plan: Plan, workdir: Path, show: bool) -> dict:
    """The central reference: the FL model's spec trained at the cloud on every training
    image (the edges' too: what privacy forbids), scored as every other approach."""
    cfg = plan.config.central
    spec = fl_spec(plan)
    trainer = central_trainer(plan, plan.train.images)
    extract, _ = _extractor(plan, workdir)

    def model():
        return EdgeModel(spec, "all", params=trainer.params()[0])

    def observe(epoch, _):
        return _curve_point(plan, model(), epoch, cfg.epochs, extract)

    meta = _train(workdir, "central", trainer, cfg.epochs, show, observe, ["curve", "fid"])
    start = time.perf_counter() - meta["elapsed"]
    final = model()
    checkpoint.save(final, workdir / "central")
    step = edges_lib.step_flops(spec, cfg.batch_size)
    pixels = int(np.prod(plan.specs[0].image_shape))
    return {"test_loss_curve": meta["curve"], "fid_curve": meta["fid"],
            **scores(final, plan.data.test), "params": learners.count_params(spec),
            "upload_bytes_per_edge": [4 * pixels * len(s.images) for s in plan.data.edges],
            "cloud_flops_per_epoch": step * math.ceil(len(plan.train.images) / cfg.batch_size),
            "wall_seconds": time.perf_counter() - start}


def phases(plan: Plan) -> list[str]:
    return (["features", "edges"] + [f"cloud_{s}" for s in plan.config.strategies]
            + ["toolkit", "personalize", "fl", "central"])


def _run_phase(name: str, plan: Plan, workdir: Path, show: bool) -> dict:
    if name.startswith("cloud_"):
        return phase_cloud(plan, workdir, show, name[len("cloud_"):])
    return {"features": phase_features, "edges": phase_edges, "toolkit": phase_toolkit,
            "personalize": phase_personalize, "fl": phase_fl,
            "central": phase_central}[name](plan, workdir, show)


def run(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> dict:
    """Runs (or resumes) the whole pipeline in ``workdir``; returns ``results.json``'s dict."""
    workdir = Path(workdir).absolute()
    plan = validate(config)
    claim(workdir, config)
    write_json(workdir / "split.json", plan.data.indices)
    done = {}
    for name in phases(plan):
        record = workdir / "phases" / f"{name}.json"
        if record.exists():
            done[name] = read_json(record, "phase record")
            continue
        done[name] = _run_phase(name, plan, workdir, progress)
        write_json(record, done[name])
        shutil.rmtree(workdir / "ckpt" / name, ignore_errors=True)
    results = assemble_results(plan, done, workdir)
    write_json(workdir / "results.json", results)
    return results


def versions() -> dict:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": ocp.__version__, "baim_jax": importlib.metadata.version("baim_jax")}


def _likelihood(record: dict) -> dict:
    return {k: record[k] for k in ("test_nll", "test_loss_parts", "test_loss_per_class",
                                   "test_nll_per_class")}


def assemble_results(plan: Plan, done: dict, workdir: Path) -> dict:
    """``results.json`` from the phases' records (see the README for the keys)."""
    edge_recs = done["edges"]["edges"]
    personal = {r["id"]: r for r in done["personalize"]["edges"]}
    edge_params = [r["params"] for r in edge_recs]
    edge_flops = [r["flops_per_epoch"] for r in edge_recs]
    approaches = {}
    for s in plan.config.strategies:
        cloud = done[f"cloud_{s}"]
        wall = done["edges"]["wall_seconds"] + cloud["wall_seconds"]
        if s == plan.config.toolkit_strategy:
            wall += done["toolkit"]["wall_seconds"] + done["personalize"]["wall_seconds"]
        approaches[s] = accounting.baim_route(
            edge_params=edge_params,
            task_model_params=[cloud["task_model_params"][r["task"]] for r in edge_recs],
            edge_flops_per_epoch=edge_flops, cloud=cloud, wall_seconds=wall,
            test_loss_curve=cloud["test_loss_curve"])
        approaches[s].update(task_accuracy=cloud["task_accuracy"],
                             connections_kept=cloud["connections"], fid=cloud["fid_curve"][-1],
                             fid_curve=cloud["fid_curve"], **_likelihood(cloud))
    fl = done["fl"]
    approaches["fl"] = accounting.fedavg(
        params=fl["params"], rounds=plan.config.fl.rounds,
        edge_flops_per_epoch=fl["edge_flops_per_epoch"],
        cloud_flops_per_epoch=fl["cloud_flops_per_epoch"], wall_seconds=fl["wall_seconds"],
        test_loss_curve=fl["test_loss_curve"])
    approaches["fl"].update(fid=fl["fid_curve"][-1], fid_curve=fl["fid_curve"],
                            **_likelihood(fl))
    central = done["central"]
    approaches["central"] = accounting.central(
        params=central["params"], upload_bytes_per_edge=central["upload_bytes_per_edge"],
        cloud_flops_per_epoch=central["cloud_flops_per_epoch"],
        wall_seconds=central["wall_seconds"], test_loss_curve=central["test_loss_curve"])
    approaches["central"].update(fid=central["fid_curve"][-1], fid_curve=central["fid_curve"],
                                 **_likelihood(central))
    for row in approaches.values():
        row["test_nll_over_central"] = row["test_nll"] / central["test_nll"]
    edges = [{**r, **{k: v for k, v in personal[r["id"]].items() if k not in ("id", "params")},
              "personalized_params": personal[r["id"]]["params"],
              "path": str(workdir / "edges" / r["id"])} for r in edge_recs]
    results = {
        "approaches": approaches, "edges": edges,
        "toolkit": {name: {**rec, "path": str(workdir / "toolkit" / name)}
                    for name, rec in done["toolkit"]["toolkit"].items()},
        "fid_feature_net": done["features"]["feature_net"], "fid_floor": done["features"]["floor"],
        "phases": {name: rec["wall_seconds"] for name, rec in done.items()},
        "data": {"dataset": plan.config.data.dataset, "test": len(plan.data.test.images),
                 "test_per_task": {name: int(np.sum(plan.data.test.tasks == t))
                                   for t, name in enumerate(plan.tasks)},
                 "cloud": len(plan.data.cloud.images),
                 "edges": [len(s.images) for s in plan.data.edges]},
        "fl_model": fl["spec"],
        "devices": {"kind": jax.devices()[0].platform, "count": len(_devices(plan))},
        "config": json.loads(json.dumps(plan.config.to_dict())), "versions": versions(),
    }
    return {**results, "claims": claims.check(results)}
