"""The paper's protocol (docs/design.md §1) on the embedded MNIST digits: the case study's
10 edges and 2 tasks (``case_study.py``), with its smallest edge shrunk so that the edge models
span 42x (26k to 1.09M parameters; the paper's span 30x), and the paper's budget: edges 100
epochs, then 100 cloud epochs per strategy, against 100 FedAvg rounds (equal total epochs) and
a central reference of 200 epochs. Curves are measured every 10 epochs.

    baim-jax run --config configs/paper.py --workdir runs/paper      # 31 minutes here
"""

from pathlib import Path

import ml_collections

from baim_jax.cli import load_config


def _case_study() -> ml_collections.ConfigDict:
    return load_config(str(Path(__file__).with_name("case_study.py")), [])


def get_config() -> ml_collections.ConfigDict:
    c = _case_study()
    for edge in c.edges:  # the smallest size class: 26k parameters
        if edge["encoder"] == [32]:
            edge.update({"encoder": [16], "latent": 4, "decoder": [16]})
    c.curve_every = 10
    c.edge.epochs = 100
    c.cloud.epochs = 100
    c.fl.rounds = 100
    c.central.epochs = 200
    return c
