"""A pipeline config, checked field by field, and the data split it implies (the ``Plan``).

Everything a user gives is validated here, before any training: one ``ValueError`` line names
the first bad field.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
import numpy as np

from baim_jax.core import dispatch, learners, optim, strategies
from baim_jax.core.baim import BAIMConfig
from baim_jax.core.pool import Member, PoolLayout
from baim_jax.evaluation import data as data_lib
from baim_jax.evaluation.data import Split
from baim_jax.framework import cloud as cloud_lib
from baim_jax.framework import edges as edges_lib
from baim_jax.names import check_task_name

EDGE_FIELDS = {"task", "encoder", "latent", "decoder", "share"}
SECTIONS = {
    "data": {"dataset": str, "size": int, "test_size": int, "cloud_fraction": float,
             "alpha": (float, None), "data_dir": (str, ""), "image_size": int, "label": str},
    "edge": {"epochs": int, "batch_size": int, "learning_rate": float,
             "validation_fraction": (float, 0.0), "patience": (int, 0)},
    "cloud": {"epochs": int, "batch_size": int, "learning_rate": float,
              "learning_rates": object, "rho": float,
              "prune_start": (float, 0.0), "prune_end": float, "prune_every": int,
              "max_upload_params": int, "schedule": str, "decoder_pruning": str},
    "personalize": {"epochs": int, "batch_size": int, "learning_rate": float},
    "fl": {"rounds": int, "batch_size": int, "learning_rate": float},
    "central": {"epochs": int, "batch_size": int, "learning_rate": float, "schedule": str},
    "fid": {"feature_epochs": int},
}
TOP_LEVEL = {"seed", "kind", "likelihood", "task_names", "task_classes", "edges", "baim",
             "strategies", "toolkit_strategy", "devices", "curve_every"}


@dataclasses.dataclass
class Plan:
    """A validated configuration and the data split it implies.

    ``edge_train`` holds each edge's training images; with early stopping
    (``edge.patience``), ``edge_validation`` the local validation images each edge holds out
    of its shard (``edges.local_validation``), else None.
    """

    config: ml_collections.ConfigDict
    tasks: list[str]
    specs: list[learners.LearnerSpec]
    edge_tasks: list[int]
    baim: BAIMConfig
    data: data_lib.Partition
    edge_train: list[np.ndarray]
    edge_validation: list[np.ndarray] | None

    def cloud_learning_rate(self, strategy: str) -> float:
        """The strategy's own rate (``cloud.learning_rates``), else ``cloud.learning_rate``."""
        return float(dict(self.config.cloud.learning_rates).get(
            strategy, self.config.cloud.learning_rate))

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
    if kind in (int, float) and not 0 < value < math.inf:
        raise ValueError(f"{section}.{key}: must be > 0 and finite, got {value!r}")
    return value


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_positive_number(v) -> bool:
    """A finite int or float > 0 (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf


def _int_list(value, where: str, *, minimum: int) -> None:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= minimum
                                                       for v in value):
        raise ValueError(f"{where}: expected a list of integers >= {minimum}, got {value!r}")


def _check_structure(config) -> None:
    """The top-level keys and the shapes of the list-valued fields, before anything uses them
    (so that a wrong type is one line naming the field, not a traceback)."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config: expected an ml_collections.ConfigDict, got "
                         f"{type(config).__name__}")
    unknown = set(config) - TOP_LEVEL - set(SECTIONS)
    if unknown:
        raise ValueError(f"config: unknown key(s) {sorted(unknown)}")
    missing = (TOP_LEVEL | set(SECTIONS)) - set(config)
    if missing:
        raise ValueError(f"config: missing key(s) {sorted(missing)}")
    if not _is_int(config.curve_every) or config.curve_every < 1:
        raise ValueError(f"curve_every: must be an integer >= 1, got {config.curve_every!r}")
    if not _is_int(config.seed) or not 0 <= config.seed < 2**32:
        raise ValueError(f"seed: must be an integer in [0, 2^32), got {config.seed!r}")
    for key in ("kind", "likelihood", "toolkit_strategy"):
        if not isinstance(config[key], str):
            raise ValueError(f"{key}: expected a string, got {config[key]!r}")
    for key in ("task_names", "strategies"):
        value = config[key]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key}: expected a list of names, got {value!r}")
    classes = config.task_classes
    if not isinstance(classes, (list, tuple)):
        raise ValueError(f"task_classes: expected a list of class-label lists, got {classes!r}")
    for t, labels in enumerate(classes):
        _int_list(labels, f"task_classes[{t}]", minimum=0)
    if not isinstance(config.edges, (list, tuple)):
        raise ValueError(f"edges: expected a list of edge dicts, got {config.edges!r}")
    for e, d in enumerate(config.edges):
        if not isinstance(d, (dict, ml_collections.ConfigDict)):
            raise ValueError(f"edges[{e}]: expected a dict of {sorted(EDGE_FIELDS)}, got {d!r}")
        for name in ("encoder", "decoder"):
            if name in d:
                _int_list(d[name], f"edges[{e}].{name}", minimum=1)
        if "latent" in d and not _is_int(d["latent"]):
            raise ValueError(f"edges[{e}].latent: expected an integer, got {d['latent']!r}")
        if "task" in d and (isinstance(d["task"], bool)
                            or not isinstance(d["task"], (int, np.integer, str))):
            raise ValueError(f"edges[{e}].task: expected a task name or index, got "
                             f"{d['task']!r}")
        share = d.get("share", 1.0)
        if not _is_positive_number(share):
            raise ValueError(f"edges[{e}].share: must be a finite number > 0, got {share!r}")


def validate(config: ml_collections.ConfigDict) -> Plan:
    """Checks every field of a pipeline config and splits the data, before any training.

    Raises:
      ValueError: one line naming the first bad field.
    """
    _check_structure(config)
    for section, keys in SECTIONS.items():
        if not isinstance(config[section], ml_collections.ConfigDict):
            raise ValueError(f"{section}: expected a section of {sorted(SECTIONS[section])}")
        unknown = set(config[section]) - set(keys)
        if unknown:
            raise ValueError(f"{section}: unknown key(s) {sorted(unknown)}")
        for key, kind in keys.items():
            _get(config, section, key, kind)
    for section in ("cloud", "central"):
        optim.check_schedule(config[section].schedule, f"{section}.schedule")
    dc = config.data
    for section in ("edge", "cloud", "personalize", "fl", "central"):
        if config[section].batch_size > dc.size:
            raise ValueError(f"{section}.batch_size: {config[section].batch_size} is more than "
                             f"the data's {dc.size} images (data.size)")
    if not isinstance(config.devices, int) or not 0 <= config.devices <= jax.device_count():
        raise ValueError(f"devices: must be an integer in 0..{jax.device_count()} (0: all "
                         f"{jax.device_count()} devices), got {config.devices!r}")
    images, labels = data_lib.load_dataset(dc.dataset, size=dc.size, seed=config.seed,
                                           data_dir=dc.data_dir or None,
                                           image_size=dc.image_size, label=dc.label)
    tasks = list(config.task_names)
    if len(tasks) != len(config.task_classes) or not tasks:
        raise ValueError(f"task_names: {len(tasks)} names for {len(config.task_classes)} "
                         f"task_classes")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task_names: duplicate names in {tasks}")
    for name in tasks:
        check_task_name(name, "task_names")
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
            spec = learners.LearnerSpec(config.kind, tuple(images.shape[1:]), tuple(d["encoder"]),
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
    pool = PoolLayout([Member(spec, t) for spec, t in zip(specs, edge_tasks)])
    dispatch.check_capacity_factor(baim.capacity_factor, sum(pool.depths))
    pruning = config.cloud.decoder_pruning
    if pruning not in cloud_lib.DECODER_PRUNINGS:
        raise ValueError(f"cloud.decoder_pruning: {pruning!r} is not one of "
                         f"{list(cloud_lib.DECODER_PRUNINGS)}")
    if pruning == "kl_cost" and "dec" not in baim.connect:
        raise ValueError("cloud.decoder_pruning: 'kl_cost' prunes decoder connections, and "
                         f"baim.connect {list(baim.connect)} has none")
    smallest = min(edge_tasks.count(t) for t in range(len(tasks)))
    if baim.k > smallest:
        raise ValueError(f"baim.k: {baim.k} is larger than the smallest squad ({smallest} edges)")
    chosen = list(config.strategies)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"strategies: need distinct names from {strategies.STRATEGIES}")
    for s in chosen:
        strategies.trainable(s)
    rates = config.cloud.learning_rates
    if not isinstance(rates, (dict, ml_collections.ConfigDict)):
        raise ValueError(f"cloud.learning_rates: expected a dict {{strategy: rate}}, got "
                         f"{rates!r}")
    for s, lr in dict(rates).items():
        if s not in chosen:
            raise ValueError(f"cloud.learning_rates: {s!r} is not in strategies {chosen}")
        if not _is_positive_number(lr):
            raise ValueError(f"cloud.learning_rates[{s!r}]: must be a finite number > 0, got "
                             f"{lr!r}")
    if config.toolkit_strategy not in chosen:
        raise ValueError(f"toolkit_strategy: {config.toolkit_strategy!r} is not in "
                         f"strategies {chosen}")
    edge = config.edge
    if not edge.validation_fraction < 0.5:
        raise ValueError(f"edge.validation_fraction: must be in [0, 0.5), got "
                         f"{edge.validation_fraction}")
    if (edge.validation_fraction == 0) != (edge.patience == 0):
        raise ValueError(f"edge.patience: early stopping needs both a patience and a "
                         f"validation_fraction > 0 (or neither), got {edge.patience} and "
                         f"{edge.validation_fraction}")
    if not 0 < config.cloud.rho <= 1:
        raise ValueError(f"cloud.rho: must be in (0, 1], got {config.cloud.rho}")
    if not 0 <= config.cloud.prune_start <= config.cloud.prune_end <= 1:
        raise ValueError("cloud.prune_start/prune_end: need 0 <= start <= end <= 1 (fractions "
                         "of the cloud's training steps)")
    for e, spec in enumerate(specs):
        if learners.count_params(spec) > config.cloud.max_upload_params:
            raise ValueError(f"edges[{e}]: {learners.count_params(spec)} parameters, more than "
                             f"cloud.max_upload_params ({config.cloud.max_upload_params})")
    data = data_lib.edge_cloud_split(
        images, labels, config.task_classes, edge_tasks, shares, test_size=dc.test_size,
        cloud_fraction=dc.cloud_fraction, seed=config.seed, alpha=dc.alpha)
    train, validation = [s.images for s in data.edges], None
    if config.edge.patience:
        cut = [edges_lib.local_validation(shard, config.edge.validation_fraction, config.seed, e)
               for e, shard in enumerate(train)]
        train, validation = [t for t, _ in cut], [v for _, v in cut]
    return Plan(config, tasks, specs, edge_tasks, baim, data, train, validation)
