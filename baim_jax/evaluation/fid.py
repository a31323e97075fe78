"""Frechet distance between feature statistics of two image sets (docs/design.md §6).

``FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1^(1/2) S_2 S_1^(1/2))^(1/2))``. The trace term is
computed from symmetric positive semi-definite matrices only (two eigendecompositions in
float64, negative round-off eigenvalues clipped), which stays real and stable where a general
matrix square root of the non-symmetric ``S_1 S_2`` can turn complex. The features come from a
pluggable extractor (``features.py``: by default a small CNN trained on the dataset's real
images, so the scale is not Inception-FID's).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

Extractor = Callable[[np.ndarray], np.ndarray]


class Statistics(NamedTuple):
    """Mean ``[d]`` and covariance ``[d, d]`` of a feature set, and its size."""

    mean: np.ndarray
    cov: np.ndarray
    count: int


def statistics(features: np.ndarray) -> Statistics:
    """Feature statistics of ``features [n, d]`` (n >= 2), in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features: need [n >= 2, d], got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features: non-finite values")
    return Statistics(f.mean(axis=0), np.cov(f, rowvar=False), len(f))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """The Frechet distance between two Gaussians given by their statistics."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"statistics: feature sizes differ ({a.mean.shape} vs {b.mean.shape})")
    root_a = _psd_sqrt(a.cov)
    middle = np.linalg.eigvalsh(root_a @ b.cov @ root_a)
    trace = np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.sum(np.sqrt(np.clip(middle, 0, None)))
    return float(np.sum((a.mean - b.mean) ** 2) + max(trace, 0.0))


def fid(real: np.ndarray, generated: np.ndarray, extractor: Extractor) -> float:
    """FID of ``generated`` against ``real`` images ``[n, H, W, C]`` in the extractor's space."""
    return frechet_distance(statistics(extractor(real)), statistics(extractor(generated)))
