"""Readable output of a run: PNG figures and ``report.md`` beside ``results.json``."""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """Tiles ``[n, H, W, 1]`` images into one ``[rows*H, cols*W]`` array (1-pixel gaps)."""
    n, h, w = images.shape[:3]
    rows = -(-n // cols)
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1), np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = images[i, ..., 0]
    return grid


def save_grid(images: np.ndarray, path: Path, cols: int = 8, title: str | None = None) -> None:
    fig, ax = plt.subplots(figsize=(cols * 0.6, -(-len(images) // cols) * 0.6 + 0.4))
    ax.imshow(image_grid(np.asarray(images), cols), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_demo_report(model, results: dict, test, workdir: Path) -> None:
    """Loss curves, samples and reconstructions per task, and ``report.md``."""
    curve = results["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["nelbo"] for c in curve], label="train (batch)")
    ax.plot(steps, [c["test_loss"] for c in curve], label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("negative ELBO (nats / image)")
    ax.legend()
    fig.savefig(workdir / "loss_curve.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    figures = ["loss_curve.png"]
    for t, name in enumerate(model.tasks):
        samples = model.sample(32, task=name, rng=jax.random.key(t))
        save_grid(np.asarray(samples), workdir / f"samples_{name}.png",
                  title=f"samples, task {name} (prior gate, mixture)")
        x = test.images[test.tasks == t][:16]
        rec = np.asarray(model.reconstruct(x, task=name)["mean"])
        save_grid(np.concatenate([x, rec]), workdir / f"reconstructions_{name}.png",
                  title=f"task {name}: inputs (top), reconstructions (bottom)")
        figures += [f"samples_{name}.png", f"reconstructions_{name}.png"]

    lines = [
        "# BAIM demo run", "",
        f"Data: {results['data']['source']}, {results['data']['train']} training and "
        f"{results['data']['test']} held-out test images.", "",
        "| measure | value |", "|---|---|",
        f"| test loss (negative ELBO, nats/image, posterior mean) | {results['test_loss']:.2f} |",
    ]
    lines += [f"| test loss, task {k} | {v:.2f} |"
              for k, v in results["test_loss_per_task"].items()]
    lines += [
        f"| TSGate accuracy | {results['task_accuracy']:.3f} |",
        f"| parameters (learners / gate / connections) | {results['params']['learners']:,} / "
        f"{results['params']['gate']:,} / {results['params']['connections']:,} |",
        f"| connections kept / potential | {results['connections']['kept']} / "
        f"{results['connections']['potential']} |",
        f"| padding waste (executed / useful FLOPs) | {results['padding_waste']:.2f} |",
        f"| training | {results['train_seconds']:.1f} s, "
        f"{results['steps_per_second']:.1f} steps/s |", "",
        "## Toolkit", "", "| task | learners | feeders | params | bytes | connections | test loss |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {v['learners']} | {v['feeders']} | {v['params']:,} | {v['bytes']:,} | "
              f"{v['connections_kept']} | {v['test_loss']:.2f} |"
              for k, v in results["toolkit"].items()]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
