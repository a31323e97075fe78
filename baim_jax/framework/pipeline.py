"""The edge-cloud workflow as one resumable job (paper Sec. III, steps 1 to 6, and FedAvg).

Phases, in order; each leaves ``phases/<name>.json`` in the workdir when it is finished:

* ``features``: the FID feature network of the dataset (trained on the run's real training
  images, cached in ``feature_nets/``) and the real-vs-real FID floor.
* ``edges``: every edge trains its model on its shard (sharded over ``edge``) and uploads it;
  ``edges/<id>/initial/``.
* ``cloud_<strategy>``: aggregation of the uploads into a BAIM and its training on the cloud's
  common data with the strategy, pruning connections; ``baim/<strategy>/``.
* ``toolkit``: the toolkit strategy's BAIM cut into one task model per task; ``toolkit/<task>/``.
* ``personalize``: every edge downloads its task's model and fine-tunes it on its shard;
  ``edges/<id>/personalized/``.
* ``fl``: the FedAvg baseline; ``fl/``.

Inside a phase, training state (model, optimiser, curves, elapsed time) is checkpointed with
orbax after every epoch (``ckpt/<phase>/``). Models are saved atomically. Data order and noise
are functions of (seed, epoch, step), so a rerun after an interruption at any moment resumes
from the last checkpoint and ends with the same results as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from baim_jax import checkpoint
from baim_jax.core import learners as L
from baim_jax.core import strategies
from baim_jax.core.baim import BAIMConfig
from baim_jax.core.edge_model import EdgeModel
from baim_jax.core.partition import partition
from baim_jax.evaluation import data as data_lib
from baim_jax.evaluation.data import Split
from baim_jax.evaluation.fid import fid
from baim_jax.framework import accounting, edges as edges_lib, fedavg, measures
from baim_jax.framework.cloud import Pruning, Trainer, aggregate, epoch_batches, test_loss

EDGE_FIELDS = {"task", "encoder", "latent", "decoder", "share"}
SECTIONS = {
    "data": {"dataset": str, "size": int, "test_size": int, "cloud_fraction": float,
             "alpha": (float, None), "data_dir": (str, ""), "image_size": int, "label": str},
    "edge": {"epochs": int, "batch_size": int, "learning_rate": float},
    "cloud": {"epochs": int, "batch_size": int, "learning_rate": float, "rho": float,
              "prune_start": float, "prune_end": float, "prune_every": int,
              "max_upload_params": int},
    "personalize": {"epochs": int, "batch_size": int, "learning_rate": float},
    "fl": {"rounds": int, "batch_size": int, "learning_rate": float},
    "fid": {"feature_epochs": int},
}


@dataclasses.dataclass
class Plan:
    """A validated configuration and the data split it implies."""

    config: ml_collections.ConfigDict
    tasks: list[str]
    specs: list[L.LearnerSpec]
    edge_tasks: list[int]
    baim: BAIMConfig
    data: data_lib.Partition

    @property
    def edge_ids(self) -> list[str]:
        return [f"edge_{e:02d}" for e in range(len(self.specs))]

    @property
    def train(self) -> Split:
        """Every real training image: the cloud's and the edges'."""
        parts = [self.data.cloud, *self.data.edges]
        return Split(*(np.concatenate([getattr(p, f) for p in parts]) for f in Split._fields))

    def task_test(self, t: int) -> Split:
        test = self.data.test
        sel = test.tasks == t
        return Split(test.images[sel], test.labels[sel], test.tasks[sel])


def _get(config, section: str, key: str, kind):
    """The value of ``section.key``, checked: ``kind`` is a type, or ``(type, allowed)`` where
    ``allowed`` (None, or "") may stand in for a value."""
    try:
        value = config[section][key]
    except (KeyError, AttributeError):
        raise ValueError(f"config: missing key {section}.{key}") from None
    if isinstance(kind, tuple):
        kind, allowed = kind
        if value == allowed:
            return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{section}.{key}: expected {kind.__name__}, got {value!r}")
    if kind in (int, float) and not value > 0:
        raise ValueError(f"{section}.{key}: must be > 0, got {value!r}")
    return value


def validate(config: ml_collections.ConfigDict) -> Plan:
    """Checks every field of a pipeline config and splits the data, before any training.

    Raises:
      ValueError: one line naming the first bad field.
    """
    for section, keys in SECTIONS.items():
        if section not in config:
            raise ValueError(f"config: missing section {section!r}")
        unknown = set(config[section]) - set(keys)
        if unknown:
            raise ValueError(f"{section}: unknown key(s) {sorted(unknown)}")
        for key, kind in keys.items():
            _get(config, section, key, kind)
    dc = config.data
    images, labels = data_lib.load_dataset(dc.dataset, size=dc.size, seed=config.seed,
                                           data_dir=dc.data_dir or None,
                                           image_size=dc.image_size, label=dc.label)
    tasks = list(config.task_names)
    if len(tasks) != len(config.task_classes) or not tasks:
        raise ValueError(f"task_names: {len(tasks)} names for {len(config.task_classes)} "
                         f"task_classes")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task_names: duplicate names in {tasks}")
    if not config.edges:
        raise ValueError("edges: no edge")
    specs, edge_tasks, shares = [], [], []
    for e, d in enumerate(config.edges):
        d = dict(d)
        unknown = set(d) - EDGE_FIELDS
        if unknown:
            raise ValueError(f"edges[{e}]: unknown field(s) {sorted(unknown)}")
        missing = EDGE_FIELDS - {"share"} - set(d)
        if missing:
            raise ValueError(f"edges[{e}]: missing field(s) {sorted(missing)}")
        task = d["task"]
        if isinstance(task, str) and task in tasks:
            task = tasks.index(task)
        if not isinstance(task, int) or not 0 <= task < len(tasks):
            raise ValueError(f"edges[{e}].task: {d['task']!r} is not a task of {tasks}")
        try:
            spec = L.LearnerSpec(config.kind, tuple(images.shape[1:]), tuple(d["encoder"]),
                                 d["latent"], tuple(d["decoder"]), config.likelihood)
            spec.validate()
        except (TypeError, ValueError) as err:
            raise ValueError(f"edges[{e}]: {err}") from None
        specs.append(spec)
        edge_tasks.append(task)
        shares.append(d.get("share", 1.0))
    for t, name in enumerate(tasks):
        if t not in edge_tasks:
            raise ValueError(f"task_names: task {name!r} has no edge")
    try:
        baim = BAIMConfig(**config.baim.to_dict())
        baim.validate()
    except TypeError as err:
        raise ValueError(f"baim: {err}") from None
    smallest = min(edge_tasks.count(t) for t in range(len(tasks)))
    if baim.k > smallest:
        raise ValueError(f"baim.k: {baim.k} is larger than the smallest squad ({smallest} edges)")
    chosen = list(config.strategies)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"strategies: need distinct names from {strategies.STRATEGIES}")
    for s in chosen:
        strategies.trainable(s)
    if config.toolkit_strategy not in chosen:
        raise ValueError(f"toolkit_strategy: {config.toolkit_strategy!r} is not in "
                         f"strategies {chosen}")
    if not 0 < config.cloud.rho <= 1:
        raise ValueError(f"cloud.rho: must be in (0, 1], got {config.cloud.rho}")
    if not 0 <= config.cloud.prune_start <= config.cloud.prune_end <= 1:
        raise ValueError("cloud.prune_start/prune_end: need 0 <= start <= end <= 1 (fractions "
                         "of the cloud's training steps)")
    if not isinstance(config.devices, int) or config.devices < 0:
        raise ValueError(f"devices: must be an integer >= 0 (0: all), got {config.devices!r}")
    for e, spec in enumerate(specs):
        if L.count_params(spec) > config.cloud.max_upload_params:
            raise ValueError(f"edges[{e}]: {L.count_params(spec)} parameters, more than "
                             f"cloud.max_upload_params ({config.cloud.max_upload_params})")
    data = data_lib.edge_cloud_split(
        images, labels, config.task_classes, edge_tasks, shares, test_size=dc.test_size,
        cloud_fraction=dc.cloud_fraction, seed=config.seed, alpha=dc.alpha)
    return Plan(config, tasks, specs, edge_tasks, baim, data)


# ---------------------------------------------------------------------------------- storage


def write_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class PhaseCheckpoint:
    """Epoch checkpoints of one phase: a flat list of arrays and a JSON record (orbax; the
    latest is kept, and a save cut short leaves the previous one readable)."""

    def __init__(self, path: Path):
        self.path = path
        self.manager = ocp.CheckpointManager(
            path, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def latest(self, like: list) -> tuple[list, dict] | None:
        step = self.manager.latest_step()
        if step is None:
            return None
        target = {str(i): np.asarray(v) for i, v in enumerate(like)}
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return [got.state[str(i)] for i in range(len(like))], got.meta

    def save(self, step: int, leaves: list, meta: dict) -> None:
        state = {str(i): np.asarray(v) for i, v in enumerate(leaves)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def remove(self) -> None:
        self.manager.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _bar(total: int, done: int, desc: str, show: bool):
    return tqdm(total=total, initial=done, desc=desc, unit="step", dynamic_ncols=True,
                disable=not show, leave=False)


# ----------------------------------------------------------------------------------- phases


def _devices(plan: Plan):
    devices = jax.devices()
    return devices[:plan.config.devices] if plan.config.devices else devices


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
    trainer = edges_lib.EdgeTrainer(
        plan.specs, [s.images for s in plan.data.edges], batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, seed=plan.config.seed, devices=_devices(plan))
    ckpt = PhaseCheckpoint(workdir / "ckpt" / "edges")
    meta = {"epoch": 0, "elapsed": 0.0, "train_loss": []}
    restored = ckpt.latest(trainer.state_leaves())
    if restored is not None:
        leaves, meta = restored
        trainer.load_state(leaves)
    start = time.perf_counter() - meta["elapsed"]
    steps = trainer.steps_per_epoch
    with _bar(cfg.epochs * steps, meta["epoch"] * steps, "edges: local training", show) as bar:
        for epoch in range(meta["epoch"], cfg.epochs):
            loss = trainer.run_epoch(epoch, bar.update)
            meta = {"epoch": epoch + 1, "elapsed": time.perf_counter() - start,
                    "train_loss": meta["train_loss"] + [loss.tolist()]}
            ckpt.save(epoch + 1, trainer.state_leaves(), meta)
    records = []
    extract, _ = _extractor(plan, workdir)
    for e, (eid, params) in enumerate(zip(plan.edge_ids, trainer.params())):
        model = EdgeModel(plan.specs[e], plan.tasks[plan.edge_tasks[e]], params=params)
        model.save(workdir / "edges" / eid / "initial")
        real = plan.task_test(plan.edge_tasks[e])
        records.append({"id": eid, "task": model.task, "params": L.count_params(plan.specs[e]),
                        "data_size": len(plan.data.edges[e].images),
                        "test_loss_initial": test_loss(model, real),
                        "fid_initial": measures.model_fid(model, real, extract,
                                                          plan.config.seed)})
    flops = {}
    for e, spec in enumerate(plan.specs):
        if spec not in flops:
            flops[spec] = edges_lib.step_flops(spec, cfg.batch_size, cfg.learning_rate)
    for e, rec in enumerate(records):
        rec["flops_per_epoch"] = flops[plan.specs[e]] * math.ceil(rec["data_size"]
                                                                  / cfg.batch_size)
    ckpt.remove()
    return {"edges": records, "train_loss": meta["train_loss"],
            "wall_seconds": time.perf_counter() - start}


def _uploads(plan: Plan, workdir: Path) -> list[EdgeModel]:
    return [checkpoint.load(workdir / "edges" / eid / "initial") for eid in plan.edge_ids]


def phase_cloud(plan: Plan, workdir: Path, show: bool, strategy: str) -> dict:
    cfg, seed = plan.config.cloud, plan.config.seed
    model = aggregate(_uploads(plan, workdir), plan.tasks, plan.baim, seed=seed,
                      max_upload_params=cfg.max_upload_params)
    strategies.prepare(model, strategy, seed + 1)
    trainable = accounting.cloud_trainable_params(model, strategy)
    cloud = plan.data.cloud
    steps = len(epoch_batches(len(cloud.images), cfg.batch_size, 0, 0))
    total = cfg.epochs * steps
    pruning = Pruning(cfg.rho, int(cfg.prune_start * total), max(int(cfg.prune_end * total), 1),
                      cfg.prune_every)
    trainer = Trainer(model, strategy, learning_rate=cfg.learning_rate,
                      batch_size=cfg.batch_size, seed=seed + 2, pruning=pruning)
    ckpt = PhaseCheckpoint(workdir / "ckpt" / f"cloud_{strategy}")
    meta = {"epoch": 0, "elapsed": 0.0, "curve": [], "fid": [], "train": []}
    extract, _ = _extractor(plan, workdir)
    restored = ckpt.latest(trainer.state_leaves())
    if restored is not None:
        leaves, meta = restored
        trainer.load_state(leaves)
    start = time.perf_counter() - meta["elapsed"]
    with _bar(total, meta["epoch"] * steps, f"cloud: {strategy}", show) as bar:
        for epoch in range(meta["epoch"], cfg.epochs):
            metrics = trainer.run_epoch(cloud, epoch, bar.update)
            meta = {"epoch": epoch + 1, "elapsed": time.perf_counter() - start,
                    "curve": meta["curve"] + [test_loss(model, plan.data.test)],
                    "fid": meta["fid"] + [measures.model_fid(model, plan.data.test, extract,
                                                             seed + epoch)],
                    "train": meta["train"] + [metrics]}
            bar.set_postfix(test=f"{meta['curve'][-1]:.1f}")
            ckpt.save(epoch + 1, trainer.state_leaves(), meta)
    model.save(workdir / "baim" / strategy)
    task_params = {t: partition(model, t).spec["params"]["total"] for t in plan.tasks}
    flops = edges_lib.compiled_flops(trainer.lower(cloud)) * steps
    ckpt.remove()
    return {"test_loss_curve": meta["curve"], "fid_curve": meta["fid"], "train": meta["train"],
            "trainable_params": trainable, "flops_per_epoch": flops,
            "connections": model.spec["connections"]["kept"], "task_model_params": task_params,
            "task_accuracy": _task_accuracy(model, plan.data.test),
            "wall_seconds": time.perf_counter() - start}


def _task_accuracy(model, test: Split) -> float:
    return float(np.mean(np.asarray(model.evaluate(test.images, test.tasks)["task_accuracy"])))


def phase_toolkit(plan: Plan, workdir: Path, show: bool) -> dict:
    del show
    start = time.perf_counter()
    baim = checkpoint.load(workdir / "baim" / plan.config.toolkit_strategy)
    toolkit = {}
    for t, name in enumerate(plan.tasks):
        model = partition(baim, name)
        path = workdir / "toolkit" / name
        model.save(path)
        spec = model.spec
        toolkit[name] = {
            "learners": sum(m["squad"] is not None for m in spec["learners"]),
            "feeders": sum(m["squad"] is None for m in spec["learners"]),
            "params": spec["params"]["total"],
            "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            "connections_kept": spec["connections"]["kept"],
            "test_loss": test_loss(model, plan.task_test(t)), "path": str(path)}
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
            if not (path / "spec.json").exists():
                model = checkpoint.load(workdir / "toolkit" / plan.tasks[plan.edge_tasks[e]])
                trainer = Trainer(model, "finetune", learning_rate=cfg.learning_rate,
                                  batch_size=cfg.batch_size, seed=plan.config.seed + 10 + e)
                for epoch in range(cfg.epochs):
                    trainer.run_epoch(local, epoch, bar.update)
                model.save(path)
            else:
                bar.update(cfg.epochs * steps[e])
            model = checkpoint.load(path)
            real = plan.task_test(plan.edge_tasks[e])
            records.append({"id": eid, "params": model.spec["params"]["total"],
                            "test_loss_personalized": test_loss(model, real),
                            "fid_personalized": measures.model_fid(model, real, extract,
                                                                   plan.config.seed)})
    return {"edges": records, "wall_seconds": time.perf_counter() - start}


def fl_spec(plan: Plan) -> L.LearnerSpec:
    """FedAvg's homogeneous model: the largest edge model's spec."""
    return max(plan.specs, key=L.count_params)


def phase_fl(plan: Plan, workdir: Path, show: bool) -> dict:
    cfg, seed = plan.config.fl, plan.config.seed
    spec = fl_spec(plan)
    shards = [s.images for s in plan.data.edges]
    kw = dict(batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
              devices=_devices(plan))
    edge_trainer = edges_lib.EdgeTrainer([spec] * len(shards), shards, seed=seed + 4, **kw)
    cloud_trainer = edges_lib.EdgeTrainer([spec], [plan.data.cloud.images], seed=seed + 5, **kw)
    params = L.init_learner(spec, jax.random.key(seed + 3))
    ckpt = PhaseCheckpoint(workdir / "ckpt" / "fl")
    meta = {"round": 0, "elapsed": 0.0, "curve": [], "fid": []}
    extract, _ = _extractor(plan, workdir)
    restored = ckpt.latest(jax.tree.leaves(params))
    if restored is not None:
        leaves, meta = restored
        params = jax.tree.unflatten(jax.tree.structure(params), [np.asarray(v) for v in leaves])
    start = time.perf_counter() - meta["elapsed"]
    steps = edge_trainer.steps_per_epoch + cloud_trainer.steps_per_epoch
    with _bar(cfg.rounds * steps, meta["round"] * steps, "fl: FedAvg rounds", show) as bar:
        for r in range(meta["round"], cfg.rounds):
            params = fedavg.fedavg_round(params, edge_trainer, cloud_trainer, r, bar.update)
            model = EdgeModel(spec, "all", params=params)
            meta = {"round": r + 1, "elapsed": time.perf_counter() - start,
                    "curve": meta["curve"] + [test_loss(model, plan.data.test)],
                    "fid": meta["fid"] + [measures.model_fid(model, plan.data.test, extract,
                                                             seed + r)]}
            bar.set_postfix(test=f"{meta['curve'][-1]:.1f}")
            ckpt.save(r + 1, jax.tree.leaves(params), meta)
    EdgeModel(spec, "all", params=params).save(workdir / "fl")
    step = edges_lib.step_flops(spec, cfg.batch_size, cfg.learning_rate)
    ckpt.remove()
    return {"test_loss_curve": meta["curve"], "fid_curve": meta["fid"],
            "params": L.count_params(spec),
            "spec": spec.to_json(),
            "edge_flops_per_epoch": [step * math.ceil(len(s) / cfg.batch_size) for s in shards],
            "cloud_flops_per_epoch": step * math.ceil(len(plan.data.cloud.images)
                                                      / cfg.batch_size),
            "wall_seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------- run


def phases(plan: Plan) -> list[str]:
    return (["features", "edges"] + [f"cloud_{s}" for s in plan.config.strategies]
            + ["toolkit", "personalize", "fl"])


def _run_phase(name: str, plan: Plan, workdir: Path, show: bool) -> dict:
    if name.startswith("cloud_"):
        return phase_cloud(plan, workdir, show, name[len("cloud_"):])
    return {"features": phase_features, "edges": phase_edges, "toolkit": phase_toolkit, "personalize": phase_personalize,
            "fl": phase_fl}[name](plan, workdir, show)


def claim(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Makes ``workdir`` this config's run directory, or refuses one holding another run."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir: {workdir} exists and is not a directory")
    record = workdir / "config.json"
    wanted = json.loads(json.dumps(config.to_dict()))
    if record.exists():
        if json.loads(record.read_text()) != wanted:
            raise ValueError(f"workdir: {workdir} holds a run of a different config; choose "
                             f"another --workdir (nothing was overwritten)")
    elif workdir.is_dir() and any(workdir.iterdir()):
        raise ValueError(f"workdir: {workdir} is not empty and holds no baim-jax run; choose "
                         f"another --workdir (nothing was overwritten)")
    else:
        write_json(record, wanted)


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
            done[name] = json.loads(record.read_text())
            continue
        done[name] = _run_phase(name, plan, workdir, progress)
        write_json(record, done[name])
    results = assemble_results(plan, done, workdir)
    write_json(workdir / "results.json", results)
    return results


def versions() -> dict:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": ocp.__version__, "baim_jax": "0.1.0"}


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
                             fid_curve=cloud["fid_curve"])
    fl = done["fl"]
    approaches["fl"] = accounting.fedavg(
        params=fl["params"], rounds=plan.config.fl.rounds,
        edge_flops_per_epoch=fl["edge_flops_per_epoch"],
        cloud_flops_per_epoch=fl["cloud_flops_per_epoch"], wall_seconds=fl["wall_seconds"],
        test_loss_curve=fl["test_loss_curve"])
    approaches["fl"].update(fid=fl["fid_curve"][-1], fid_curve=fl["fid_curve"])
    edges = [{**r, "test_loss_personalized": personal[r["id"]]["test_loss_personalized"],
              "fid_personalized": personal[r["id"]]["fid_personalized"],
              "personalized_params": personal[r["id"]]["params"],
              "path": str(workdir / "edges" / r["id"])} for r in edge_recs]
    return {
        "approaches": approaches, "edges": edges, "toolkit": done["toolkit"]["toolkit"],
        "fid_feature_net": done["features"]["feature_net"], "fid_floor": done["features"]["floor"],
        "phases": {name: rec["wall_seconds"] for name, rec in done.items()},
        "data": {"dataset": plan.config.data.dataset, "test": len(plan.data.test.images),
                 "cloud": len(plan.data.cloud.images),
                 "edges": [len(s.images) for s in plan.data.edges]},
        "fl_model": fl["spec"],
        "devices": {"kind": jax.devices()[0].platform, "count": len(_devices(plan))},
        "config": json.loads(json.dumps(plan.config.to_dict())), "versions": versions(),
    }
