"""Datasets by name and the test / cloud / edge split (docs/design.md §1)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from baim_jax.evaluation import data

TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
EDGE_TASKS = [0, 0, 0, 1, 1, 1]
SHARES = [1.0, 2.0, 1.0, 1.0, 1.0, 3.0]


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("embedded", size=3000, seed=0)


def _split(digits, seed=0, alpha=None):
    return data.edge_cloud_split(*digits, TASKS, EDGE_TASKS, SHARES, test_size=500,
                              cloud_fraction=0.2, seed=seed, alpha=alpha)


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_split_is_deterministic_and_never_reuses_an_image(digits, alpha):
    a, b = _split(digits, alpha=alpha), _split(digits, alpha=alpha)
    assert a.indices == b.indices
    assert _split(digits, seed=1, alpha=alpha).indices != a.indices
    parts = [a.indices["test"], a.indices["cloud"], *a.indices["edges"]]
    together = np.concatenate(parts)
    assert len(together) == len(set(together.tolist())) == 3000  # every image exactly once
    assert len(a.test.images) == 500 and len(a.cloud.images) == 500  # 20% of the other 2,500
    for e, shard in enumerate(a.edges):  # an edge only holds its task's classes
        assert set(np.unique(shard.labels)) <= set(TASKS[EDGE_TASKS[e]])
        assert (shard.tasks == EDGE_TASKS[e]).all()


def test_iid_shard_sizes_follow_the_shares(digits):
    sizes = [len(s.images) for s in _split(digits).edges]
    # Task 0 has shares 1:2:1 of its ~1,000 edge images, task 1 shares 1:1:3.
    assert sizes[1] == pytest.approx(2 * sizes[0], rel=0.05)
    assert sizes[5] == pytest.approx(3 * sizes[3], rel=0.05)


def _skew(partition) -> float:
    """Mean total-variation distance between an edge's class mix and its task's."""
    out = []
    for e, shard in enumerate(partition.edges):
        classes = TASKS[EDGE_TASKS[e]]
        mine = np.array([np.sum(shard.labels == c) for c in classes], float)
        pool = np.concatenate([s.labels for k, s in enumerate(partition.edges)
                               if EDGE_TASKS[k] == EDGE_TASKS[e]])
        whole = np.array([np.sum(pool == c) for c in classes], float)
        out.append(0.5 * np.abs(mine / mine.sum() - whole / whole.sum()).sum())
    return float(np.mean(out))


def test_dirichlet_skew_shrinks_as_alpha_grows(digits):
    skews = {alpha: _skew(_split(digits, alpha=alpha)) for alpha in (None, 0.1, 1.0, 100.0)}
    # Measured: strong skew at alpha = 0.1, mild at 100, and IID about none.
    assert skews[0.1] > skews[1.0] > skews[100.0]
    assert skews[0.1] > 0.3 and skews[100.0] < 0.1 and skews[None] < 0.05


def test_split_refuses_what_it_cannot_do(digits):
    with pytest.raises(ValueError, match=r"edges\[0\]"):  # a share too small to get an image
        data.edge_cloud_split(*digits, TASKS, EDGE_TASKS, [1e-9, 1, 1, 1, 1, 1], test_size=500,
                           cloud_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match="task 1 has no edge"):
        data.edge_cloud_split(*digits, TASKS, [0, 0], [1, 1], test_size=500, cloud_fraction=0.2,
                           seed=0)
    with pytest.raises(ValueError, match="test_size"):
        data.edge_cloud_split(*digits, TASKS, EDGE_TASKS, SHARES, test_size=3000,
                           cloud_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        _split(digits, alpha=0.0)


def test_embedded_subset_is_deterministic_and_read_only():
    x1, y1 = data.load_dataset("embedded", size=100, seed=3)
    x2, y2 = data.load_dataset("embedded", size=100, seed=3)
    np.testing.assert_array_equal(x1, x2)
    assert x1.shape == (100, 28, 28, 1) and x1.dtype == np.float32 and y1.dtype == np.int32
    assert 0.0 <= x1.min() and x1.max() <= 1.0
    assert not data.embedded_digits()[0].flags.writeable


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist", "emnist"])
def test_tfds_datasets_through_data_source(name):
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        x, y = data.load_dataset(name, size=25, seed=0)
        again, _ = data.load_dataset(name, size=25, seed=0)
    assert x.shape == (25, 28, 28, 1) and x.dtype == np.float32 and y.shape == (25,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x, again)


def test_celeb_a_is_cropped_resized_and_labelled_by_an_attribute():
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        x, y = data.load_dataset("celeb_a", size=10, seed=0, image_size=16, label="Smiling")
        with pytest.raises(ValueError, match="data.label"):
            data.load_dataset("celeb_a", size=10, seed=0, label="Wings")
    assert x.shape == (10, 16, 16, 3) and set(np.unique(y)) <= {0, 1}


def test_resize_averages_blocks():
    # A 4x6 image: the centre 4x4 crop, averaged over 2x2 blocks.
    img = np.arange(24, dtype=np.float32).reshape(1, 4, 6, 1)
    crop = img[0, :, 1:5, 0]
    expected = crop.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(data._resize(img, 2)[0, :, :, 0], expected)


def test_named_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        data.load_dataset("imagenet", size=10, seed=0)
    with pytest.raises(ValueError, match="not prepared.*tfds build mnist"):
        data.load_dataset("mnist", size=10, seed=0, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data.size"):
        data.load_dataset("embedded", size=6000, seed=0)


def test_a_partial_preparation_is_one_error_and_no_warning(tmp_path, caplog):
    # A version folder without its dataset_info.json (an interrupted copy): TFDS logs a
    # warning through absl before failing; the user sees only our one line.
    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
    with pytest.raises(ValueError, match="not prepared.*tfds build mnist"):
        data.load_dataset("mnist", size=10, seed=0, data_dir=str(tmp_path))
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []
