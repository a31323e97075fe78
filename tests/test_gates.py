"""Hand-worked routing cases for the HierGate (docs/design.md §3), in the style of vmoe's
``moe_test.py``: every expected selection and weight is written out and explained."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baim_jax.core import gates

# Jitted once per shape: eager op-by-op dispatch is what makes small tests slow.
hier_gate = jax.jit(gates.hier_gate, static_argnames=("k", "gate", "noise_std"))
load_balancing_loss = jax.jit(gates.load_balancing_loss, static_argnums=(2, 3))

E = math.e
SIG1 = E / (1.0 + E)  # softmax of logits (1, 0) at the 1: e / (1 + e) = 0.7311
SIG0 = 1.0 / (1.0 + E)  # ... and at the 0:                1 / (1 + e) = 0.2689

# 3 inputs, 4 learners (one squad), K = 2.
#   row 0: [1, 0, -1, -2]  top-2 = {0, 1}            (plain case)
#   row 1: [0, 3,  3,  1]  top-2 = {1, 2}            (tie at the top: both chosen)
#   row 2: [0, 1,  0,  0]  top-2 = {1, 0}            (three-way tie for 2nd place at 0:
#                                                     the lowest index, 0, wins)
LOGITS = np.array([[1.0, 0.0, -1.0, -2.0],
                   [0.0, 3.0, 3.0, 1.0],
                   [0.0, 1.0, 0.0, 0.0]], np.float32)
SELECTED = np.array([[True, True, False, False],
                     [False, True, True, False],
                     [True, True, False, False]])


def test_top_k_mask_hand_case():
    got = gates.top_k_mask(jnp.asarray(LOGITS), 2)
    chex.assert_shape(got, (3, 4))
    np.testing.assert_array_equal(np.asarray(got), SELECTED)
    # Exactly K per row, whatever the ties.
    np.testing.assert_array_equal(np.asarray(got).sum(axis=1), [2, 2, 2])


def test_top_k_mask_k1_and_kn():
    # K = 1: the argmax (row 1 ties 3 vs 3 -> index 1).
    got = np.asarray(gates.top_k_mask(jnp.asarray(LOGITS), 1))
    np.testing.assert_array_equal(got, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]])
    # K = N: everything.
    got = np.asarray(gates.top_k_mask(jnp.asarray(LOGITS), 4))
    assert got.all()


def test_topk_softmax_hand_case():
    # Softmax over the two chosen logits only:
    #   row 0: chosen logits (1, 0)  -> (e/(1+e), 1/(1+e)) = (0.7311, 0.2689) at learners 0, 1
    #   row 1: chosen logits (3, 3)  -> (0.5, 0.5) at learners 1, 2
    #   row 2: chosen logits (0, 1)  -> (0.2689, 0.7311) at learners 0, 1
    want = np.array([[SIG1, SIG0, 0.0, 0.0],
                     [0.0, 0.5, 0.5, 0.0],
                     [SIG0, SIG1, 0.0, 0.0]], np.float32)
    got = gates.topk_softmax(jnp.asarray(LOGITS), jnp.asarray(SELECTED))
    chex.assert_trees_all_close(got, jnp.asarray(want), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got) > 0, SELECTED)


def test_uniform_hand_case():
    # 1/K = 0.5 on each chosen learner, whatever the logits.
    want = SELECTED.astype(np.float32) * 0.5
    got = gates.uniform(jnp.asarray(LOGITS), jnp.asarray(SELECTED))
    chex.assert_trees_all_close(got, jnp.asarray(want))


def test_gate_functions_are_registered():
    names = gates.gate_names()
    for name in ("topk_softmax", "uniform"):
        assert name in names
    assert gates.get_gate("topk_softmax") is gates.topk_softmax
    assert gates.get_gate("uniform") is gates.uniform


# ------------------------------------------------------------------------------- hier_gate
#
# A gate whose logits we set by hand: x[b] is a one-hot image of shape (1, 1, 3) (example b
# lights channel b), phi's kernel is the 3x3 identity and its bias 0, so phi(x[b]) = e_b and
# the LSGate / TSGate logits of example b are row b of their kernels (biases 0).
#
# N = 6 learners, M = 2 squads, K = 2.
LS = np.array([[3.0, 1.0, 2.0, 9.0, 8.0, 7.0],
               [9.0, 9.0, 9.0, 0.0, 1.0, 0.0],
               [0.0, 0.0, 0.0, 5.0, 5.0, 6.0]], np.float32)
TS = np.array([[2.0, 1.0],     # row 0 -> task 0
               [0.0, 1.0],     # row 1 -> task 1
               [0.5, 2.0]],    # row 2 -> task 1
              np.float32)
X = jnp.eye(3, dtype=jnp.float32).reshape(3, 1, 1, 3)


def gate_params(ls=LS, ts=TS):
    return {"phi": {"kernel": jnp.eye(3, dtype=jnp.float32).reshape(1, 1, 3, 3),
                    "bias": jnp.zeros((3,), jnp.float32)},
            "ls": {"kernel": jnp.asarray(ls), "bias": jnp.zeros((ls.shape[1],), jnp.float32)},
            "ts": {"kernel": jnp.asarray(ts), "bias": jnp.zeros((ts.shape[1],), jnp.float32)}}


def check_k_in_segment(out, segment_of, k):
    sel = np.asarray(out.selected)
    w = np.asarray(out.weights)
    task = np.asarray(out.task)
    seg = np.asarray(segment_of)
    np.testing.assert_array_equal((w != 0).sum(axis=1), k)
    np.testing.assert_array_equal(sel.sum(axis=1), k)
    np.testing.assert_array_equal(w != 0, sel)
    for b in range(w.shape[0]):
        assert (seg[w[b] != 0] == task[b]).all(), (b, w[b], task[b])
    # LSGate logits are -inf outside the row's segment, finite inside.
    np.testing.assert_array_equal(np.isfinite(np.asarray(out.logits)),
                                  seg[None, :] == task[:, None])


def test_hier_gate_contiguous_segments():
    # segment_of [0,0,0,1,1,1]; tasks given as [0, 1, 1].
    #   row 0 (task 0, learners 0..2): logits (3, 1, 2) -> {0, 2}; the larger 9, 8, 7 of
    #          squad 1 are out of the segment.  softmax(3, 2) = (0.7311, 0.2689).
    #   row 1 (task 1, learners 3..5): logits (0, 1, 0) -> {4, 3} (tie 3 vs 5 -> 3);
    #          softmax(1, 0) = (0.7311 at 4, 0.2689 at 3).
    #   row 2 (task 1): logits (5, 5, 6) -> {5, 3} (tie 3 vs 4 -> 3);
    #          softmax(6, 5) = (0.7311 at 5, 0.2689 at 3).
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)
    out = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                          task=jnp.array([0, 1, 1], jnp.int32))
    want = np.array([[SIG1, 0, SIG0, 0, 0, 0],
                     [0, 0, 0, SIG0, SIG1, 0],
                     [0, 0, 0, SIG0, 0, SIG1]], np.float32)
    chex.assert_shape(out.weights, (3, 6))
    chex.assert_shape(out.task_logits, (3, 2))
    chex.assert_trees_all_close(out.weights, jnp.asarray(want), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.task), [0, 1, 1])
    check_k_in_segment(out, seg, 2)


def test_hier_gate_non_contiguous_segments():
    # segment_of [0,1,0,1,0,1]: squad 0 = {0, 2, 4}, squad 1 = {1, 3, 5}; tasks [0, 1, 1].
    #   row 0 (task 0): logits (3, 2, 8) at (0, 2, 4) -> {4, 0}; softmax(8, 3):
    #          e^5/(1+e^5) = 0.99331 at 4, 1/(1+e^5) = 0.00669 at 0.
    #   row 1 (task 1): logits (9, 0, 0) at (1, 3, 5) -> {1, 3} (tie 3 vs 5 -> 3);
    #          softmax(9, 0): 0.99988 at 1, 0.00012 at 3.
    #   row 2 (task 1): logits (0, 5, 6) at (1, 3, 5) -> {5, 3}; (0.7311 at 5, 0.2689 at 3).
    seg = jnp.array([0, 1, 0, 1, 0, 1], jnp.int32)
    out = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                          task=jnp.array([0, 1, 1], jnp.int32))
    s5 = math.exp(5) / (1 + math.exp(5))
    s9 = math.exp(9) / (1 + math.exp(9))
    want = np.array([[1 - s5, 0, 0, 0, s5, 0],
                     [0, s9, 0, 1 - s9, 0, 0],
                     [0, 0, 0, SIG0, 0, SIG1]], np.float32)
    chex.assert_trees_all_close(out.weights, jnp.asarray(want), atol=1e-6)
    check_k_in_segment(out, seg, 2)


def test_hier_gate_four_learners_two_squads():
    # N = 4, segment_of [0,0,1,1] and [0,1,0,1], K = 1, task [1, 0, 0]: logits (first four
    # columns of LS) row 0 = (3, 1, 2, 9), row 1 = (9, 9, 9, 0), row 2 = (0, 0, 0, 5).
    #   [0,0,1,1]: row 0 task 1 {2,3} -> 3; row 1 task 0 {0,1} tie -> 0; row 2 task 0 tie -> 0.
    #   [0,1,0,1]: row 0 task 1 {1,3} -> 3; row 1 task 0 {0,2} tie -> 0; row 2 task 0 tie -> 0.
    # K = 1 with softmax: weight exactly 1 on the chosen learner.
    task = jnp.array([1, 0, 0], jnp.int32)
    for seg_list in ([0, 0, 1, 1], [0, 1, 0, 1]):
        seg = jnp.array(seg_list, jnp.int32)
        out = hier_gate(gate_params(ls=LS[:, :4]), X, segment_of=seg, k=1,
                              gate="topk_softmax", task=task)
        want = np.array([[0, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0]], np.float32)
        chex.assert_trees_all_close(out.weights, jnp.asarray(want))
        check_k_in_segment(out, seg, 1)


def test_hier_gate_tsgate_decides_when_no_task():
    # TS rows: (2, 1) -> 0, (0, 1) -> 1, (0.5, 2) -> 1: with task=None the routing is that of
    # task=[0, 1, 1] above. Naming the task overrides the TSGate: task [1, 0, 0] routes
    # row 0 to squad 1 (logits 9, 8, 7 -> {3, 4}) whatever the TSGate says.
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)
    auto = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax")
    named = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                            task=jnp.array([0, 1, 1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(auto.task), [0, 1, 1])
    chex.assert_trees_all_close(auto.weights, named.weights)
    chex.assert_trees_all_close(auto.task_logits, jnp.asarray(TS))

    other = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                            task=jnp.array([1, 0, 0], jnp.int32))
    np.testing.assert_array_equal(np.asarray(other.task), [1, 0, 0])
    np.testing.assert_array_equal(np.asarray(other.selected[0]), [0, 0, 0, 1, 1, 0])
    check_k_in_segment(other, seg, 2)

    # Flip the TSGate's preference for row 0 and it is routed to squad 1.
    ts = TS.copy()
    ts[0] = [1.0, 2.0]
    flipped = hier_gate(gate_params(ts=ts), X, segment_of=seg, k=2, gate="topk_softmax")
    np.testing.assert_array_equal(np.asarray(flipped.task), [1, 1, 1])
    np.testing.assert_array_equal(np.asarray(flipped.selected[0]), [0, 0, 0, 1, 1, 0])


def test_hier_gate_uniform():
    # Same routing as the contiguous case; 'uniform' gives 0.5, 0.5.
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)
    task = jnp.array([0, 1, 1], jnp.int32)
    un = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="uniform", task=task)
    want = np.array([[0.5, 0, 0.5, 0, 0, 0],
                     [0, 0, 0, 0.5, 0.5, 0],
                     [0, 0, 0, 0.5, 0, 0.5]], np.float32)
    chex.assert_trees_all_close(un.weights, jnp.asarray(want))


def test_hier_gate_never_selects_feeders():
    # Learner 5 is a feeder (segment -1): never gated. Squad 1 is then {3, 4}, so K = 2 takes
    # both, whatever their logits: row 1 (0, 1) -> (0.2689, 0.7311); row 2 (5, 5) -> 0.5, 0.5
    # (learner 5's 6 is ignored). Row 0 (task 0) is as in the contiguous case.
    seg = jnp.array([0, 0, 0, 1, 1, -1], jnp.int32)
    out = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                    task=jnp.array([0, 1, 1], jnp.int32))
    want = np.array([[SIG1, 0, SIG0, 0, 0, 0],
                     [0, 0, 0, SIG0, SIG1, 0],
                     [0, 0, 0, 0.5, 0.5, 0]], np.float32)
    chex.assert_trees_all_close(out.weights, jnp.asarray(want), atol=1e-6)
    assert not np.asarray(out.selected)[:, 5].any()
    check_k_in_segment(out, seg, 2)


def test_hier_gate_imposed_selection_keeps_gate_weights():
    # Imposing learners {1, 2} for row 0 (logits 1, 2): softmax(2, 1) = 0.7311 at 2.
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)
    sel = jnp.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1]], bool)
    out = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                          task=jnp.array([0, 1, 1], jnp.int32), selected=sel)
    np.testing.assert_array_equal(np.asarray(out.selected), np.asarray(sel))
    np.testing.assert_allclose(np.asarray(out.weights[0]), [0, SIG0, SIG1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.weights[1]), [0, 0, 0, 0.5, 0, 0.5], atol=1e-6)


# ------------------------------------------------------------------------- auxiliary losses

def gate_output(logits, selected, task, task_logits=None):
    logits = jnp.asarray(np.asarray(logits, np.float32))
    b = logits.shape[0]
    if task_logits is None:
        task_logits = np.zeros((b, 1), np.float32)
    return gates.GateOutput(weights=jnp.zeros_like(logits), selected=jnp.asarray(selected, bool),
                            task=jnp.asarray(task, jnp.int32), logits=logits,
                            task_logits=jnp.asarray(np.asarray(task_logits, np.float32)))


def test_load_balancing_loss_balanced_is_one():
    # One squad of 2, K = 1, 2 rows with equal logits: P = (0.5, 0.5); row 0 picks 0, row 1
    # picks 1: f = (0.5, 0.5).  2 * (0.5*0.5 + 0.5*0.5) = 1.
    out = gate_output([[0.0, 0.0], [0.0, 0.0]], [[1, 0], [0, 1]], [0, 0])
    got = load_balancing_loss(out, jnp.array([0, 0], jnp.int32), 1, 1)
    np.testing.assert_allclose(float(got), 1.0, rtol=1e-6)
    # K = 2 of 2: every learner gets half the assignments: also 1.
    out = gate_output([[0.0, 0.0], [0.0, 0.0]], [[1, 1], [1, 1]], [0, 0])
    got = load_balancing_loss(out, jnp.array([0, 0], jnp.int32), 1, 2)
    np.testing.assert_allclose(float(got), 1.0, rtol=1e-6)


def test_load_balancing_loss_unbalanced_hand_value():
    # One squad of 2, K = 1, logits (log 3, 0) on both rows: P = (0.75, 0.25); both rows pick
    # learner 0: f = (1, 0).  2 * (1 * 0.75 + 0 * 0.25) = 1.5.
    l3 = math.log(3.0)
    out = gate_output([[l3, 0.0], [l3, 0.0]], [[1, 0], [1, 0]], [0, 0])
    got = load_balancing_loss(out, jnp.array([0, 0], jnp.int32), 1, 1)
    np.testing.assert_allclose(float(got), 1.5, rtol=1e-6)


def test_load_balancing_loss_per_squad_average():
    # segment_of [0,0,1,1], K = 1. Rows 0, 1 -> squad 0 balanced (1.0, as above); row 2 ->
    # squad 1, logits (log 3, 0) picking learner 2: 2 * 0.75 = 1.5. Mean over the two squads
    # present: 1.25. A third task with no rows (and no learners) does not count.
    inf = -np.inf
    l3 = math.log(3.0)
    out = gate_output([[0.0, 0.0, inf, inf], [0.0, 0.0, inf, inf], [inf, inf, l3, 0.0]],
                      [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], [0, 0, 1])
    seg = jnp.array([0, 0, 1, 1], jnp.int32)
    np.testing.assert_allclose(float(load_balancing_loss(out, seg, 2, 1)), 1.25, rtol=1e-6)
    np.testing.assert_allclose(float(load_balancing_loss(out, seg, 3, 1)), 1.25, rtol=1e-6)


def test_router_z_loss_hand_value():
    # Row 0: segment logits (0, 0) -> logsumexp = log 2; row 1: (log 3, 0) -> log 4 = 2 log 2.
    # mean((log 2)^2, (2 log 2)^2) = 2.5 (log 2)^2 = 1.20113. The -inf outside the segment
    # contributes nothing.
    inf = -np.inf
    out = gate_output([[0.0, 0.0, inf], [math.log(3.0), 0.0, inf]], [[1, 0, 0], [1, 0, 0]],
                      [0, 0])
    got = gates.router_z_loss(out)
    np.testing.assert_allclose(float(got), 2.5 * math.log(2.0) ** 2, rtol=1e-5)
    np.testing.assert_allclose(float(got), 1.20113, rtol=1e-5)


def test_task_loss_hand_cross_entropy():
    # Task logits (0, log 3) label 1: -log(3/4) = 0.28768; (0, 0) label 0: -log(1/2) = 0.69315.
    # Mean 0.49041.
    out = gate_output([[0.0], [0.0]], [[1], [1]], [0, 0],
                      task_logits=[[0.0, math.log(3.0)], [0.0, 0.0]])
    got = gates.task_loss(out, jnp.array([1, 0], jnp.int32))
    np.testing.assert_allclose(float(got), (-math.log(0.75) - math.log(0.5)) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(got), 0.49041, rtol=1e-4)


# -------------------------------------------------------------------------------- registry

def test_register_gate_usable_by_name(monkeypatch):
    monkeypatch.setattr(gates, "_GATES", dict(gates._GATES))  # leave the real registry alone

    @gates.register_gate("test_first_only")
    def first_only(logits, selected):
        """All the weight on the lowest-index selected learner."""
        del logits
        first = jnp.cumsum(selected.astype(jnp.int32), axis=-1) == 1
        return (selected & first).astype(jnp.float32)

    assert "test_first_only" in gates.gate_names()
    assert gates.get_gate("test_first_only") is first_only
    # Contiguous case above: row 0 selects {0, 2} -> 0; row 1 {3, 4} -> 3; row 2 {3, 5} -> 3.
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)
    out = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="test_first_only",
                          task=jnp.array([0, 1, 1], jnp.int32))
    want = np.zeros((3, 6), np.float32)
    want[0, 0] = want[1, 3] = want[2, 3] = 1.0
    chex.assert_trees_all_close(out.weights, jnp.asarray(want))
    np.testing.assert_array_equal(np.asarray(out.selected).sum(axis=1), 2)


def test_get_gate_unknown_raises():
    with pytest.raises(ValueError, match="'nope'"):
        gates.get_gate("nope")
    with pytest.raises(ValueError, match="nope"):
        hier_gate(gate_params(), X, segment_of=jnp.array([0, 0, 0, 1, 1, 1], jnp.int32),
                        k=2, gate="nope", task=jnp.array([0, 1, 1], jnp.int32))


# ------------------------------------------------------------------------------ noisy top-K

def test_noisy_top_k():
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)
    task = jnp.array([0, 1, 1], jnp.int32)
    clean = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                            task=task)
    # No rng: no noise, whatever noise_std says.
    no_rng = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                             task=task, noise_std=5.0)
    np.testing.assert_array_equal(np.asarray(no_rng.selected), np.asarray(clean.selected))
    chex.assert_trees_all_close(no_rng.weights, clean.weights)
    # An rng with noise_std 0: no noise either.
    zero = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                           task=task, noise_std=0.0, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(zero.selected), np.asarray(clean.selected))
    # Noise std 10 against logit gaps of 1: over 20 keys the choice changes at least once, yet
    # stays K per row inside the segment. As in Shazeer et al. (2017), the NOISY logits weigh
    # the K they chose (softmax of KeepTopK(clean + noise)); GateOutput.logits, which the
    # auxiliary losses read, stay clean.
    changed = 0
    for seed in range(20):
        noisy = hier_gate(gate_params(), X, segment_of=seg, k=2, gate="topk_softmax",
                                task=task, noise_std=10.0, rng=jax.random.key(seed))
        check_k_in_segment(noisy, seg, 2)
        changed += int((np.asarray(noisy.selected) != np.asarray(clean.selected)).any())
        chex.assert_trees_all_close(noisy.logits, clean.logits)
        noise = 10.0 * jax.random.normal(jax.random.key(seed), clean.logits.shape)
        chex.assert_trees_all_close(
            noisy.weights, gates.topk_softmax(clean.logits + noise, noisy.selected), atol=1e-6)
        assert not np.allclose(noisy.weights,
                               gates.topk_softmax(clean.logits, noisy.selected), atol=1e-3)
    assert changed > 0


def test_top_k_in_segment_ranks_diverged_logits():
    # segment [T, T, T, F, F, F] in every row (task 0 of squads [0,0,0,1,1,1]), K = 2.
    # NaN ranks lowest, then -inf, then finite values, +inf highest; out of the segment
    # nothing is chosen however large:
    #   row 0: (nan, nan, nan | 9, 8, 7)   -> all tied at the bottom: lowest indices {0, 1}
    #   row 1: (nan, -inf, inf | 9, 8, 7)  -> inf at 2, then -inf at 1 above NaN: {1, 2}
    #   row 2: (3, nan, 0 | 7, 5, 6)       -> finite 3 and 0 above NaN: {0, 2}
    # Before, top-K over NaN could pick no learner of the segment and the loss scored 0.
    raw = jnp.array([[np.nan, np.nan, np.nan, 9.0, 8.0, 7.0],
                     [np.nan, -np.inf, np.inf, 9.0, 8.0, 7.0],
                     [3.0, np.nan, 0.0, 7.0, 5.0, 6.0]], jnp.float32)
    seg = gates.segment_mask(jnp.array([0, 0, 0, 1, 1, 1]), jnp.zeros((3,), jnp.int32))
    got = np.asarray(gates.top_k_in_segment(raw, seg, 2))
    np.testing.assert_array_equal(got, [[True, True, False, False, False, False],
                                        [False, True, True, False, False, False],
                                        [True, False, True, False, False, False]])


def test_diverged_gate_still_selects_k_in_the_segment_and_scores_nan():
    # Every gate parameter NaN: the TSGate's argmax falls on task 0, its squad (learners
    # 0..2) gives its two lowest indices, and the weights are NaN, never an empty selection.
    nan = {k: {n: jnp.full_like(v, jnp.nan) for n, v in p.items()}
           for k, p in gate_params().items()}
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)
    out = hier_gate(nan, X, segment_of=seg, k=2, gate="topk_softmax")
    np.testing.assert_array_equal(np.asarray(out.selected),
                                  [[True, True, False, False, False, False]] * 3)
    assert np.isnan(np.asarray(out.weights)[:, :2]).all()
