"""The default FID feature network: it learns the digits, caches per dataset, and its FID
orders blur and noise as expected."""

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from baim_jax.evaluation import data as data_lib
from baim_jax.evaluation import features as feat
from baim_jax.evaluation import fid


@pytest.fixture(scope="module")
def digits():
    x, y = data_lib.embedded_digits()
    order = np.random.default_rng(0).permutation(len(x))  # the file is ordered by class
    x, y = np.asarray(x[order]), np.asarray(y[order])
    return {"train": (x[:2000], y[:2000]), "test": (x[2000:2600], y[2000:2600]),
            "real": x[2600:3100], "other": x[3100:3600]}


@pytest.fixture(scope="module")
def cached(digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("features")
    net, record = feat.load_or_train(cache, "digits", *digits["train"], *digits["test"],
                                     num_classes=10, epochs=2)
    return cache, net, record


def test_learns_the_digits_and_records_its_accuracy(cached):
    cache, _, record = cached
    assert record["test_accuracy"] > 0.85  # 2 epochs on 2,000 digits
    assert json.loads((cache / "digits" / "feature_net.json").read_text()) == record
    assert "not Inception" in record["name"]


def test_cache_reloads_the_same_network(cached, digits):
    cache, net, record = cached
    again, record_again = feat.load_or_train(cache, "digits", *digits["train"], *digits["test"],
                                             num_classes=10, epochs=2)
    assert record_again == record
    x = digits["real"][:50]
    np.testing.assert_array_equal(feat.extractor(again)(x), feat.extractor(net)(x))


def test_fid_in_feature_space_orders_blur_and_noise(cached, digits):
    _, net, _ = cached
    extract = feat.extractor(net)
    real, other = digits["real"], digits["other"]
    floor = fid.fid(real, other, extract)
    assert fid.fid(real, real, extract) == pytest.approx(0.0, abs=1e-6)
    blurred = [fid.fid(real, gaussian_filter(other, sigma=(0, s, s, 0)), extract)
               for s in (0.5, 1.0, 2.0)]
    rng = np.random.default_rng(0)
    noised = [fid.fid(real, np.clip(other + s * rng.standard_normal(other.shape), 0, 1)
                    .astype(np.float32), extract) for s in (0.1, 0.3, 0.6)]
    assert floor < blurred[0] < blurred[1] < blurred[2]
    assert floor < noised[0] < noised[1] < noised[2]
