"""A plain loop reference of the BAIM forward: one learner at a time, unpadded parameters,
one connection at a time (as maxtext's ``moe_test.py`` checks its fast paths)."""

import functools

import jax
import jax.numpy as jnp

from baim_jax.core import connections as C
from baim_jax.core import learners as L
from baim_jax.core import losses


def reference_forward(model, x, eps, weights):
    """Returns ``(recon [B, H, W, C], nelbo [B])`` computed learner by learner.

    Every learner runs on every example; ``weights [B, N]`` combine their outputs: the
    mixture bound sums the weighted per-learner bounds; the blend (``model.config.combine``)
    scores the weighted output, written out here pixel by pixel from its definition.
    """
    members = model.layout.members
    tree = model.export_tree()
    kept = [(c, k) for c, k, on in zip(model.conns.connections, tree["connections"],
                                       model.kept_flat()) if on]
    own = [L.stages(m.spec) for m in members]

    @functools.lru_cache(maxsize=None)
    def head(n):
        return L.apply_stage(own[n]["enc"][-1], tree["learners"][n]["enc"][-1],
                             mixed(n, "enc", len(own[n]["enc"]) - 1))

    def z(n):
        mean, logvar = head(n)
        return mean + jnp.exp(0.5 * logvar) * eps[:, : members[n].spec.latent]

    @functools.lru_cache(maxsize=None)
    def a(n, tower, k):
        """Original input of learner n's own stage k."""
        if k == 0:
            return x if tower == "enc" else z(n)
        return L.apply_stage(own[n][tower][k - 1], tree["learners"][n][tower][k - 1],
                             mixed(n, tower, k - 1))

    @functools.lru_cache(maxsize=None)
    def mixed(n, tower, k):
        out = a(n, tower, k)
        for c, kernel in kept:
            if c.tgt == n and c.tower == tower and c.tgt_stage == k:
                src = a(c.src, tower, c.src_stage)
                if src.ndim == 2:
                    out = out + jnp.tensordot(src, kernel, axes=1)
                else:
                    src = C.resample(src, out.shape[1:3])
                    out = out + jnp.einsum("bhwc,cd->bhwd", src, kernel)
        return out

    likelihood = model.layout.likelihood
    recon = nelbo = blend_out = blend_scale = 0.0
    for n, m in enumerate(members):
        if m.squad is None:
            continue
        out = L.apply_stage(own[n]["dec"][-1], tree["learners"][n]["dec"][-1],
                            mixed(n, "dec", len(own[n]["dec"]) - 1))
        mean, logvar = head(n)
        log_scale = jnp.asarray(tree["learners"][n].get("log_scale", 0.0))
        kl = losses.kl_standard_normal(mean, logvar, jnp.ones_like(mean, bool))
        w = weights[:, n]
        recon = recon + w[:, None, None, None] * losses.pixel_mean(out, likelihood)
        if model.config.combine == "mixture":
            nelbo = nelbo + w * (losses.nll(out, log_scale, x, likelihood) + kl)
        else:
            nelbo = nelbo + w * kl
            blend_out = blend_out + w[:, None, None, None] * (
                jax.nn.sigmoid(out) if likelihood == "bernoulli" else out)
            blend_scale = blend_scale + w * jnp.exp(log_scale)
    if model.config.combine == "blend":
        if likelihood == "bernoulli":
            t = losses.binarize(x)
            rec = -(t * jnp.log(blend_out) + (1 - t) * jnp.log(1 - blend_out))
        else:
            s = blend_scale[:, None, None, None]
            rec = 0.5 * ((x - blend_out) / s) ** 2 + jnp.log(s) + 0.5 * jnp.log(2 * jnp.pi)
        nelbo = nelbo + jnp.sum(rec, axis=(1, 2, 3))
    return recon, nelbo


def randomize_connections(model, key, scale=0.05):
    """Gives every connection random (padding-respecting) values, as if trained."""
    for i, (var, mask) in enumerate(zip(model.connections, model.conn_masks)):
        noise = scale * jax.random.normal(jax.random.fold_in(key, i), var[...].shape)
        var[...] = noise * mask[...].astype(noise.dtype)
