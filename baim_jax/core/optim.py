"""The optimiser every training phase uses: Adam at a constant learning rate, or one that
follows a cosine from the rate down to 0 over the phase's steps (docs/design.md §10)."""

from __future__ import annotations

import functools

import jax
import optax

SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str, where: str = "schedule") -> None:
    """Raises ``ValueError`` naming ``where`` unless ``schedule`` is one of ``SCHEDULES``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"{where}: {schedule!r} is not one of {list(SCHEDULES)}")


def decay_steps(schedule: str, total_steps: int) -> int | None:
    """The ``decay_steps`` of ``adam`` for a phase of ``total_steps`` with ``schedule``."""
    check_schedule(schedule)
    return None if schedule == "constant" else max(int(total_steps), 1)


@functools.lru_cache(maxsize=None)
def adam(learning_rate: float, decay_steps: int | None = None) -> optax.GradientTransformation:
    """Adam at ``learning_rate``, or decayed by a cosine to 0 over ``decay_steps`` steps.

    One transformation per argument pair: it is part of a compiled step's static arguments,
    so reusing it lets models of one architecture share compiled code. Its ``init`` is jitted:
    one compiled program per parameter structure, where run eagerly it compiles a fill of
    zeros for every distinct leaf shape.
    """
    tx = optax.adam(learning_rate if decay_steps is None
                    else optax.cosine_decay_schedule(learning_rate, decay_steps))
    return optax.GradientTransformationExtraArgs(jax.jit(tx.init), tx.update)
