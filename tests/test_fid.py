"""Frechet distance (docs/design.md §6): zero for a set against itself, growing with blur and
noise, equal to a scipy reference on Gaussian data."""

import numpy as np
import pytest
import scipy.linalg
from scipy.ndimage import gaussian_filter

from baim_jax.evaluation import data as data_lib
from baim_jax.evaluation import fid


def _scipy_reference(a: fid.Statistics, b: fid.Statistics) -> float:
    """The textbook formula with scipy's general matrix square root of S_a S_b."""
    root = scipy.linalg.sqrtm(a.cov @ b.cov).real
    return float(np.sum((a.mean - b.mean) ** 2) + np.trace(a.cov + b.cov - 2 * root))


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_agrees_with_scipy_on_gaussian_data(dim):
    rng = np.random.default_rng(dim)
    mix_a, mix_b = rng.standard_normal((2, dim, dim))
    a = rng.standard_normal((4000, dim)) @ mix_a + 1.0
    b = rng.standard_normal((4000, dim)) @ mix_b - 0.5
    sa, sb = fid.statistics(a), fid.statistics(b)
    assert fid.frechet_distance(sa, sb) == pytest.approx(_scipy_reference(sa, sb), rel=1e-6)


def test_closed_form_for_isotropic_gaussians():
    # N(m1, s1^2 I) vs N(m2, s2^2 I) in d dims: |m1 - m2|^2 + d (s1 - s2)^2.
    d = 3
    a = fid.Statistics(np.zeros(d), 4.0 * np.eye(d), 10)
    b = fid.Statistics(np.ones(d), 1.0 * np.eye(d), 10)
    assert fid.frechet_distance(a, b) == pytest.approx(3 * 1.0 + 3 * (2.0 - 1.0) ** 2)


def test_symmetric_and_zero_for_a_set_against_itself():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 500, 8))
    sa, sb = fid.statistics(a), fid.statistics(b)
    assert fid.frechet_distance(sa, sa) == pytest.approx(0.0, abs=1e-9)
    assert fid.frechet_distance(sa, sb) == pytest.approx(fid.frechet_distance(sb, sa), rel=1e-9)


def test_stays_real_for_singular_covariances():
    # Rank-2 sample covariances (3 samples in 50 dimensions): no complex or negative result.
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 3, 50))
    value = fid.frechet_distance(fid.statistics(a), fid.statistics(b))
    assert np.isfinite(value) and value >= 0
    # Rank-1 covariances along one unit direction u, std 2 and 1, means 0 and m:
    # |m|^2 + (2 - 1)^2 (the rest of the 50 dimensions carry nothing).
    u = rng.standard_normal(50)
    u /= np.linalg.norm(u)
    m = rng.standard_normal(50)
    sa = fid.Statistics(np.zeros(50), 4.0 * np.outer(u, u), 10)
    sb = fid.Statistics(m, np.outer(u, u), 10)
    assert fid.frechet_distance(sa, sb) == pytest.approx(m @ m + 1.0, rel=1e-6)


def _pixel_projection(images: np.ndarray) -> np.ndarray:
    """A stand-in feature extractor: 4x4 average-pooled intensities and horizontal gradient
    magnitudes (98 features; blur lowers the gradients, noise raises both)."""
    x = images[..., 0]
    grad = np.abs(np.diff(x, axis=2, append=x[:, :, -1:]))
    pool = [v.reshape(len(v), 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(v), -1) for v in (x, grad)]
    return np.concatenate(pool, axis=1)


def test_grows_as_digits_are_blurred_or_noised():
    digits = data_lib.embedded_digits()[0]  # ordered by class: draw two random halves
    images = np.asarray(digits[np.random.default_rng(0).permutation(len(digits))[:1000]])
    real, other = images[:500], images[500:]
    floor = fid.fid(real, other, _pixel_projection)
    blurred = [fid.fid(real, gaussian_filter(other, sigma=(0, s, s, 0)), _pixel_projection)
               for s in (0.5, 1.0, 2.0)]
    rng = np.random.default_rng(0)
    noised = [fid.fid(real, np.clip(other + s * rng.standard_normal(other.shape), 0, 1),
                    _pixel_projection) for s in (0.1, 0.3, 0.6)]
    assert fid.fid(real, real, _pixel_projection) == pytest.approx(0.0, abs=1e-6)
    assert floor < blurred[0] < blurred[1] < blurred[2]
    assert floor < noised[0] < noised[1] < noised[2]


def test_refuses_bad_features():
    with pytest.raises(ValueError, match="features"):
        fid.statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        fid.statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="feature sizes"):
        fid.frechet_distance(fid.statistics(np.eye(3)), fid.statistics(np.eye(4)))
