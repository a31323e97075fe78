"""Hyper-parameters of a BAIM: one frozen, validated record (saved in its ``spec.json``)."""

from __future__ import annotations

import dataclasses

from baim_jax.core import gates, learners

LATENTS = ("own", "shared")
PRIOR_INITS = ("uniform", "params")


@dataclasses.dataclass(frozen=True)
class BAIMConfig:
    """Hyper-parameters of a BAIM.

    Attributes:
      k: learners per input (top-K of the task's LSGate).
      h: connection reach, ``0 <= j - i <= h``.
      connect: the towers whose stages are connected: ``("enc", "dec")``, one of them, or
        ``()`` (no connections: the ablation every result is read against).
      latent: ``"own"``: each learner on a path decodes its own latent (each with its KL);
        ``"shared"``: every decoder on learner n's path decodes n's latent, resized to its
        own size (one KL per path; docs/design.md §3b).
      gate: registered gate function (``gates.gate_names()``).
      noise_std: noisy top-K std in training (0: off).
      feature_dim: width of the gate's feature map phi.
      dispatch: ``"capacity"`` (fast path) or ``"dense"`` (reference).
      capacity_factor: rows per learner = factor * B * K / N; one factor, or one per stage
        position (encoder then decoder; ``dispatch.capacities``); None: B (never drops).
      load_balance_weight, z_loss_weight, task_loss_weight: auxiliary loss weights.
      prior_init: the prior pi of an assembled BAIM before training: ``"uniform"`` over each
        squad, or ``"params"``, proportional to each learner's parameter count.
    """

    k: int = 2
    h: int = 1
    connect: tuple[str, ...] = learners.TOWERS
    latent: str = "own"
    gate: str = "topk_softmax"
    noise_std: float = 0.0
    feature_dim: int = 64
    dispatch: str = "capacity"
    capacity_factor: float | tuple[float, ...] | None = None
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    task_loss_weight: float = 1.0
    prior_init: str = "uniform"

    def __post_init__(self):
        for name in ("capacity_factor", "connect"):  # lists from JSON or a config file
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k: must be an integer >= 1, got {self.k!r}")
        if not isinstance(self.h, int) or self.h < 0:
            raise ValueError(f"h: must be an integer >= 0, got {self.h!r}")
        if (not isinstance(self.connect, tuple) or len(set(self.connect)) != len(self.connect)
                or not set(self.connect) <= set(learners.TOWERS)):
            raise ValueError(f"connect: must be a list of distinct towers from {learners.TOWERS}, "
                             f"got {self.connect!r}")
        if self.latent not in LATENTS:
            raise ValueError(f"latent: {self.latent!r} is not one of {LATENTS}")
        if self.prior_init not in PRIOR_INITS:
            raise ValueError(f"prior_init: {self.prior_init!r} is not one of {PRIOR_INITS}")
        gates.get_gate(self.gate)
        if self.dispatch not in ("capacity", "dense"):
            raise ValueError(f"dispatch: {self.dispatch!r} is not 'capacity' or 'dense'")
        factors = (self.capacity_factor if isinstance(self.capacity_factor, tuple)
                   else (self.capacity_factor,))
        if self.capacity_factor is not None and not all(
                isinstance(f, (int, float)) and f > 0 for f in factors):
            raise ValueError("capacity_factor: must be None, a number > 0 or a list of them, "
                             f"got {self.capacity_factor!r}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std: must be >= 0, got {self.noise_std}")
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim: must be >= 1, got {self.feature_dim}")
