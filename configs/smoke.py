"""A tiny pipeline for tests: the case study (``case_study.py``) cut down to 4 edges (0.05M to
0.6M parameters), 2 tasks, IID shards, 2 epochs everywhere, all four approaches, on 2,000 of
the embedded MNIST digits, with connections in both towers. About 2 minutes on 2 CPU cores."""

from pathlib import Path

import ml_collections

from baim_jax.cli import load_config


def _case_study() -> ml_collections.ConfigDict:
    return load_config(str(Path(__file__).with_name("case_study.py")), [])


def get_config() -> ml_collections.ConfigDict:
    c = _case_study()
    # 2,000 of the 5,000 embedded digits: 300 test, 340 at the cloud, 1,360 at the edges.
    c.data.update({"size": 2000, "test_size": 300, "alpha": None})
    # Edge models: (task, encoder widths, latent, decoder widths, share of the task's data).
    c.edges = [
        {"task": 0, "encoder": [32], "latent": 8, "decoder": [32], "share": 1.0},
        {"task": 0, "encoder": [256, 64], "latent": 16, "decoder": [64, 256], "share": 2.0},
        {"task": 1, "encoder": [48], "latent": 8, "decoder": [48], "share": 1.0},
        {"task": 1, "encoder": [384], "latent": 16, "decoder": [384], "share": 3.0},
    ]
    # The machinery, not the case study's tuned values: squads of 2 take K = 2 at most.
    # Early stopping on 20% of each edge's shard, so that the run exercises it.
    c.edge.update({"epochs": 2, "learning_rate": 1e-3, "validation_fraction": 0.2,
                   "patience": 1})
    c.baim.update({"feature_dim": 32, "k": 2, "h": 1, "connect": ["enc", "dec"]})
    # Cosine learning rates in the cloud and central phases, so that the run exercises them.
    c.cloud.update({"epochs": 2, "learning_rate": 1e-3, "rho": 0.5, "prune_start": 0.25,
                    "prune_end": 0.75, "prune_every": 2, "schedule": "cosine"})
    c.cloud.learning_rates = {}
    c.personalize.epochs = 1
    c.fl.update({"rounds": 2, "learning_rate": 1e-3})
    c.central.update({"epochs": 4, "schedule": "cosine"})
    c.curve_every = 2  # the curves' points after the last epoch (and central's second)
    return c
