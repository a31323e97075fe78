"""The case study's BAIM with random weights and connections, as the cloud-step and
request-cost benchmarks time it (cost does not depend on training); ``--latent`` and
``--connect`` override the config's design."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baim_jax.cli import load_config  # noqa: E402
from baim_jax.core.baim import BAIM  # noqa: E402
from baim_jax.core.config import LATENTS  # noqa: E402
from baim_jax.core.learners import TOWERS  # noqa: E402
from baim_jax.framework import plan as plan_lib  # noqa: E402


def add_design_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latent", choices=LATENTS, default=None)
    parser.add_argument("--connect", nargs="*", choices=TOWERS, default=None,
                        help="the connected towers (default: the config's)")


CASE_STUDY = ROOT / "configs" / "case_study.py"


def build(latent: str | None, connect: list[str] | None, config: Path | str = CASE_STUDY):
    """``(plan, model)``: the validated plan of ``config`` (the case study's by default) and
    its BAIM, connections N(0, 0.01^2)."""
    plan = plan_lib.validate(load_config(str(config), []))
    config = dataclasses.replace(
        plan.baim, latent=latent or plan.baim.latent,
        connect=plan.baim.connect if connect is None else tuple(connect))
    model = BAIM.assemble(plan.specs, plan.edge_tasks, plan.tasks, config)
    rng = np.random.default_rng(0)
    for var in model.connections:
        var[...] = jnp.asarray(0.01 * rng.standard_normal(var[...].shape).astype(np.float32))
    return plan, model
