"""Datasets by name and the test / cloud / edge split (docs/design.md §1)."""

import re

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


# ------------------------------------------------------------------ the user's own images


def _write_folder(root, sizes=((20, 12), (9, 9)), per_class=4):
    """``root/cat`` and ``root/dog``: PNG and JPEG files of various sizes, grayscale."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("dog", "cat")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            pixels = (rng.random((h, w)) * 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_a_folder_of_images_loads_with_labels_from_its_sub_folders(tmp_path):
    _write_folder(tmp_path / "imgs")
    images, labels = data.load_dataset(f"folder:{tmp_path / 'imgs'}", size=8, seed=0,
                                       image_size=8)
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    # Sub-folder names that are not integers label by sorted order: cat 0, dog 1.
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4
    again = data.load_dataset(f"folder:{tmp_path / 'imgs'}", size=5, seed=3, image_size=4)
    assert again[0].shape == (5, 4, 4, 1)
    # A PNG of a constant value resizes to that value (the box filter averages).
    from PIL import Image

    (tmp_path / "flat" / "7").mkdir(parents=True)
    Image.fromarray(np.full((12, 16), 51, np.uint8), "L").save(tmp_path / "flat" / "7" / "a.png")
    flat, lab = data.load_dataset(f"folder:{tmp_path / 'flat'}", size=1, seed=0, image_size=4)
    np.testing.assert_allclose(flat, 0.2, atol=1e-6)
    assert lab.tolist() == [7]  # integer sub-folder names are the labels themselves


def test_an_npz_of_images_loads_and_resizes(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16), np.uint8)
    labels = np.arange(10) % 3
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    got, lab = data.load_dataset(f"npz:{tmp_path / 'a.npz'}", size=10, seed=0, image_size=8)
    assert got.shape == (10, 8, 8, 1) and lab.dtype == np.int32
    np.testing.assert_array_equal(np.sort(lab), np.sort(labels))
    # Area averaging: each output pixel is the mean of a 2x2 block.
    full, _ = data.load_dataset(f"npz:{tmp_path / 'a.npz'}", size=10, seed=0, image_size=16)
    np.testing.assert_allclose(got[..., 0], full[..., 0].reshape(10, 8, 2, 8, 2).mean((2, 4)),
                               atol=1e-6)
    np.savez(tmp_path / "f.npz", images=np.full((3, 8, 8, 3), 0.5, np.float32),
             labels=np.zeros(3, np.int64))
    got, _ = data.load_dataset(f"npz:{tmp_path / 'f.npz'}", size=2, seed=0, image_size=8)
    assert got.shape == (2, 8, 8, 3)


def _bad_npz(tmp_path, **arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    return f"npz:{tmp_path / 'bad.npz'}"


@pytest.mark.parametrize("case,words", [
    ("no folder", "is not a directory"), ("empty class", "holds no PNG or JPEG"),
    ("broken image", "not a readable image"), ("too many", "data.size: 99 is more than"),
    ("no path", "names no path"), ("no npz", "no such file"),
    ("not an npz", "not a readable .npz"), ("no labels", "lacks the array(s) ['labels']"),
    ("bad shape", "expected [n, H, W] or [n, H, W, 1 or 3]"),
    ("float labels", "expected [4] integers >= 0"), ("out of range", "finite and in [0, 1]"),
    ("too small", "data.image_size: 8 is larger than")])
def test_bad_own_images_are_one_error_naming_the_problem(case, words, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    if case in ("empty class", "broken image", "too many"):
        _write_folder(root)
    if case == "empty class":
        (root / "bird").mkdir()
    if case == "broken image":
        (root / "cat" / "9.png").write_bytes(b"not a png")
        Image.new("L", (4, 4)).save(root / "cat" / "0.png")
    name = {"no folder": f"folder:{tmp_path / 'none'}", "empty class": f"folder:{root}",
            "broken image": f"folder:{root}", "too many": f"folder:{root}", "no path": "npz:",
            "no npz": f"npz:{tmp_path / 'none.npz'}"}.get(case)
    if case == "not an npz":
        (tmp_path / "x.npz").write_text("hello")
        name = f"npz:{tmp_path / 'x.npz'}"
    four = np.zeros((4, 8, 8), np.uint8)
    name = name or _bad_npz(tmp_path, **{
        "no labels": dict(images=four),
        "bad shape": dict(images=np.zeros((4, 8, 8, 2), np.uint8), labels=np.zeros(4, int)),
        "float labels": dict(images=four, labels=np.zeros(4)),
        "out of range": dict(images=np.full((4, 8, 8), 2.0, np.float32), labels=np.zeros(4, int)),
        "too small": dict(images=np.zeros((4, 4, 4), np.uint8), labels=np.zeros(4, int)),
    }[case])
    size = {"too many": 99, "broken image": 10}.get(case, 4)  # 10: every file of the folder
    with pytest.raises(ValueError, match=re.escape(words)) as err:
        data.load_dataset(name, size=size, seed=0, image_size=8)
    assert "\n" not in str(err.value)


def test_a_pipeline_config_on_a_folder_of_images_validates_and_splits(tmp_path):
    """``data.dataset = "folder:PATH"`` with the smoke config: ten classes of 8x8 images, the
    same split rules as the built-in sources (every image once, tasks by class)."""
    from conftest import SMOKE
    from PIL import Image

    from baim_jax.cli import load_config
    from baim_jax.framework import plan as plan_lib

    rng = np.random.default_rng(1)
    for c in range(10):
        (tmp_path / "digits" / str(c)).mkdir(parents=True)
        for i in range(24):
            Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), "L").save(
                tmp_path / "digits" / str(c) / f"{i}.png")
    config = load_config(SMOKE, [f"--config.data.dataset=folder:{tmp_path / 'digits'}",
                                 "--config.data.size=240", "--config.data.test_size=40",
                                 "--config.data.image_size=8"])
    for section in ("edge", "cloud", "personalize", "fl"):
        config[section].batch_size = 16
    plan = plan_lib.validate(config)
    assert plan.specs[0].image_shape == (8, 8, 1)
    parts = [plan.data.indices["test"], plan.data.indices["cloud"], *plan.data.indices["edges"]]
    assert len(np.concatenate(parts)) == len(set(np.concatenate(parts).tolist())) == 240
    for e, shard in enumerate(plan.data.edges):
        assert set(np.unique(shard.labels)) <= set(config.task_classes[plan.edge_tasks[e]])
