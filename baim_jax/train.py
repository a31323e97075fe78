"""The main job: ``train_and_evaluate(config, workdir)`` runs the edge-cloud pipeline
(``framework.pipeline``) and writes the readable report beside ``results.json``."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from baim_jax.evaluation import report
from baim_jax.framework import pipeline


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       progress: bool = True) -> dict:
    """Runs, or resumes, the whole pipeline in ``workdir``; returns the results."""
    results = pipeline.run(config, workdir, progress=progress)
    report.write_pipeline_report(results, Path(workdir))
    return results


__all__ = ["train_and_evaluate"]
