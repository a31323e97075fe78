"""Readable output of a run: PNG figures and ``report.md`` beside ``results.json``."""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """Tiles ``[n, H, W, C]`` images into one ``[rows*H, cols*W]`` array (C = 1) or
    ``[rows*H, cols*W, C]`` (colour), with 1-pixel gaps."""
    n, h, w, ch = images.shape
    rows = -(-n // cols)
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, ch), np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = images[i]
    return grid[..., 0] if ch == 1 else grid


def save_grid(images: np.ndarray, path: Path, cols: int = 8, title: str | None = None) -> None:
    fig, ax = plt.subplots(figsize=(cols * 0.6, -(-len(images) // cols) * 0.6 + 0.4))
    ax.imshow(image_grid(np.asarray(images), cols), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


APPROACHES = ("finetune", "freeze", "scratch", "fl", "central")


def _points(curve: list) -> tuple[list, list]:
    """The measured epochs (1-based) of a curve and their values (None: not measured)."""
    kept = [(e + 1, v) for e, v in enumerate(curve) if v is not None]
    return [e for e, _ in kept], [v for _, v in kept]


def _plot_curves(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, row in results["approaches"].items():
        ax.plot(*_points(row["test_loss_curve"]), marker="o", label=name)
    ax.set_xlabel("epoch (cloud, central) or round (FedAvg)")
    ax.set_ylabel("test loss: negative bound (nats / image)")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_edges(results: dict, path: Path) -> None:
    """Every edge's test loss and importance-weighted NLL before and after personalisation,
    beside the approaches' NLL (horizontal lines)."""
    edges = results["edges"]
    x = np.arange(len(edges))
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(4, 0.6 * len(edges) + 2), 3.2))
    for ax, key, label in zip(axes, ("test_loss", "test_nll"),
                              ("test loss: negative bound", "test NLL (importance-weighted)")):
        ax.bar(x - 0.2, [e[f"{key}_initial"] for e in edges], 0.4, label="edge model")
        ax.bar(x + 0.2, [e[f"{key}_personalized"] for e in edges], 0.4, label="personalised")
        if key == "test_nll":
            for i, (name, row) in enumerate(results["approaches"].items()):
                ax.axhline(row["test_nll"], color=f"C{i + 2}", ls="--", lw=1, label=name)
        ax.set_xticks(x, [e["id"] for e in edges], rotation=45, fontsize=7)
        ax.set_ylabel(f"{label} (nats / image)", fontsize=8)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_fid(results: dict, path: Path) -> None:
    """FID of the approaches per epoch (lines) and of every edge before and after
    personalisation (points), as the paper's Fig. 5d."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, row in results["approaches"].items():
        left.plot(*_points(row["fid_curve"]), marker="o", label=name)
    left.axhline(results["fid_floor"], color="gray", ls=":", label="real vs real")
    left.set_xlabel("epoch (cloud, central) or round (FedAvg)")
    left.set_ylabel("FID (small-CNN features)")
    left.legend(fontsize=7)
    edges = results["edges"]
    x = np.arange(len(edges))
    right.scatter(x, [e["fid_initial"] for e in edges], label="edge model")
    right.scatter(x, [e["fid_personalized"] for e in edges], marker="s", label="personalised")
    right.set_xticks(x, [e["id"] for e in edges], rotation=45, fontsize=7)
    right.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


GRID_ROWS = 8  # samples per grid row


def _phase_grids(results: dict, workdir: Path) -> list[str]:
    """Samples of the three phases: every edge model, each strategy's BAIM per task, every
    personalised task model (8 per row).

    A row is the first 8 of as many samples as the task's FID drew, at least 8 (a draw's row
    i does not depend on how many rows are drawn, ``baim.sample_rows``): the images a draw of
    8 gives, from the sampler the FID has already compiled.
    """
    from baim_jax import checkpoint

    key = jax.random.key(0)
    drawn = results["data"]["test_per_task"]

    def row(model, task: str) -> np.ndarray:
        return np.asarray(model.sample(max(drawn[task], GRID_ROWS), task=task, rng=key)[
            :GRID_ROWS])

    rows = {"edges_initial": [], "cloud": [], "edges_personalized": []}
    for e in results["edges"]:
        for phase, sub in (("edges_initial", "initial"), ("edges_personalized", "personalized")):
            model = checkpoint.load(Path(e["path"]) / sub)
            rows[phase].append(row(model, e["task"]))
    for strategy in [a for a in APPROACHES if a not in ("fl", "central")
                     and a in results["approaches"]]:
        model = checkpoint.load(workdir / "baim" / strategy)
        for task in model.tasks:
            rows["cloud"].append(row(model, task))
    titles = {"edges_initial": "edge models (one row per edge)",
              "cloud": "cloud BAIM: one row per strategy and task",
              "edges_personalized": "personalised task models (one row per edge)"}
    names = []
    for phase, images in rows.items():
        save_grid(np.concatenate(images), workdir / f"samples_{phase}.png", title=titles[phase])
        names.append(f"samples_{phase}.png")
    return names


def _fmt(v) -> str:
    if isinstance(v, list):
        return " to ".join(_fmt(x) for x in v) if v[0] != v[1] else _fmt(v[0])
    if isinstance(v, float):
        return f"{v:.3g}"
    return f"{v:,}"


def write_pipeline_report(results: dict, workdir: Path) -> None:
    """``report.md`` with the cost table (paper Fig. 5b), test-loss curves (Fig. 5c), FID of
    the approaches and the edges (Fig. 5d), the edges before and after personalisation, the
    toolkit, the paper's claims (``claims.check``), and sample grids of the three phases."""
    _plot_curves(results, workdir / "test_loss_curves.png")
    _plot_edges(results, workdir / "personalization.png")
    _plot_fid(results, workdir / "fid.png")
    figures = (["test_loss_curves.png", "fid.png", "personalization.png"]
               + _phase_grids(results, workdir))
    keys = [("test loss (nats/image)", "test_loss"),
            ("test NLL, importance-weighted (nats/image)", "test_nll"),
            ("test NLL over central's", "test_nll_over_central"), ("FID", "fid"),
            ("trainable params, cloud", "cloud_trainable_params"),
            ("params per edge", "edge_params"),
            ("upload bytes per edge", "upload_bytes_per_edge"), ("uploads", "upload_times"),
            ("download bytes per edge", "download_bytes_per_edge"),
            ("downloads", "download_times"),
            ("cloud FLOPs per epoch", "cloud_flops_per_epoch"),
            ("edge FLOPs per epoch", "edge_flops_per_epoch"), ("wall time (s)", "wall_seconds")]
    names = [a for a in APPROACHES if a in results["approaches"]]
    lines = ["# Edge-cloud run", "",
             f"Data: {results['data']['dataset']}: {results['data']['test']} test images, "
             f"{results['data']['cloud']} at the cloud, edges {results['data']['edges']}.", "",
             "## Cost and quality per approach (paper Fig. 5b)", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in keys:
        lines.append(f"| {label} | " + " | ".join(_fmt(results["approaches"][a][key])
                                                  for a in names) + " |")
    net = results["fid_feature_net"]
    lines += ["", "Test loss: the negative bound of the model (every latent a decoder consumes "
              "pays its KL; the gate pays KL(w || pi)), in parts:", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for part in ("rec", "kl", "gate_kl"):
        lines.append(f"| {part} | " + " | ".join(
            f"{results['approaches'][a]['test_loss_parts'][part]:.2f}" for a in names) + " |")
    lines += ["", "Test NLL: importance-weighted, k = 64 posterior draws for every learner of the "
              "task's squad; one estimator for every model kind, so it compares across them.", "",
              "Bytes are float32 payloads; FLOPs are XLA's cost analysis of the compiled "
              "training step times the steps of an epoch.", "",
              f"FID is measured with a {net['name']} trained on this run's real training "
              f"images (test accuracy {net['test_accuracy']:.3f}): its scale is not "
              f"Inception-FID's. Reference: the grayscale real test images; samples are mean "
              f"images. Real held-out against real training images scores "
              f"{results['fid_floor']:.2f} (the floor).", "",
              "## Edges before and after personalisation", "",
              "| edge | task | params | data (trained on) | epochs (best) | "
              "test loss: edge -> personalised | "
              "test NLL: edge -> personalised | FID: edge -> personalised |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {e['id']} | {e['task']} | {e['params']:,} | {e['data_size']} "
              f"({e['train_size']}) | {e['epochs']} ({e['best_epoch']}) | "
              f"{e['test_loss_initial']:.2f} -> {e['test_loss_personalized']:.2f} | "
              f"{e['test_nll_initial']:.2f} -> {e['test_nll_personalized']:.2f} | "
              f"{e['fid_initial']:.1f} -> {e['fid_personalized']:.1f} |"
              for e in results["edges"]]
    lines += ["", "Per class (with non-IID shards one rare class can dominate a task's score): "
              "test NLL of each class of the edge's task, edge model -> personalised.", "",
              "| edge | per class: initial -> personalised |", "|---|---|"]
    lines += [f"| {e['id']} | " + ", ".join(
        f"{c}: {v:.0f} -> {e['test_nll_personalized_per_class'][c]:.0f}"
        for c, v in e["test_nll_initial_per_class"].items()) + " |" for e in results["edges"]]
    lines += ["", "## Toolkit", "", "| task | learners | feeders | params | bytes | connections |"
              " test loss | test NLL |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['learners']} | {v['feeders']} | {v['params']:,} | {v['bytes']:,} | "
              f"{v['connections_kept']} | {v['test_loss']:.2f} | {v['test_nll']:.2f} |"
              for k, v in results["toolkit"].items()]
    if results.get("claims"):
        lines += ["", "## The paper's claims", "", "| claim | held? | the figures |",
                  "|---|---|---|"]
        lines += [f"| {c['claim']} | {c['held']} | {c['figures']} |" for c in results["claims"]]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
