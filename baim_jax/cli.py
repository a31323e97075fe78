"""Command line: ``baim-jax run|inspect``.

``baim-jax run --config configs/<name>.py --workdir DIR [--config.key=value ...]`` runs (or
resumes) the edge-cloud pipeline; ``baim-jax inspect PATH`` prints a saved model's spec. A bad
input gets one error line (no traceback) and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
from pathlib import Path

import ml_collections


class UsageError(ValueError):
    """A command-line input that cannot be used."""


def load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from a Python file and applies ``--config.key=value`` overrides.

    Values are parsed as Python literals (strings may be bare) and must keep the type of the
    value they replace (an int may replace a float; None may replace anything).
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(f"baim_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as e:  # a user's config file may raise anything
        raise UsageError(f"--config: {path} failed to load ({type(e).__name__}: {e})") from None
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise UsageError(f"unrecognised argument {item!r} (overrides look like "
                             f"--config.key=value)")
        key, raw = item[len("--config."):].split("=", 1)
        parent, leaf = config, key
        for part in key.split(".")[:-1]:
            if part not in parent or not isinstance(parent[part], ml_collections.ConfigDict):
                raise UsageError(f"--config.{key}: unknown config key {part!r}")
            parent = parent[part]
        leaf = key.split(".")[-1]
        if leaf not in parent:
            raise UsageError(f"--config.{key}: unknown config key")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        old = parent[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and old is not None and type(value) is not type(old) and not (
                isinstance(old, (list, tuple)) and isinstance(value, (list, tuple))):
            raise UsageError(f"--config.{key}: expected {type(old).__name__}, got "
                             f"{type(value).__name__} {raw!r}")
        with parent.unlocked():
            parent[leaf] = value
    return config


def _run(args, overrides) -> None:
    from baim_jax import train

    config = load_config(args.config, overrides)
    results = train.train_and_evaluate(config, args.workdir)
    for name, row in results["approaches"].items():
        print(f"{name:>8}: test loss {row['test_loss']:.2f} nats/image, "
              f"{row['wall_seconds']:.0f} s")
    print(f"wrote {args.workdir}/results.json, report.md, edges/, baim/, toolkit/ and fl/")


def _inspect(args, overrides) -> None:
    if overrides:
        raise UsageError(f"inspect: unexpected arguments {overrides}")
    from baim_jax import checkpoint

    spec = checkpoint.read_spec(args.path)
    if args.json:
        print(json.dumps(spec, indent=1))
        return
    size = sum(f.stat().st_size for f in Path(args.path).rglob("*") if f.is_file())
    gate = spec["config"]["gate"] if spec["config"] else "none"
    print(f"{spec['kind']} model, tasks {spec['tasks']}, K={spec['k']}, h={spec['h']}, "
          f"gate {gate}")
    for n, m in enumerate(spec["learners"]):
        s = m["spec"]
        role = f"task {m['task']}" if m["task"] is not None else f"feeder, keeps {m['keep']}"
        print(f"  learner {n}: {s['kind']} enc{s['encoder']} L={s['latent']} dec{s['decoder']}"
              f" ({role}): {m['params']:,} params")
    c, p = spec["connections"], spec["params"]
    print(f"  connections: {c['kept']} kept of {c['potential']}")
    print(f"  parameters: {p['total']:,} (learners {p['learners']:,}, gate {p['gate']:,}, "
          f"connections {p['connections']:,}); {size:,} bytes on disk")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baim-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run or resume the edge-cloud pipeline")
    run.add_argument("--config", required=True, help="a configs/*.py file")
    run.add_argument("--workdir", required=True, help="where results, models and checkpoints go")
    inspect = sub.add_parser("inspect", help="print a saved model's spec")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="the whole spec as JSON")
    args, overrides = parser.parse_known_args(argv)
    try:
        {"run": _run, "inspect": _inspect}[args.command](args, overrides)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"baim-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("baim-jax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
