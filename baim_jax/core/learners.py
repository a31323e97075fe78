"""VAE learners split into stages (paper Sec. "Bottom-up BAIM", docs/design.md §2).

A learner is an edge's generative model: an encoder tower (hidden stages, then the latent
head giving mean and log-variance) and a decoder tower (hidden stages from the latent z, then
the output stage giving pixel logits or means). Every stage maps one feature array to the next;
``a[n, i]`` in docs/design.md is the input of stage ``i``.

Stage kinds (``Stage.op``):
  * ``dense``: tensordot over all feature axes, ``[B, *in] -> [B, *out]``; its bias has ``out``'s
    shape. MLP learners use it everywhere (the first stage reads the image ``[H, W, C]``, the
    output stage writes it); convolutional decoders use it to map z to the first feature map.
  * ``head``: two ``dense`` maps, to the latent mean and log-variance ``[B, L]`` each.
  * ``conv``: 3x3 convolution, stride 1 or 2, SAME padding.
  * ``upconv``: nearest-neighbour x2 upsampling, then a 3x3 convolution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")
TOWERS = ("enc", "dec")

Params = dict[str, Any]


class SpecError(ValueError):
    """A learner spec (or a set of them) that cannot be built."""


@dataclasses.dataclass(frozen=True)
class LearnerSpec:
    """Architecture of one VAE learner; saved with its parameters.

    Attributes:
      kind: ``"mlp"`` or ``"conv"``.
      image_shape: ``(H, W, C)`` of the images it models.
      encoder: widths (MLP) or channels (conv) of the encoder's hidden stages.
      latent: latent size ``L``.
      decoder: widths or channels of the decoder's hidden stages.
      likelihood: ``"bernoulli"`` (binarised pixels, logits out) or ``"gaussian"`` (means out,
        one learned log-scale per learner).
    """

    kind: str
    image_shape: tuple[int, int, int]
    encoder: tuple[int, ...]
    latent: int
    decoder: tuple[int, ...]
    likelihood: str = "bernoulli"

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(v) for v in self.image_shape))
        object.__setattr__(self, "encoder", tuple(int(v) for v in self.encoder))
        object.__setattr__(self, "decoder", tuple(int(v) for v in self.decoder))
        object.__setattr__(self, "latent", int(self.latent))
        self.validate()

    def validate(self) -> None:
        """Raises SpecError naming the first field that cannot be built."""
        if self.kind not in KINDS:
            raise SpecError(f"learner spec field 'kind': {self.kind!r} is not one of {KINDS}")
        if self.likelihood not in LIKELIHOODS:
            raise SpecError(
                f"learner spec field 'likelihood': {self.likelihood!r} is not one of {LIKELIHOODS}")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise SpecError(
                f"learner spec field 'image_shape': {self.image_shape} is not a positive (H, W, C)")
        if self.latent < 1:
            raise SpecError(f"learner spec field 'latent': {self.latent} must be >= 1")
        for name in ("encoder", "decoder"):
            widths = getattr(self, name)
            if any(w < 1 for w in widths):
                raise SpecError(f"learner spec field '{name}': widths {widths} must all be >= 1")
        if self.kind == "mlp" and not self.encoder:
            raise SpecError(
                "learner spec field 'encoder': MLP learners need at least one hidden encoder "
                "layer (in a pool, a learner without one would carry the image through a "
                "flat stage position)")
        if self.kind == "conv":
            h, w, _ = self.image_shape
            if h % 4 or w % 4:
                raise SpecError(
                    f"learner spec field 'image_shape': conv learners need H and W divisible "
                    f"by 4, got {self.image_shape}")
            for name in ("encoder", "decoder"):
                if len(getattr(self, name)) < 2:
                    raise SpecError(
                        f"learner spec field '{name}': conv learners need at least 2 stages "
                        f"(two resolution changes), got {getattr(self, name)}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LearnerSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise SpecError(f"learner spec: unknown field(s) {sorted(unknown)}")
        missing = fields - set(d) - {"likelihood"}
        if missing:
            raise SpecError(f"learner spec: missing field(s) {sorted(missing)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: ``op`` maps ``[B, *in_shape]`` to ``[B, *out_shape]``."""

    op: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    act: bool
    stride: int = 1


def stages(spec: LearnerSpec) -> dict[str, list[Stage]]:
    """The stages of each tower: ``{"enc": [...hidden, head], "dec": [...hidden, output]}``."""
    h, w, c = spec.image_shape
    latent = (spec.latent,)
    enc, dec = [], []
    if spec.kind == "mlp":
        prev: tuple[int, ...] = spec.image_shape
        for width in spec.encoder:
            enc.append(Stage("dense", prev, (width,), True))
            prev = (width,)
        enc.append(Stage("head", prev, latent, False))
        prev = latent
        for width in spec.decoder:
            dec.append(Stage("dense", prev, (width,), True))
            prev = (width,)
        dec.append(Stage("dense", prev, spec.image_shape, False))
    else:
        prev = spec.image_shape
        size = (h, w)
        for k, ch in enumerate(spec.encoder):
            stride = 2 if k < 2 else 1
            size = (size[0] // stride, size[1] // stride)
            enc.append(Stage("conv", prev, (*size, ch), True, stride))
            prev = (*size, ch)
        enc.append(Stage("head", prev, latent, False))
        first = (h // 4, w // 4, spec.decoder[0])
        dec.append(Stage("dense", latent, first, True))
        prev = first
        for ch in spec.decoder[1:]:
            if prev[0] == h // 4:
                dec.append(Stage("upconv", prev, (h // 2, w // 2, ch), True))
            else:
                dec.append(Stage("conv", prev, (h // 2, w // 2, ch), True))
            prev = dec[-1].out_shape
        dec.append(Stage("upconv", prev, spec.image_shape, False))
    return {"enc": enc, "dec": dec}


def stage_param_shapes(stage: Stage) -> dict[str, tuple[int, ...]]:
    """Shapes of a stage's parameters (unpadded)."""
    if stage.op == "dense":
        return {"kernel": stage.in_shape + stage.out_shape, "bias": stage.out_shape}
    if stage.op == "head":
        k = stage.in_shape + stage.out_shape
        return {"mean_kernel": k, "mean_bias": stage.out_shape,
                "logvar_kernel": k, "logvar_bias": stage.out_shape}
    cin, cout = stage.in_shape[-1], stage.out_shape[-1]
    return {"kernel": (3, 3, cin, cout), "bias": (cout,)}


def _fan_in(stage: Stage) -> int:
    if stage.op in ("conv", "upconv"):
        return 9 * stage.in_shape[-1]
    return math.prod(stage.in_shape)


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded from a JAX key (initialisation draws on the host: no compile
    per parameter shape, which on a CPU costs far more than the draws)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def init_stage(stage: Stage, rng: np.random.Generator) -> Params:
    """LeCun-normal kernels, zero biases (numpy float32)."""
    out = {}
    for name, shape in sorted(stage_param_shapes(stage).items()):
        if name.endswith("kernel"):
            scale = 1.0 / math.sqrt(_fan_in(stage))
            out[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


def init_learner(spec: LearnerSpec, key: jax.Array) -> Params:
    """Unpadded parameters ``{"enc": [stage params], "dec": [...]}``; Gaussian learners add a
    scalar ``"log_scale"`` (the pixel standard deviation's log)."""
    rng = numpy_rng(key)
    st = stages(spec)
    params = {tower: [init_stage(s, rng) for s in st[tower]] for tower in TOWERS}
    if spec.likelihood == "gaussian":
        params["log_scale"] = np.zeros((), np.float32)
    return params


def count_params(spec: LearnerSpec, *, enc_stages: int | None = None,
                 dec_stages: int | None = None) -> int:
    """Real parameter count; optionally of the first ``enc_stages``/``dec_stages`` stages only."""
    st = stages(spec)
    total = 0
    for tower, keep in (("enc", enc_stages), ("dec", dec_stages)):
        for s in st[tower][: len(st[tower]) if keep is None else keep]:
            total += sum(math.prod(v) for v in stage_param_shapes(s).values())
    if enc_stages is None and dec_stages is None and spec.likelihood == "gaussian":
        total += 1
    return total


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array,
           out_shape: tuple[int, ...]) -> jax.Array:
    """``[B, *in] @ [*in, *out] + [*out]`` as one 2-D matmul (reshapes are free; a
    multi-axis contraction would make XLA copy the kernel into matmul layout every call).
    The kernel and bias may come shaped ``[*in, *out]`` and ``out`` or already flat."""
    size = math.prod(out_shape)
    y = x.reshape(x.shape[0], -1) @ kernel.reshape(-1, size)
    return (y + bias.reshape(size)).reshape(x.shape[0], *out_shape)


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling, ``[B, h, w, c] -> [B, 2h, 2w, c]``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def apply_stage(stage: Stage, p: Params, x: jax.Array):
    """Runs one stage on ``x [B, *in_shape]``; a head returns ``(mean, logvar)``, each
    ``[B, L]``."""
    if stage.op == "head":
        return (_dense(x, p["mean_kernel"], p["mean_bias"], stage.out_shape),
                _dense(x, p["logvar_kernel"], p["logvar_bias"], stage.out_shape))
    if stage.op == "dense":
        y = _dense(x, p["kernel"], p["bias"], stage.out_shape)
    elif stage.op == "conv":
        y = _conv(x, p["kernel"], p["bias"], stage.stride)
    elif stage.op == "upconv":
        y = _conv(upsample2(x), p["kernel"], p["bias"], 1)
    else:
        raise ValueError(f"unknown stage op {stage.op!r}")
    return jax.nn.relu(y) if stage.act else y


def stage_flops(stage: Stage) -> int:
    """Multiply-add FLOPs (2 per MAC) of one stage for one example, forward only."""
    if stage.op in ("dense", "head"):
        macs = math.prod(stage.in_shape) * math.prod(stage.out_shape)
        return 2 * macs * (2 if stage.op == "head" else 1)
    h, w, cout = stage.out_shape
    return 2 * h * w * cout * 9 * stage.in_shape[-1]


def learner_flops(spec: LearnerSpec) -> int:
    """Forward FLOPs of one learner for one example (all stages)."""
    st = stages(spec)
    return sum(stage_flops(s) for t in TOWERS for s in st[t])


def check_image_shape(spec_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> None:
    """Raises ValueError when images ``x [B, H, W, C]`` do not fit the learners."""
    if len(x_shape) != 4 or tuple(x_shape[1:]) != tuple(spec_shape):
        raise ValueError(
            f"images: shape {tuple(x_shape)} does not fit the learners, which take "
            f"[batch, {', '.join(map(str, spec_shape))}]")


def learner_forward(spec: LearnerSpec, params: Params, x: jax.Array, eps: jax.Array) -> dict:
    """One learner alone (an edge model; the per-learner reference: no padding, no pool).

    Args:
      spec: the learner's spec.
      params: its unpadded parameters.
      x: images ``[B, H, W, C]``.
      eps: standard normal noise ``[B, >= L]``; the learner takes the first ``L`` coordinates.

    Returns:
      dict with ``mean``/``logvar``/``z`` ``[B, L]`` and ``out`` ``[B, H, W, C]`` (logits or
      means).
    """
    st = stages(spec)
    a = x
    for i, s in enumerate(st["enc"]):
        a = apply_stage(s, params["enc"][i], a)
    mean, logvar = a
    z = mean + jnp.exp(0.5 * logvar) * eps[:, : spec.latent]
    a = z
    for i, s in enumerate(st["dec"]):
        a = apply_stage(s, params["dec"][i], a)
    return {"mean": mean, "logvar": logvar, "z": z, "out": a}


