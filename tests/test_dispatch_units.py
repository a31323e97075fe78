"""Dispatch units worked by hand: capacity, buffer layouts, combination and the stage-level
closure of what must run for an input (docs/design.md §2, "What runs for one input")."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baim_jax.core import dispatch

# One compile per shape instead of one per eager op.
# Learners with any stage to run, per example: what the layouts are built from.
needed = jax.jit(lambda active, conn, kept, depths: dispatch.chained_depth(
    dispatch.needed_prefixes(active, conn, kept, depths)) > 0, static_argnums=3)
capacity_layout = jax.jit(dispatch.capacity_layout, static_argnums=1)
combine = jax.jit(dispatch.combine)


# --------------------------------------------------------------------------------- capacity

@pytest.mark.parametrize("batch, k, n, factor, want", [
    (8, 2, 4, None, 8),     # dropless: B
    (5, 1, 7, None, 5),
    (8, 2, 4, 1.0, 4),      # ceil(1.0 * 8 * 2 / 4) = 4
    (8, 2, 4, 1.25, 5),     # ceil(1.25 * 4) = 5
    (8, 2, 4, 1.1, 5),      # ceil(4.4) = 5: rounds up
    (8, 1, 3, 1.0, 3),      # ceil(8 / 3 = 2.67) = 3
    (8, 2, 4, 100.0, 8),    # ceil(400) clipped to B
    (8, 2, 4, 2.0, 8),      # ceil(8) = B exactly
    (8, 1, 4, 0.01, 1),     # ceil(0.02) = 1, never below 1
    (1, 1, 4, 0.5, 1),
])
def test_capacity(batch, k, n, factor, want):
    got = dispatch.capacity(batch, k, n, factor)
    assert got == want
    assert isinstance(got, int)


@pytest.mark.parametrize("factor", [0, 0.0, -1.0])
def test_capacity_bad_factor(factor):
    with pytest.raises(ValueError, match="capacity_factor"):
        dispatch.capacity(8, 2, 4, factor)


# ---------------------------------------------------------------------------------- layouts

# 4 examples, 3 learners, capacity 2:
#            l0 l1 l2
#   ex 0     1  0  1
#   ex 1     1  0  0
#   ex 2     1  0  1
#   ex 3     0  1  1
# l0 is needed by 0, 1, 2: slots 0 <- ex 0, 1 <- ex 1; ex 2 does not fit (dropped).
# l1 is needed by 3 only: slot 0 <- ex 3, slot 1 empty (B = 4 marks it).
# l2 is needed by 0, 2, 3: slots 0 <- ex 0, 1 <- ex 2; ex 3 dropped.
NEED = np.array([[1, 0, 1], [1, 0, 0], [1, 0, 1], [0, 1, 1]], bool)
ROWS_OF = np.array([[0, 1], [3, 4], [0, 2]])
# slot_of[b, n]: the slot of ex b in l_n's buffer, 2 (= cap) where none; last row all 2.
SLOT_OF = np.array([[0, 2, 0],
                    [1, 2, 2],
                    [2, 2, 1],
                    [2, 0, 2],
                    [2, 2, 2]])
# One stage position: an example's depth is 1 where the learner is needed.
DEPTH1 = jnp.asarray(NEED.astype(np.int32))


def test_capacity_layout_hand_case():
    lay = capacity_layout(DEPTH1, (2,))
    chex.assert_shape(lay.rows_of, (3, 2))
    chex.assert_shape(lay.slot_of, (5, 3))
    np.testing.assert_array_equal(np.asarray(lay.rows_of), ROWS_OF)
    np.testing.assert_array_equal(np.asarray(lay.slot_of), SLOT_OF)
    assert int(lay.dropped) == 2


def test_capacity_layout_enough_room_drops_nothing():
    # cap 3: l0 takes 0, 1, 2; l1 takes 3 (+2 empty); l2 takes 0, 2, 3.
    lay = capacity_layout(DEPTH1, (3,))
    np.testing.assert_array_equal(np.asarray(lay.rows_of), [[0, 1, 2], [3, 4, 4], [0, 2, 3]])
    np.testing.assert_array_equal(np.asarray(lay.slot_of),
                                  [[0, 3, 0], [1, 3, 3], [2, 3, 1], [3, 0, 2], [3, 3, 3]])
    assert int(lay.dropped) == 0


# 5 examples, 2 learners, a chain of 4 positions (say 2 encoder, 2 decoder); depth = how
# many positions each example needs at each learner:
#            l0 l1
#   ex 0     2  4      l0 feeds from its encoder only (positions 0, 1); l1 is picked
#   ex 1     4  0      l0 picked; l1 not needed
#   ex 2     0  3      l1 feeds through its first decoder position
#   ex 3     4  1      l0 picked; l1 feeds from its first position only
#   ex 4     3  4
# Sorted deepest first, ties in batch order: l0: 1, 3 (depth 4), 4 (3), 0 (2);
# l1: 0, 4 (4), 2 (3), 3 (1).
DEPTH = jnp.asarray(np.array([[2, 4], [4, 0], [0, 3], [4, 1], [3, 4]], np.int32))


def test_capacity_layout_sorts_by_depth_and_caps_each_position():
    # caps (4, 3, 3, 2): the first 4 slots run position 0, 3 slots positions 1 and 2, 2 slots
    # the last position.
    #   l0: slots 1, 3, 4, 0. Ex 0 (depth 2) needs positions 0, 1 but sits in slot 3 >= 3,
    #       the cap of position 1: dropped. Ex 4 (depth 3, slot 2): fits positions 0..2.
    #   l1: slots 0, 4, 2, 3. Ex 2 (depth 3, slot 2 < 3) fits; ex 3 (depth 1, slot 3 < 4) fits.
    lay = capacity_layout(DEPTH, (4, 3, 3, 2))
    assert lay.caps == (4, 3, 3, 2)
    np.testing.assert_array_equal(np.asarray(lay.rows_of), [[1, 3, 4, 0], [0, 4, 2, 3]])
    # slot_of: ex 2 has no slot at l0 (4 = R), ex 1 none at l1; the last row is all R.
    np.testing.assert_array_equal(np.asarray(lay.slot_of),
                                  [[3, 0], [0, 4], [4, 2], [1, 3], [2, 1], [4, 4]])
    assert int(lay.dropped) == 1
    # Three slots: ex 0 at l0 and ex 3 at l1 lose their slot (slot 3); caps above the
    # buffer are cut to it by ``capacities``, not here.
    lay = capacity_layout(DEPTH, (3, 3, 2, 2))
    np.testing.assert_array_equal(np.asarray(lay.rows_of), [[1, 3, 4], [0, 4, 2]])
    # l0: ex 0 (no slot), ex 4 (slot 2, depth 3: position 2 has cap 2): 2 drops;
    # l1: ex 3 (no slot), ex 2 (slot 2, depth 3): 2 drops.
    assert int(lay.dropped) == 4


def test_capacities():
    # B = 8, K = 2, N = 4: B K / N = 4 rows per factor.
    assert dispatch.capacities(8, 2, 4, None, 3) == (8, 8, 8)
    assert dispatch.capacities(8, 2, 4, 1.0, 3) == (4, 4, 4)
    # One factor per position, made nonincreasing: (2 -> 8, 1 -> 4, 1.5 -> 6 cut to 4).
    assert dispatch.capacities(8, 2, 4, (2.0, 1.0, 1.5), 3) == (8, 4, 4)
    with pytest.raises(ValueError, match="capacity_factor: 2 factors given, the pool has 3"):
        dispatch.capacities(8, 2, 4, (1.0, 1.0), 3)
    with pytest.raises(ValueError, match="capacity_factor"):
        dispatch.capacities(8, 2, 4, (1.0, 0.0, 1.0), 3)


def test_combine_reads_only_the_rows_a_position_ran():
    # Values of the last position (cap 2) of the layout above: l0 slots hold ex 1, 3;
    # l1 slots hold ex 0, 4. Weights 1 everywhere: ex 0 gets l1's slot 0 (20), ex 1 l0's
    # slot 0 (1), ex 3 l0's slot 1 (2), ex 4 l1's slot 1 (40); ex 2 ran no last position: 0.
    lay = capacity_layout(DEPTH, (4, 3, 3, 2))
    values = jnp.array([[1.0, 2.0], [20.0, 40.0]], jnp.float32)
    got = combine(values, jnp.ones((5, 2), jnp.float32), lay)
    np.testing.assert_allclose(np.asarray(got), [20.0, 1.0, 0.0, 2.0, 40.0])


def test_chained_depth():
    # Prefixes (encoder, decoder) of 3 positions + 2: a decoder prefix comes after the whole
    # encoder, so they add up.
    prefixes = jnp.asarray(np.array([[[3, 2], [3, 0], [1, 0], [0, 0]]], np.int32))
    np.testing.assert_array_equal(np.asarray(dispatch.chained_depth(prefixes)), [[5, 3, 1, 0]])


def test_dense_layout():
    lay = dispatch.dense_layout(3, 2, 4)
    np.testing.assert_array_equal(np.asarray(lay.rows_of), [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(np.asarray(lay.slot_of), [[0, 0], [1, 1], [2, 2], [3, 3]])
    assert int(lay.dropped) == 0 and lay.caps == (3, 3, 3, 3)


def test_gather_rows():
    # Buffers of the hand layout; the empty slot (example 4) reads zeros.
    x = jnp.array([10.0, 11.0, 12.0, 13.0], jnp.float32)
    lay = capacity_layout(DEPTH1, (2,))
    got = dispatch.gather_rows(x, lay.rows_of)
    np.testing.assert_array_equal(np.asarray(got), [[10, 11], [13, 0], [10, 12]])


def test_combine_hand_case():
    # Buffers of the hand layout (cap 2), one value per slot:
    #   l0: (1, 2)   l1: (10, 20)   l2: (100, 200)
    # weights (zero where not needed):
    #   ex 0: 0.5 l0 + 0.5 l2  -> 0.5 * 1 (l0 slot 0) + 0.5 * 100 (l2 slot 0) = 50.5
    #   ex 1: 1.0 l0           -> 1.0 * 2 (l0 slot 1)                         = 2
    #   ex 2: 0.25 l0 + 0.75 l2 -> l0 dropped: 0;  0.75 * 200 (l2 slot 1)     = 150
    #   ex 3: 0.4 l1 + 0.6 l2  -> 0.4 * 10 (l1 slot 0); l2 dropped: 0          = 4
    values = jnp.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]], jnp.float32)
    weights = jnp.array([[0.5, 0, 0.5], [1.0, 0, 0], [0.25, 0, 0.75], [0, 0.4, 0.6]],
                        jnp.float32)
    lay = capacity_layout(DEPTH1, (2,))
    got = combine(values, weights, lay)
    chex.assert_shape(got, (4,))
    np.testing.assert_allclose(np.asarray(got), [50.5, 2.0, 150.0, 4.0], rtol=1e-6)
    # Trailing feature axes ride along: values (v, -v) per slot give (out, -out).
    vals2 = jnp.stack([values, -values], axis=-1)
    got2 = combine(vals2, weights, lay)
    chex.assert_shape(got2, (4, 2))
    np.testing.assert_allclose(np.asarray(got2[:, 1]), [-50.5, -2.0, -150.0, -4.0], rtol=1e-6)


def test_surviving_weights_hand_case():
    # The hand layout of test_combine_hand_case (cap 2): ex 2 lost l0, ex 3 lost l2.
    #   ex 0, ex 1: nothing lost, weights unchanged            -> 50.5, 2
    #   ex 2: 0.75 l2 alone, renormalised to 1.0 -> 1.0 * 200  = 200
    #   ex 3: 0.4 l1 alone, renormalised to 1.0  -> 1.0 * 10   = 10
    values = jnp.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]], jnp.float32)
    weights = jnp.array([[0.5, 0, 0.5], [1.0, 0, 0], [0.25, 0, 0.75], [0, 0.4, 0.6]],
                        jnp.float32)
    lay = capacity_layout(DEPTH1, (2,))
    got = dispatch.surviving_weights(weights, weights > 0, lay)
    np.testing.assert_allclose(np.asarray(got),
                               [[0.5, 0, 0.5], [1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])
    np.testing.assert_allclose(np.asarray(combine(values, got, lay)), [50.5, 2.0, 200.0, 10.0])
    # A row that lost every learner it selected scores nothing (no NaN).
    alone = dispatch.surviving_weights(jnp.array([[0.0, 0.0, 1.0]] * 4), jnp.array([[0, 0, 1]] * 4,
                                bool), lay)
    np.testing.assert_allclose(np.asarray(alone[3]), [0.0, 0.0, 0.0])
    # The dense layout loses nothing: weights come back bit for bit.
    dense = dispatch.dense_layout(4, 3, 1)
    chex.assert_trees_all_equal(dispatch.surviving_weights(weights, weights > 0, dense), weights)


def test_combine_dense_is_weighted_sum():
    # Dense layout: out[b] = sum_n w[b, n] * values[n, b].
    values = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)  # l0: 0 1 2, l1: 3 4 5
    weights = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]], jnp.float32)
    got = combine(values, weights, dispatch.dense_layout(3, 2, 1))
    # ex 0: 1*0 = 0; ex 1: 0.5*1 + 0.5*4 = 2.5; ex 2: 2*5 = 10
    np.testing.assert_allclose(np.asarray(got), [0.0, 2.5, 10.0], rtol=1e-6)


# ----------------------------------------------------------------------------------- needed

ENC, DEC = 0, 1


def conns(*rows):
    """Flat connection arrays from (tower, src, i, tgt, j) rows."""
    arr = np.array(rows, np.int32).reshape(-1, 5)
    return {"tower": arr[:, 0], "src": arr[:, 1], "i": arr[:, 2], "tgt": arr[:, 3],
            "j": arr[:, 4]}


def run_needed(active, conn, kept, depths):
    got = needed(jnp.asarray(np.array(active, bool)), conn, jnp.asarray(np.array(kept, bool)),
                 depths)
    return np.asarray(got).astype(int).tolist()


def test_needed_no_connections_is_active():
    active = [[1, 0, 0], [0, 1, 1]]
    got = needed(jnp.asarray(np.array(active, bool)), conns(), jnp.zeros((0,), bool), (3, 2))
    np.testing.assert_array_equal(np.asarray(got), np.array(active, bool))


def test_needed_kept_encoder_connection():
    # (0, enc 1) -> (1, enc 2), depths (3, 2).
    #   row 0: learner 1 active, its encoder stage 2 runs: learner 0 must produce a[0, 1].
    #   row 1: only learner 2 active: the connection's target does not run: nothing added.
    #   row 2: only learner 0 (the source) active: nothing added.
    c = conns((ENC, 0, 1, 1, 2))
    active = [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    assert run_needed(active, c, [True], (3, 2)) == [[1, 1, 0], [0, 0, 1], [1, 0, 0]]
    # Not kept (pruned): never fires.
    assert run_needed(active, c, [False], (3, 2)) == active


def test_needed_decoder_connection():
    # (2, dec 0) -> (1, dec 1): z_2 feeds learner 1's decoder, so learner 2 (its encoder)
    # must run whenever learner 1 does.
    c = conns((DEC, 2, 0, 1, 1))
    active = [[0, 1, 0], [1, 0, 0]]
    assert run_needed(active, c, [True], (3, 2)) == [[0, 1, 1], [1, 0, 0]]
    assert run_needed(active, c, [False], (3, 2)) == active


def test_needed_transitive():
    # a: (0, enc 1) -> (1, enc 1);  b: (1, enc 2) -> (2, enc 2); depths (3, 2).
    # Learner 2 active: b fires, learner 1 runs its first 2 encoder stages (positions 0, 1);
    # its stage at position 1 runs, so a fires and learner 0 runs too.
    c = conns((ENC, 0, 1, 1, 1), (ENC, 1, 2, 2, 2))
    active = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
    assert run_needed(active, c, [True, True], (3, 2)) == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    # Without b, learner 2 pulls in nobody; without a, learner 1 pulls in nobody.
    assert run_needed(active, c, [True, False], (3, 2)) == [[0, 0, 1], [1, 1, 0], [1, 0, 0]]
    assert run_needed(active, c, [False, True], (3, 2)) == [[0, 1, 1], [0, 1, 0], [1, 0, 0]]


def test_needed_target_stage_not_run_does_not_fire():
    # depths (4, 2). b: (1, enc 2) -> (2, enc 2): learner 2 active needs learner 1's first
    # 2 encoder stages only (positions 0, 1; a[1, 2] is their output).
    #   a_fire: (0, enc 1) -> (1, enc 1): position 1 of learner 1 runs -> learner 0 needed.
    #   a_idle: (0, enc 1) -> (1, enc 2): position 2 of learner 1 does not run -> not needed.
    #   d_idle: (0, dec 0) -> (1, dec 0): learner 1 runs no decoder stage -> not needed.
    active = [[0, 0, 1]]
    b = (ENC, 1, 2, 2, 2)
    assert run_needed(active, conns(b, (ENC, 0, 1, 1, 1)), [True, True], (4, 2)) == [[1, 1, 1]]
    assert run_needed(active, conns(b, (ENC, 0, 1, 1, 2)), [True, True], (4, 2)) == [[0, 1, 1]]
    assert run_needed(active, conns(b, (DEC, 0, 0, 1, 0)), [True, True], (4, 2)) == [[0, 1, 1]]


def test_needed_through_a_decoder_source():
    # depths (3, 2). d: (0, dec 1) -> (1, dec 1): learner 1 active needs learner 0's whole
    # encoder (for z_0) and its first decoder stage (position 0, producing a[0, dec 1]).
    #   e: (2, enc 1) -> (0, enc 2): learner 0's encoder position 2 runs -> learner 2 needed.
    #   f_idle: (2, dec 0) -> (0, dec 1): learner 0's decoder position 1 does not run.
    #   f_fire: (2, dec 0) -> (0, dec 0): its decoder position 0 runs -> learner 2 needed.
    active = [[0, 1, 0]]
    d = (DEC, 0, 1, 1, 1)
    assert run_needed(active, conns(d), [True], (3, 2)) == [[1, 1, 0]]
    assert run_needed(active, conns(d, (ENC, 2, 1, 0, 2)), [True, True], (3, 2)) == [[1, 1, 1]]
    assert run_needed(active, conns(d, (DEC, 2, 0, 0, 1)), [True, True], (3, 2)) == [[1, 1, 0]]
    assert run_needed(active, conns(d, (DEC, 2, 0, 0, 0)), [True, True], (3, 2)) == [[1, 1, 1]]
