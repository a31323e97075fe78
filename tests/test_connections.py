"""Projection connections: potential sets counted by hand, pruning schedule and masks, kernel
stacking, resampling and ``BAIM.prune_connections`` (docs/design.md §2)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp

from baim_jax.core import connections, learners
from baim_jax.core.baim import BAIM, BAIMConfig
from baim_jax.core.connections import Connection
from baim_jax.core.pool import Member, PoolLayout

# Three MLP learners of different depths (stage k of a tower sits at pool position k, its
# last stage at the tower's last position, identity padding in between):
#
#   A = mlp([5], 2, [3]):       enc stages: dense 0, head 1        dec: dense 0, out 1
#   B = mlp([4, 6], 3, [4, 5]): enc: dense 0, dense 1, head 2      dec: dense 0, 1, out 2
#   C = mlp([6, 3, 4], 2, [6]): enc: dense 0, 1, 2, head 3         dec: dense 0, out 1
#
# Encoder positions (4):                  Decoder positions (3):
#   pos  A      B      C                    pos  A      B      C
#   0    0      0      0   (x: no source)   0    0      0      0   (z: a source)
#   1    id     1      1                    1    id     1      id
#   2    id     id     2                    2    1      2      1
#   3    1      2      3
#
# REAL sets: enc r1 = {B, C}, r2 = {C}, r3 = {A, B, C}; dec r0 = {A, B, C}, r1 = {B},
# r2 = {A, B, C}. Ordered pairs m != n from r_i to r_j: |r_i||r_j| - |r_i & r_j|.
#   enc (1,1) 2  (2,2) 0  (3,3) 6 | (1,2) 1  (2,3) 2 | (1,3) 4
#   dec (0,0) 6  (1,1) 0  (2,2) 6 | (0,1) 2  (1,2) 2 | (0,2) 6
# h = 0: 8 + 12 = 20;  h = 1: +3 +4 = 27;  h = 2: +4 +6 = 37;  h = 3: 37 (nothing reaches
# further: the encoder's first source position is 1, the decoder has 3 positions).
A = mlp([5], 2, [3])
B = mlp([4, 6], 3, [4, 5])
CC = mlp([6, 3, 4], 2, [6])
a, b, c = 0, 1, 2

H0 = {
    # enc (1,1): B <-> C at their own stage 1
    Connection("enc", b, 1, c, 1), Connection("enc", c, 1, b, 1),
    # enc (3,3): heads, A's stage 1, B's 2, C's 3
    Connection("enc", a, 1, b, 2), Connection("enc", a, 1, c, 3),
    Connection("enc", b, 2, a, 1), Connection("enc", b, 2, c, 3),
    Connection("enc", c, 3, a, 1), Connection("enc", c, 3, b, 2),
    # dec (0,0): the latents z
    Connection("dec", a, 0, b, 0), Connection("dec", a, 0, c, 0),
    Connection("dec", b, 0, a, 0), Connection("dec", b, 0, c, 0),
    Connection("dec", c, 0, a, 0), Connection("dec", c, 0, b, 0),
    # dec (2,2): output stages, A's 1, B's 2, C's 1
    Connection("dec", a, 1, b, 2), Connection("dec", a, 1, c, 1),
    Connection("dec", b, 2, a, 1), Connection("dec", b, 2, c, 1),
    Connection("dec", c, 1, a, 1), Connection("dec", c, 1, b, 2),
}
H1_EXTRA = {
    Connection("enc", b, 1, c, 2),                                    # enc (1,2)
    Connection("enc", c, 2, a, 1), Connection("enc", c, 2, b, 2),     # enc (2,3)
    Connection("dec", a, 0, b, 1), Connection("dec", c, 0, b, 1),     # dec (0,1)
    Connection("dec", b, 1, a, 1), Connection("dec", b, 1, c, 1),     # dec (1,2)
}
H2_EXTRA = {
    # enc (1,3): B, C at position 1 into the other heads
    Connection("enc", b, 1, a, 1), Connection("enc", b, 1, c, 3),
    Connection("enc", c, 1, a, 1), Connection("enc", c, 1, b, 2),
    # dec (0,2): every latent into the other output stages
    Connection("dec", a, 0, b, 2), Connection("dec", a, 0, c, 1),
    Connection("dec", b, 0, a, 1), Connection("dec", b, 0, c, 1),
    Connection("dec", c, 0, a, 1), Connection("dec", c, 0, b, 2),
}


@pytest.fixture
def layout():
    return PoolLayout([Member(A, 0), Member(B, 0), Member(CC, 1)])


def test_layout_is_as_drawn(layout):
    # Guards the hand counts below: the status table in the comment above (0 REAL, 1 IDENTITY).
    np.testing.assert_array_equal(layout.status["enc"].T,
                                  [[0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(layout.status["dec"].T, [[0, 1, 0], [0, 0, 0], [0, 1, 0]])


@pytest.mark.parametrize("h, want", [(0, H0), (1, H0 | H1_EXTRA), (2, H0 | H1_EXTRA | H2_EXTRA),
                                     (3, H0 | H1_EXTRA | H2_EXTRA)])
def test_potential_set_hand_counts(layout, h, want):
    got = connections.potential_set(layout, h)
    assert len(got) == {0: 20, 1: 27, 2: 37, 3: 37}[h]
    assert len(set(got)) == len(got)  # no duplicates
    assert set(got) == want
    assert got == sorted(got)


def test_potential_set_sources_and_reach(layout):
    conns = connections.potential_set(layout, 2)
    dec_z_sources = 0
    for cn in conns:
        assert cn.src != cn.tgt
        i = layout.position(cn.tower, cn.src, cn.src_stage)
        j = layout.position(cn.tower, cn.tgt, cn.tgt_stage)
        assert 0 <= j - i <= 2, cn  # direction: shallow to deep or equal, never back: no cycle
        if cn.tower == "enc":
            assert i >= 1, cn  # a[m, 0] is the image x: not a source
        else:
            dec_z_sources += i == 0  # z_m is a source
        # both ends are real stages of their own learner, in the same tower
        n_src = len(learners.stages(layout.members[cn.src].spec)[cn.tower])
        n_tgt = len(learners.stages(layout.members[cn.tgt].spec)[cn.tower])
        assert 0 <= cn.src_stage < n_src and 0 <= cn.tgt_stage < n_tgt
    assert dec_z_sources == 6 + 2 + 6  # dec (0,0), (0,1), (0,2) above
    assert {cn.tower for cn in conns} == {"enc", "dec"}


def test_potential_set_skips_absent_feeder_stages():
    # C as a feeder keeping its first 2 encoder stages and no decoder: C is REAL at enc
    # positions 0, 1 only, absent everywhere else. h = 0:
    #   enc (1,1): B <-> C = 2; enc (3,3): A <-> B = 2; dec (0,0): A <-> B = 2; dec (2,2): 2.
    layout = PoolLayout([Member(A, 0), Member(B, 0), Member(CC, None, (2, 0))])
    got = connections.potential_set(layout, 0)
    assert set(got) == {
        Connection("enc", b, 1, c, 1), Connection("enc", c, 1, b, 1),
        Connection("enc", a, 1, b, 2), Connection("enc", b, 2, a, 1),
        Connection("dec", a, 0, b, 0), Connection("dec", b, 0, a, 0),
        Connection("dec", a, 1, b, 2), Connection("dec", b, 2, a, 1)}
    # h = 1 adds enc (1,2) (nothing: C's position 2 is absent, r2 = {}) and enc (2,3) (nothing),
    # dec (0,1) A -> B, dec (1,2) B -> A: 10.
    assert len(connections.potential_set(layout, 1)) == 10


def test_two_identical_learners_h0():
    # Two 1-hidden-layer learners: every position is REAL for both; h = 0 gives one connection
    # each way at enc positions 1 (the head) and dec positions 0 (z), 1 (out): 2 + 4 = 6.
    spec = mlp([4], 2, [4])
    layout = PoolLayout([Member(spec, 0), Member(spec, 0)])
    assert len(connections.potential_set(layout, 0)) == 6
    # h = 1 adds dec (0,1) both ways: 8.
    assert len(connections.potential_set(layout, 1)) == 8


def test_potential_set_negative_h_raises(layout):
    with pytest.raises(ValueError, match="h"):
        connections.potential_set(layout, -1)


def test_connection_set_refuses_backward_connection(layout):
    # C's enc stage 2 (position 2) into B's stage 1 (position 1): deep to shallow.
    with pytest.raises(ValueError, match="back"):
        connections.ConnectionSet(layout, [Connection("enc", c, 2, b, 1)])


def test_flat_arrays_follow_groups(layout):
    cs = connections.ConnectionSet(layout, connections.potential_set(layout, 1))
    flat = cs.flat_arrays()
    assert set(flat) == {"src", "tgt", "tower", "i", "j"}
    for v in flat.values():
        chex.assert_shape(v, (27,))
    assert (flat["j"] >= flat["i"]).all() and (flat["j"] - flat["i"] <= 1).all()
    assert (flat["src"] != flat["tgt"]).all()
    # enc: (1,1) 2 + (1,2) 1 + (2,3) 2 + (3,3) 6 = 11; dec: 6 + 2 + 2 + 6 = 16.
    assert int((flat["tower"] == 0).sum()) == 11 and int((flat["tower"] == 1).sum()) == 16
    assert (flat["i"][flat["tower"] == 0] >= 1).all()


# -------------------------------------------------------------------------- kernel stacking

def test_kernel_shapes_by_hand(layout):
    cs = connections.ConnectionSet(layout, connections.potential_set(layout, 1))
    # B's enc stage 1 reads (4,), C's enc stage 1 reads (6,): dense (4, 6).
    assert cs.real_kernel_shape(Connection("enc", b, 1, c, 1)) == (4, 6)
    assert cs.param_count(Connection("enc", b, 1, c, 1)) == 24
    # z_A (2,) into B's dec stage 1, which reads B's first hidden (4,): (2, 4).
    assert cs.real_kernel_shape(Connection("dec", a, 0, b, 1)) == (2, 4)
    # Connections group by position pair and real shapes, so no kernel is padded: (enc, 1, 1)
    # holds B -> C, (4, 6), and C -> B, (6, 4), in groups of their own.
    groups = [g for g in cs.groups if (g.tower, g.i, g.j) == ("enc", 1, 1)]
    assert sorted(g.kernel_shape for g in groups) == [(4, 6), (6, 4)]
    assert all(len(g.index) == 1 for g in groups)
    assert all(g.tgt_pad == layout.stages["enc"][1].in_shape for g in groups)


def test_stack_unstack_round_trip(layout):
    cs = connections.ConnectionSet(layout, connections.potential_set(layout, 2))
    rng = np.random.default_rng(1)
    kernels = [rng.standard_normal(cs.real_kernel_shape(cn)).astype(np.float32) + 0.5
               for cn in cs.connections]
    stacked = cs.stack(kernels)
    assert len(stacked) == len(cs.groups)
    stacked = [np.asarray(x) for x in stacked]
    for g, arr in zip(cs.groups, stacked):
        chex.assert_shape(arr, (len(g.index), *g.kernel_shape))
        # every kernel of a group has its exact real shape: nothing is padded
        assert arr.size == sum(cs.param_count(cs.connections[k]) for k in g.index)
    back = cs.unstack(stacked)
    assert len(back) == len(kernels)
    for got, want in zip(back, kernels):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    # zeros() has the stacked shapes
    for z, arr in zip(cs.zeros(), stacked):
        assert z.shape == arr.shape and not z.any()


# ------------------------------------------------------------------------------- resampling

def test_resample_down_averages():
    # arange(16) as a 4x4 map, pooled to 2x2: the 2x2 blocks
    #   [0 1 / 4 5] -> 2.5   [2 3 / 6 7] -> 4.5   [8 9 / 12 13] -> 10.5   [10 11 / 14 15] -> 12.5
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    got = connections.resample(x, (2, 2))
    chex.assert_shape(got, (1, 2, 2, 1))
    np.testing.assert_array_equal(np.asarray(got)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    # Channels are pooled separately; leading axes pass through.
    x2 = jnp.stack([x, 10 * x], axis=-1).reshape(1, 1, 4, 4, 2)
    got2 = connections.resample(x2, (2, 2))
    chex.assert_shape(got2, (1, 1, 2, 2, 2))
    np.testing.assert_array_equal(np.asarray(got2)[0, 0, :, :, 1], [[25, 45], [105, 125]])


def test_resample_up_nearest():
    # [[1, 2], [3, 4]] to 4x4: every value fills its 2x2 block.
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.float32).reshape(1, 2, 2, 1)
    got = connections.resample(x, (4, 4))
    chex.assert_shape(got, (1, 4, 4, 1))
    np.testing.assert_array_equal(np.asarray(got)[0, :, :, 0],
                                  [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])


def test_resample_same_size_is_identity():
    x = jnp.ones((2, 4, 4, 3), jnp.float32)
    assert connections.resample(x, (4, 4)) is x


# --------------------------------------------------------------------------------- pruning

def test_kept_fraction_schedule():
    rho, start, end = 0.2, 10, 20
    # 1 up to and at start.
    for step in (0, 5, 10):
        assert connections.kept_fraction(step, rho, start, end) == 1.0
    # rho at and after end.
    for step in (20, 21, 1000):
        assert connections.kept_fraction(step, rho, start, end) == pytest.approx(rho)
    # Midpoint: rho + (1 - rho) (1 - 1/2)^3 = 0.2 + 0.8 / 8 = 0.3.
    assert connections.kept_fraction(15, rho, start, end) == pytest.approx(0.3)
    # A quarter in: 0.2 + 0.8 * 0.75^3 = 0.5375.
    assert connections.kept_fraction(12.5, rho, start, end) == pytest.approx(0.5375)
    vals = [connections.kept_fraction(s, rho, start, end) for s in range(0, 30)]
    assert all(x >= y for x, y in zip(vals, vals[1:]))  # non-increasing
    assert all(rho <= v <= 1.0 for v in vals)
    # rho = 1: nothing is ever pruned.
    assert connections.kept_fraction(15, 1.0, start, end) == 1.0


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5])
def test_kept_fraction_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        connections.kept_fraction(5, rho, 0, 10)


def test_prune_mask_hand_case_with_ties():
    # norms (3, 1, 2, 2, 5), all kept, keep 3: 5 (index 4), 3 (index 0), then the tie 2 vs 2
    # at indices 2 and 3 goes to the lower index, 2.
    norm = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    kept = np.ones(5, bool)
    np.testing.assert_array_equal(connections.prune_mask(norm, kept, 3), [1, 0, 1, 0, 1])
    # All tied: the first n_keep.
    np.testing.assert_array_equal(connections.prune_mask(np.ones(5), kept, 2), [1, 1, 0, 0, 0])
    # Keep 0: nothing.
    assert not connections.prune_mask(norm, kept, 0).any()


def test_prune_mask_never_revives():
    # Index 0 has the largest norm but was pruned already: it stays pruned.
    norm = np.array([10.0, 1.0, 2.0, 3.0, 4.0])
    kept = np.array([False, True, True, True, True])
    np.testing.assert_array_equal(connections.prune_mask(norm, kept, 2), [0, 0, 0, 1, 1])
    # Asking for more than are kept keeps what is kept, nothing more.
    np.testing.assert_array_equal(connections.prune_mask(norm, kept, 5), kept)


# A two-learner BAIM (assembling one is the expensive part: keep it tiny).
#   P = mlp([4], 2, [4]): enc dense 0, head at position 2 (position 1 identity); dec 0, out 1
#   Q = mlp([4, 4], 2, [4]): enc dense 0, dense 1, head 2; dec 0, out 1
# enc r1 = {Q}, r2 = {P, Q}; dec r0 = r1 = {P, Q}. h = 1:
#   enc (1,1) 0 + (2,2) 2 + (1,2) 1 (Q -> P)  +  dec (0,0) 2 + (1,1) 2 + (0,1) 2  =  9.
P_SPEC = mlp([4], 2, [4])
Q_SPEC = mlp([4, 4], 2, [4])


def _uploads(spec, seed):
    """Edge uploads made with numpy (skips a random-init compile per parameter shape)."""
    rng = np.random.default_rng(seed)
    tree = {tower: [{name: 0.3 * rng.standard_normal(shape).astype(np.float32)
                     for name, shape in learners.stage_param_shapes(stage).items()}
                    for stage in stages]
            for tower, stages in learners.stages(spec).items()}
    tree["log_scale"] = np.float32(0.0)
    return tree


def _kernels(model):
    """Each connection's real kernel (numpy), in ``conns.connections`` order."""
    return model.conns.unstack([np.asarray(v[...]) for v in model.connections])


def _set_kernels(model, seed, scale=1.0):
    """Random kernels; returns them per connection."""
    rng = np.random.default_rng(seed)
    for var in model.connections:
        var[...] = jnp.asarray(scale * rng.standard_normal(var[...].shape).astype(np.float32))
    return _kernels(model)


def test_baim_prune_connections():
    model = BAIM.assemble([P_SPEC, Q_SPEC], [0, 0], ["s0"], BAIMConfig(k=1, h=1, feature_dim=4),
                          params=[_uploads(P_SPEC, 0), _uploads(Q_SPEC, 1)])
    assert len(model.conns) == 9 and model.kept_flat().all()
    for f in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="kept_fraction"):
            model.prune_connections(f)
    assert model.kept_flat().all()
    before = _set_kernels(model, 0)
    norm = np.array([np.linalg.norm(k) for k in before])
    assert len(np.unique(norm)) == 9  # no ties: the kept set below is unambiguous

    # ceil(0.5 * 9) = ceil(4.5) = 5 kept: the 5 largest norms.
    assert model.prune_connections(0.5) == 5
    kept1 = model.kept_flat()
    assert kept1.sum() == 5
    np.testing.assert_array_equal(np.flatnonzero(kept1), np.sort(np.argsort(-norm)[:5]))
    after = _kernels(model)
    for k, on in enumerate(kept1):
        if on:
            np.testing.assert_array_equal(after[k], before[k])
        else:
            assert not after[k].any(), k  # pruned kernels are zeroed

    # Make every kernel large, the pruned ones included: none comes back.
    _set_kernels(model, 1, scale=100.0)
    assert model.prune_connections(0.5) == 5
    np.testing.assert_array_equal(model.kept_flat(), kept1)
    # 0.4 * 9 = 3.6 -> 4, then 0.25 * 9 = 2.25 -> 3; each a subset of the last.
    assert model.prune_connections(0.4) == 4
    kept2 = model.kept_flat()
    assert kept2.sum() == 4 and not (kept2 & ~kept1).any()
    assert model.prune_connections(0.25) == 3
    kept3 = model.kept_flat()
    assert kept3.sum() == 3 and not (kept3 & ~kept2).any()
    # Back up to 1.0: still 3.
    assert model.prune_connections(1.0) == 3
    np.testing.assert_array_equal(model.kept_flat(), kept3)
    for k, kern in enumerate(_kernels(model)):
        assert kern.any() == kept3[k], k
    assert model.spec.connections_kept == 3
    assert len(model.spec.connections) == 9
