"""How fast does an edge serve a stream of requests when its toolbox cannot hold the toolkit?

A stream of ``--requests`` sampling requests (``--num`` images each) over every task of a
store, task popularity Zipf(``--zipf``) (0: uniform), goes to one edge whose toolbox holds
``--capacity`` of the toolkit's bytes (default half). Every task is served once beforehand with
no toolbox, so that compilation is not in the figures; the toolbox then starts empty.

Without ``--store``, a store is made of a synthetic toolkit: ``--tasks`` squads of the case
study's five MLP learner sizes (the first ``--learners`` of them) on 28x28 images, K = 2,
h = 1, half of the potential connections kept as in the case study (rho = 0.5; random
weights: serving cost does not depend on training). With ``--store STORE`` (made by
``baim-jax export``), its models are used.

Prints one JSON object: ``requests_per_second``, ``hit_ratio``, ``bytes_downloaded``,
``latency_seconds`` (p50 and p99 for hits and for misses), the toolkit and toolbox sizes, the
request mix, and the 1-minute load average at start and end.

    python benchmarks/serve.py [--store STORE] [--requests 100] [--capacity 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import baim_jax
from baim_jax import BAIM, BAIMConfig, LearnerSpec, partition
from baim_jax.core.router import TaskRouter
from baim_jax.service.edge import Edge, Request
from baim_jax.service.store import ROUTER, ModelStore
from baim_jax.service.toolbox import Toolbox

WIDTHS = [((32,), 8, (32,)), ((64,), 8, (64,)), ((128,), 16, (128,)),
          ((256, 64), 16, (64, 256)), ((512, 256), 32, (256, 512))]


def synthetic_store(root: Path, tasks: int, learners: int, seed: int) -> ModelStore:
    """A store of ``tasks`` task models cut from one random BAIM, each squad of the first
    ``learners`` sizes of ``WIDTHS``."""
    widths = WIDTHS[:learners]
    specs = [LearnerSpec("mlp", (28, 28, 1), enc, lat, dec) for _ in range(tasks)
             for enc, lat, dec in widths]
    squads = [t for t in range(tasks) for _ in widths]
    names = [f"task{t}" for t in range(tasks)]
    baim = BAIM.assemble(specs, squads, names, BAIMConfig(k=2, h=1), seed=seed)
    rng = np.random.default_rng(seed)
    for var in baim.connections:
        var[...] = 0.01 * rng.standard_normal(var[...].shape).astype(np.float32)
    baim.prune_connections(0.5)
    sources = {ROUTER: root / "toolkit" / "router"}
    baim_jax.save(TaskRouter.from_baim(baim), sources[ROUTER])
    for name in names:
        sources[name] = root / "toolkit" / name
        baim_jax.save(partition(baim, name), sources[name])
    store = ModelStore(root / "store", create=True)
    store.publish(sources)
    return store


def percentiles(rows: list[dict]) -> dict:
    """p50 and p99 of the total latency, and the p50 of its fetch and compute parts."""
    if not rows:
        return {"count": 0}
    total = [r["total"] for r in rows]
    return {"count": len(rows), "p50": float(np.percentile(total, 50)),
            "p99": float(np.percentile(total, 99)),
            "fetch_p50": float(np.median([r["fetch"] for r in rows])),
            "compute_p50": float(np.median([r["compute"] for r in rows]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a store made by baim-jax export (default: synthetic)")
    parser.add_argument("--tasks", type=int, default=4, help="tasks of the synthetic store")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--num", type=int, default=16, help="images per request")
    parser.add_argument("--capacity", type=float, default=0.5,
                        help="toolbox capacity as a fraction of the toolkit's bytes")
    parser.add_argument("--zipf", type=float, default=1.0,
                        help="task popularity exponent (0: uniform)")
    parser.add_argument("--learners", type=int, default=len(WIDTHS),
                        help="learners per squad of the synthetic store: the first of the "
                             f"case study's {len(WIDTHS)} sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.requests < 1 or args.num < 1 or not 0 < args.capacity < 1 or args.tasks < 2
            or not 2 <= args.learners <= len(WIDTHS)):
        parser.error("--requests, --num >= 1; 0 < --capacity < 1; --tasks >= 2; "
                     f"2 <= --learners <= {len(WIDTHS)}")
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="baim_serve_") as tmp:
        tmp = Path(tmp)
        store = (ModelStore(args.store) if args.store
                 else synthetic_store(tmp, args.tasks, args.learners, args.seed))
        tasks = store.tasks()
        toolkit = sum(store.entry(t)["bytes"] for t in tasks)
        capacity = int(args.capacity * toolkit)
        for task in tasks:  # warm-up: compile every task model's sampler
            Edge(store).serve(Request(task=task, num=args.num))
        popularity = 1.0 / np.arange(1, len(tasks) + 1) ** args.zipf
        rng = np.random.default_rng(args.seed)
        stream = rng.choice(len(tasks), size=args.requests, p=popularity / popularity.sum())
        edge = Edge(store, Toolbox(tmp / "toolbox", capacity=capacity))
        latency = {"hit": [], "miss": []}
        downloaded = 0
        start = time.perf_counter()
        for i, t in enumerate(stream):
            got = edge.serve(Request(task=tasks[t], num=args.num, seed=i))
            jax.block_until_ready(got.images)
            kind = "hit" if got.sources[tasks[t]] == "toolbox" else "miss"
            latency[kind].append(got.seconds)
            downloaded += got.bytes_downloaded
        wall = time.perf_counter() - start
    print(json.dumps({
        "requests": args.requests, "images_per_request": args.num,
        "requests_per_second": args.requests / wall,
        "hit_ratio": len(latency["hit"]) / args.requests,
        "bytes_downloaded": downloaded,
        "latency_seconds": {k: percentiles(v) for k, v in latency.items()},
        "tasks": len(tasks), "zipf": args.zipf,
        "requests_per_task": np.bincount(stream, minlength=len(tasks)).tolist(),
        "toolkit_bytes": toolkit, "toolbox_capacity_bytes": capacity,
        "store": args.store or "synthetic",
        "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
        "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]},
    }, indent=1))


if __name__ == "__main__":
    main()
