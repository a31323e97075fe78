"""A plain loop reference of the BAIM forward and its bound: one learner at a time, unpadded
parameters, one connection at a time (as maxtext's ``moe_test.py`` checks its fast paths).
Every value carries the set of latents it was computed from, so the latents a path consumes
are found by following the values, independently of ``dispatch.needed_prefixes``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from baim_jax.core import connections, learners, losses


def reference_paths(model, x, eps, source=None):
    """Every learner of ``model`` run on every example, learner by learner.

    Args:
      x: ``[B, H, W, C]``; eps: ``[N, B, >= L_n]`` each learner's own noise.
      source: None (every decoder decodes its own latent), or a learner whose latent every
        decoder decodes, cut or zero-padded to its own size (shared latents).

    Returns:
      per learner n (None for a feeder's missing head): ``{"mean", "logvar", "out", "latents"}``
      with ``out`` its output stage's raw output (gated learners only) and ``latents`` the
      learners whose z its output was computed from.
    """
    members = model.layout.members
    tree = model.export_tree()
    kept = [(c, k) for c, k, on in zip(model.conns.connections, tree["connections"],
                                       model.kept_flat()) if on]
    own = [learners.stages(m.spec) for m in members]

    def keeps(n, tower):
        return len(own[n][tower]) if members[n].keep is None else members[n].keep[
            learners.TOWERS.index(tower)]

    @functools.lru_cache(maxsize=None)
    def head(n):
        value, _ = mixed(n, "enc", len(own[n]["enc"]) - 1)
        return learners.apply_stage(own[n]["enc"][-1], tree["learners"][n]["enc"][-1], value)

    def z(n):
        mean, logvar = head(n)
        return mean + jnp.exp(0.5 * logvar) * eps[n][:, : members[n].spec.latent]

    def decoded(n):
        """The latent learner n's decoder reads, and whose it is."""
        if source is None:
            return z(n), n
        size = members[n].spec.latent
        shared = z(source)[:, :size]
        return jnp.pad(shared, ((0, 0), (0, size - shared.shape[1]))), source

    @functools.lru_cache(maxsize=None)
    def a(n, tower, k):
        """Original input of learner n's own stage k, and the latents it depends on."""
        if k == 0:
            if tower == "enc":
                return x, frozenset()
            latent, whose = decoded(n)
            return latent, frozenset([whose])
        value, latents = mixed(n, tower, k - 1)
        return learners.apply_stage(own[n][tower][k - 1], tree["learners"][n][tower][k - 1],
                             value), latents

    @functools.lru_cache(maxsize=None)
    def mixed(n, tower, k):
        out, latents = a(n, tower, k)
        for c, kernel in kept:
            if c.tgt == n and c.tower == tower and c.tgt_stage == k:
                src, src_latents = a(c.src, tower, c.src_stage)
                latents = latents | src_latents
                if src.ndim == 2:
                    out = out + jnp.tensordot(src, kernel, axes=1)
                else:
                    src = connections.resample(src, out.shape[1:3])
                    out = out + jnp.einsum("bhwc,cd->bhwd", src, kernel)
        return out, latents

    paths = []
    for n, m in enumerate(members):
        path = {}
        if keeps(n, "enc") == len(own[n]["enc"]):
            path["mean"], path["logvar"] = head(n)
        if m.squad is not None:
            value, latents = mixed(n, "dec", len(own[n]["dec"]) - 1)
            path["out"] = learners.apply_stage(own[n]["dec"][-1], tree["learners"][n]["dec"][-1],
                                               value)
            path["latents"] = latents
        paths.append(path)
    return paths


def reference_log_prior(model):
    """``log pi`` ``[N]``: a softmax of the prior logits within each squad (numpy)."""
    logits = np.asarray(model.export_tree()["prior"], np.float64)
    seg = model.layout.segment_of
    out = np.full(len(seg), -np.inf)
    for s in set(seg.tolist()) - {-1}:
        idx = seg == s
        out[idx] = logits[idx] - np.log(np.sum(np.exp(logits[idx])))
    return out


def reference_forward(model, x, eps, weights):
    """Returns ``(recon [B, H, W, C], nelbo [B])`` computed learner by learner.

    ``nelbo = sum_n w_n (rec_n + sum_{m in C(n)} KL_m + log w_n - log pi_n)`` over the learners
    with a weight (docs/design.md §3b); ``weights [B, N]`` are the gate's. Shared latents: path
    n is its own run of every learner on ``z_n`` (``C(n) = {n}``).
    """
    members = model.layout.members
    tree = model.export_tree()
    paths = reference_paths(model, x, eps)
    if model.config.latent == "shared":
        paths = [{**paths[n], **reference_paths(model, x, eps, source=n)[n]}
                 for n in range(len(members))]
    log_pi = reference_log_prior(model)
    likelihood = model.layout.likelihood
    kl = {n: losses.kl_standard_normal(p["mean"], p["logvar"], jnp.ones_like(p["mean"], bool))
          for n, p in enumerate(paths) if "mean" in p}
    recon = nelbo = 0.0
    for n, m in enumerate(members):
        if m.squad is None:
            continue
        out = paths[n]["out"]
        log_scale = jnp.asarray(tree["learners"][n].get("log_scale", 0.0))
        w = weights[:, n]
        recon = recon + w[:, None, None, None] * losses.pixel_mean(out, likelihood)
        term = losses.nll(out, log_scale, x, likelihood) + sum(kl[j] for j in paths[n]["latents"])
        safe = jnp.where(w > 0, w, 1.0)
        gate = jnp.where(w > 0, jnp.log(safe) - float(log_pi[n]), 0.0)
        nelbo = nelbo + w * (term + gate)
    return recon, nelbo


def randomize_connections(model, seed, scale=0.05):
    """Gives every connection random values N(0, scale^2), as if trained; drawn with numpy, so
    that no kernel shape compiles a sampler."""
    rng = np.random.default_rng(seed)
    for var in model.connections:
        var[...] = jax.device_put(scale * rng.standard_normal(var[...].shape).astype(np.float32))
