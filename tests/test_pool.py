"""The pool's stage groups: which learners share a stacked stage, and the group split's gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baim_jax.core import learners as L
from baim_jax.core.pool import Member, PoolLayout, partition_stages, split_groups


def dense(out: int, inp: int = 10) -> L.Stage:
    return L.Stage("dense", (inp,), (out,), True)


def test_partition_cuts_the_sorted_stages_where_padding_costs_most():
    # Widths 500, 8, 100, 16 from 10 inputs, FLOPs proportional to count x widest width.
    # Two groups: {8, 16, 100} + {500} runs 3 x 100 + 500 = 800 (against {8, 16} + {100, 500}:
    # 2 x 16 + 2 x 500 = 1032, and one group: 4 x 500 = 2000).
    stages = [dense(500), dense(8), dense(100), dense(16)]
    assert partition_stages(stages, max_groups=2) == [[1, 2, 3], [0]]
    # Three groups: {8, 16} + {100} + {500} runs 32 + 100 + 500 = 632, more than 5% below 800.
    assert partition_stages(stages, max_groups=3) == [[1, 3], [2], [0]]


def test_partition_keeps_fewer_groups_within_five_percent():
    # {100, 100, 104} + {500}: 312 + 500 = 812; the best three groups {100, 100} + {104} +
    # {500} save 8 (1%), not worth a third stacked matmul.
    stages = [dense(100), dense(104), dense(500), dense(100)]
    assert partition_stages(stages, max_groups=3) == [[0, 1, 3], [2]]


def test_partition_pads_inputs_and_outputs_to_the_group_box():
    # Widths equal, inputs 4 and 40: together 2 x 40 x 8, apart 4 x 8 + 40 x 8 (45% less).
    stages = [L.Stage("dense", (40,), (8,), True), L.Stage("dense", (4,), (8,), True)]
    assert partition_stages(stages, max_groups=2) == [[1], [0]]
    assert partition_stages(stages, max_groups=1) == [[0, 1]]


def test_layout_groups_only_real_learners_at_their_own_boxes():
    # Encoder widths 6, 32, [32, 16]: at position 1 only learner 2 is real (the others pass
    # their input through); at position 0 the two 32-wide learners share a group; the heads
    # (inputs 6, 32, 16) run apart, 54 units of input against 64 for the best two groups.
    specs = [L.LearnerSpec(kind="mlp", image_shape=(4, 4, 1), encoder=enc, latent=2,
                           decoder=[5]) for enc in ([6], [32], [32, 16])]
    layout = PoolLayout([Member(s, 0) for s in specs])
    groups = {p: [(g.learners, g.stage.in_shape, g.stage.out_shape)
                  for g in layout.groups("enc", p)] for p in range(3)}
    assert groups[0] == [((0,), (4, 4, 1), (6,)), ((1, 2), (4, 4, 1), (32,))]
    assert groups[1] == [((2,), (32,), (16,))]
    assert groups[2] == [((0,), (6,), (2,)), ((2,), (16,), (2,)), ((1,), (32,), (2,))]
    # Every stage runs at its own shapes: nothing is padded.
    assert layout.padding_waste() == pytest.approx(1.0)


def test_split_groups_gradient_equals_that_of_plain_slices():
    x = jax.random.normal(jax.random.key(0), (5, 6, 7))
    groups = ((((0, 2), (3, 4)), (4, 5)), (((2, 3),), (6, 3)))  # learner 4 in no group
    weights = [jax.random.normal(jax.random.key(1), (3, 4, 5)),
               jax.random.normal(jax.random.key(2), (1, 6, 3))]

    def plain(x):
        parts = [jnp.concatenate([x[0:2, :4, :5], x[3:4, :4, :5]]), x[2:3, :6, :3]]
        return sum(jnp.sum(w * jnp.sin(p)) for w, p in zip(weights, parts))

    def grouped(x):
        return sum(jnp.sum(w * jnp.sin(p)) for w, p in zip(weights, split_groups(x, groups)))

    np.testing.assert_allclose(grouped(x), plain(x), rtol=1e-6)
    g = jax.grad(grouped)(x)
    np.testing.assert_allclose(g, jax.grad(plain)(x), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(g[4]) == 0.0) and np.all(np.asarray(g[0, 4:]) == 0.0)
