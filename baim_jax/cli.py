"""Command line: ``baim-jax run|export|generate|inspect``.

``baim-jax run --config configs/<name>.py --workdir DIR [--config.key=value ...]`` runs (or
resumes) the edge-cloud pipeline; ``baim-jax export --workdir DIR --store STORE`` publishes its
toolkit to a model store; ``baim-jax generate --store STORE [--toolbox DIR] --task T --out
grid.png`` serves a request as an edge would; ``baim-jax inspect PATH`` prints a saved model's
spec or a store's contents. ``run`` and ``generate`` keep what XLA compiles in JAX's persistent
compilation cache (``--compilation_cache``) and, on a CPU, compile with LLVM at -O1
(``cpu_compile_flags``) and run with malloc asking for huge pages (``huge_page_environ``). A
bad input gets one error line (no traceback) and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

import ml_collections
import numpy as np

from baim_jax import faults


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
    if file.suffix != ".py":
        raise UsageError(f"--config: {path!r} is not a Python file (configs/*.py)")
    spec = importlib.util.spec_from_file_location(f"baim_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config()
    except (Exception, SystemExit) as e:  # a user's config file may raise anything
        raise UsageError(f"--config: {path} failed to load ({type(e).__name__}: {e})") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"--config: get_config() of {path} returned a "
                         f"{type(config).__name__}, not an ml_collections.ConfigDict")
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
                isinstance(old, (list, tuple)) and isinstance(value, (list, tuple))) and not (
                isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict)):
            raise UsageError(f"--config.{key}: expected {type(old).__name__}, got "
                             f"{type(value).__name__} {raw!r}")
        with parent.unlocked():
            parent[leaf] = value
    return config


def cache_dir(value: str | None, environ=os.environ) -> Path | None:
    """The directory of JAX's persistent compilation cache, made if missing, or None (off).

    ``value`` is ``--compilation_cache``: a directory, or ``none``. Without it: the directory
    in ``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/baim_jax/xla`` (by default
    ``~/.cache/baim_jax/xla``), or None when that cannot be made (a run never fails for want
    of its cache).
    """
    if value == "none":
        return None
    given = value is not None
    try:
        if not given:
            value = environ.get("JAX_COMPILATION_CACHE_DIR") or str(
                Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "baim_jax"
                / "xla")
        path = Path(value).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{value!r} is not writable")
    except (OSError, RuntimeError) as e:  # RuntimeError: no home directory
        if not given:
            return None
        raise UsageError(f"--compilation_cache: cannot use {value!r} as a directory "
                         f"({getattr(e, 'strerror', None) or e})") from None
    return path


def enable_compilation_cache(path: Path | None) -> None:
    """Points JAX's persistent compilation cache at ``path`` (before anything compiles): a
    resumed or repeated run, and every ``generate`` after the first, then loads its compiled
    steps instead of compiling them again. Compilations under 0.2 s and entries beyond 2 GiB
    (least recently used first) are not kept, unless JAX's own settings say otherwise."""
    if path is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", 2 << 30)


CPU_LLVM_LEVEL = "--xla_backend_optimization_level=1"


def accelerator_possible(environ=os.environ) -> bool:
    """Whether JAX may pick an accelerator: ``JAX_PLATFORMS`` names one, or, with it unset, a
    PJRT plugin (``jax_plugins``) or libtpu is installed. Asks nothing of JAX's backends."""
    platforms = {p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",")} - {""}
    if platforms:
        return bool(platforms - {"cpu"})
    return bool(importlib.metadata.entry_points(group="jax_plugins")) or any(
        importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def cpu_compile_flags(environ=os.environ) -> bool:
    """Has XLA:CPU's LLVM optimise at -O1 instead of -O3 (``XLA_FLAGS``): the case study then
    compiles for 40% less time and runs about as fast, its figures equal to the last bit
    (docs/benchmarks.md). Applied only where no accelerator may be picked and ``XLA_FLAGS``
    sets no level itself; XLA reads the flag when JAX starts its backend, so this comes
    before anything runs. Returns whether the flag was added."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags or accelerator_possible(environ):
        return False
    environ["XLA_FLAGS"] = f"{flags} {CPU_LLVM_LEVEL}".strip()
    return True


HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def _thp_mode() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``; ``""``
    where unknown)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text.partition("[")[2].partition("]")[0]


def _glibc_version() -> tuple[int, ...]:
    """glibc's version, ``()`` under another C library."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
        return tuple(int(v) for v in version.split(".")) if name == "glibc" else ()
    except (ValueError, OSError):
        return ()


def huge_page_environ(environ=os.environ, thp_mode: str | None = None,
                      glibc: tuple[int, ...] | None = None) -> dict | None:
    """The environment to run in so that glibc's malloc asks the kernel for transparent huge
    pages (``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1``), or None where it would change
    nothing or was set already.

    XLA:CPU allocates every step's buffers afresh and malloc hands the large ones back to the
    kernel, so each step faults its pages in again, 4 KB a fault; with huge pages the case
    study faults 20 times less and runs faster (docs/benchmarks.md). glibc reads its tunables
    when a process starts, so ``main`` starts the command again in this environment. Only
    where the kernel gives huge pages on request (mode ``madvise``), glibc is 2.35 or newer,
    and no accelerator may be picked.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    thp_mode = _thp_mode() if thp_mode is None else thp_mode
    glibc = _glibc_version() if glibc is None else glibc
    if ("glibc.malloc.hugetlb" in tunables or thp_mode != "madvise" or glibc < (2, 35)
            or accelerator_possible(environ)):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGE_PAGE_MALLOC) if t)}


def _start_again_with_huge_pages() -> None:
    """Replaces this process by the same command in ``huge_page_environ()``, where that gives
    an environment and the process can be started; else returns."""
    environ = huge_page_environ()
    if environ is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "baim_jax.cli", *sys.argv[1:]], environ)
    except OSError:  # cannot start again: run here, without huge pages
        pass


def _run(args, overrides) -> None:
    from baim_jax import train

    config = load_config(args.config, overrides)
    results = train.train_and_evaluate(config, args.workdir)
    for name, row in results["approaches"].items():
        print(f"{name:>8}: test loss {row['test_loss']:.2f} nats/image, "
              f"{row['wall_seconds']:.0f} s")
    print(f"wrote {args.workdir}/results.json, report.md, edges/, baim/, toolkit/, fl/ and "
          f"central/")


def _no_overrides(command: str, overrides: list[str]) -> None:
    if overrides:
        raise UsageError(f"{command}: unexpected arguments {overrides}")


def _export(args, overrides) -> None:
    _no_overrides("export", overrides)
    from baim_jax.service.store import ROUTER, ModelStore

    store = ModelStore(args.store, create=True)
    for e in store.export_run(args.workdir):
        name = "router (TSGate)" if e["task"] == ROUTER else f"task {e['task']}"
        print(f"published {name}, revision {e['revision']}: {e['params']:,} params, "
              f"{e['bytes']:,} bytes")
    print(f"store {store.root} holds tasks {store.tasks()}")


def read_images(path: str, shape: list[int]) -> np.ndarray:
    """Request images from ``.npy`` (``[B, H, W, C]`` or ``[H, W, C]``, floats in [0, 1] or
    uint8) or a PNG (one image, converted to C channels and resized to H x W)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--input: no such file {path!r}")
    h, w, c = shape
    if file.suffix.lower() == ".npy":
        try:
            x = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise UsageError(f"--input: {path} is not a readable .npy array "
                             f"({e or type(e).__name__})") from None
        if x.ndim == 3:
            x = x[None]
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        if not np.issubdtype(x.dtype, np.floating):
            raise UsageError(f"--input: {path} holds {x.dtype} values, expected floats in "
                             f"[0, 1] or uint8")
        return x.astype(np.float32)
    if file.suffix.lower() == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(file) as img:
                img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                x = np.asarray(img, np.float32) / 255.0
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise UsageError(f"--input: {path} is not a readable PNG ({e})") from None
        return x.reshape(1, h, w, c)
    raise UsageError(f"--input: {path} is neither .npy nor .png")


RECORD_KEYS = {"out", "tasks", "sources", "num", "seed"}


def check_out(path: str) -> Path:
    """``generate --out``: a PNG path whose PNG and JSON record can be written, and whose
    ``.json`` sibling, if it exists, is a record an earlier ``generate`` wrote (anything else
    there, a run's ``results.json`` or a store's manifest, is never overwritten)."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out: {path!r} must end in .png")
    if not out.parent.is_dir():
        raise UsageError(f"--out: no such directory {str(out.parent)!r}")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"--out: cannot write in {str(out.parent)!r}")
    record = out.with_suffix(".json")
    for p in (out, record):
        if p.is_dir():
            raise UsageError(f"--out: {str(p)!r} is a directory")
    if record.exists():
        try:
            previous = json.loads(record.read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or not RECORD_KEYS <= set(previous):
            raise UsageError(f"--out: {str(record)!r} exists and is not a generate record; "
                             f"choose another --out")
    return out


def _generate(args, overrides) -> None:
    _no_overrides("generate", overrides)
    from baim_jax.evaluation.report import save_grid
    from baim_jax.service import edge as edge_lib
    from baim_jax.service.store import ROUTER, ModelStore
    from baim_jax.service.toolbox import Toolbox, parse_bytes

    # With a toolbox, the store is read only for what the toolbox does not hold (paper step 7:
    # an edge serves its cached models while the cloud is out of reach).
    store = ModelStore(args.store, deferred=args.toolbox is not None and not args.sensitive)
    out = check_out(args.out)
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed: must be in [0, 2^32), got {args.seed}")
    capacity = None if args.capacity is None else parse_bytes(args.capacity)
    if capacity is not None and args.toolbox is None:
        raise UsageError("--capacity: needs --toolbox")
    # An existing toolbox says what it holds; none is made before the request is checked.
    made = args.toolbox is not None and (Path(args.toolbox) / "toolbox.json").is_file()
    held = Toolbox(args.toolbox) if made else None
    images = None
    if args.input is not None:
        images = read_images(args.input, edge_lib.model_entry(
            store, args.task or ROUTER, held, args.sensitive)["image_shape"])
    request = edge_lib.Request(task=args.task, images=images, num=args.num,
                               sensitive=args.sensitive, seed=args.seed)
    edge_lib.check_request(store, request, held)
    toolbox = None if args.toolbox is None else Toolbox(args.toolbox, capacity)
    response = edge_lib.Edge(store, toolbox).serve(request)
    grid = response.images
    cols = 8 if images is None else grid.shape[1]
    save_grid(grid.reshape((-1,) + grid.shape[-3:]), out, cols=cols)
    record = {"out": str(out), "tasks": response.tasks, "sources": response.sources,
              "bytes_downloaded": response.bytes_downloaded, "seconds": response.seconds,
              "notes": response.notes, "num": args.num, "seed": args.seed,
              "input": args.input, "sensitive": args.sensitive}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    what = (f"{args.num} samples of task {args.task}" if images is None else
            f"{len(images)} image(s) of task(s) {sorted(set(response.tasks))}: input, "
            f"reconstruction and {args.num} variations each")
    sources = ", ".join(f"{k} from {v}" for k, v in response.sources.items())
    print(f"wrote {out}: {what} in {response.seconds['total']:.2f} s (models: {sources}; "
          f"{response.bytes_downloaded:,} bytes downloaded)")
    for note in response.notes:
        print(f"note: {note}")


def _inspect(args, overrides) -> None:
    _no_overrides("inspect", overrides)
    from baim_jax import checkpoint

    path = Path(args.path)
    if (path / "manifest.json").is_file():
        _inspect_store(path, args.json)
        return
    spec = checkpoint.read_spec(path)
    if args.json:  # the checked spec.json as it is, file digests included
        print(json.dumps(json.loads((path / "spec.json").read_text()), indent=1))
        return
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    p = spec.params
    if spec.kind == "router":
        print(f"router model (the TSGate), tasks {list(spec.tasks)}, images "
              f"{list(spec.image_shape)}: {p.total:,} params; {size:,} bytes on disk")
        return
    gate = spec.config.gate if spec.config else "none"
    print(f"{spec.kind} model, tasks {list(spec.tasks)}, K={spec.k}, h={spec.h}, gate {gate}")
    for n, e in enumerate(spec.learners):
        s = e.member.spec
        role = f"task {e.task}" if e.task is not None else f"feeder, keeps {list(e.member.keep)}"
        print(f"  learner {n}: {s.kind} enc{list(s.encoder)} L={s.latent} dec{list(s.decoder)}"
              f" ({role}): {e.params:,} params")
    print(f"  connections: {spec.connections_kept} kept of {len(spec.connections)}")
    print(f"  parameters: {p.total:,} (learners {p.learners:,}, gate {p.gate:,}, "
          f"connections {p.connections:,}); {size:,} bytes on disk")


def _inspect_store(path: Path, as_json: bool) -> None:
    from baim_jax.service.store import ROUTER, ModelStore

    manifest = ModelStore(path).manifest()
    if as_json:
        print(json.dumps(manifest, indent=1))
        return
    models = manifest["models"]
    print(f"model store {path}: {len(models)} model(s)")
    for key in sorted(models):
        e = models[key]
        name = "router (TSGate)" if key == ROUTER else f"task {key}"
        parts = [f"revision {e['revision']}", f"{e['params']:,} params", f"{e['bytes']:,} bytes",
                 f"{len(e['files'])} files"]
        if e["kind"] == "task":
            parts.insert(1, f"{e['learners']} learners + {e['feeders']} feeders, K={e['k']}, "
                            f"{e['connections_kept']} connections")
        print(f"  {name}: {', '.join(parts)}; published {e['published']}")


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line (argparse prints its usage first)."""

    def error(self, message):
        self.exit(2, f"baim-jax: error: {self.prog}: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="baim-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run or resume the edge-cloud pipeline")
    run.add_argument("--config", required=True, help="a configs/*.py file")
    run.add_argument("--workdir", required=True, help="where results, models and checkpoints go")
    export = sub.add_parser("export", help="publish a finished run's toolkit to a model store")
    export.add_argument("--workdir", required=True, help="a finished run directory")
    export.add_argument("--store", required=True, help="the model store (made if missing)")
    gen = sub.add_parser("generate", help="serve a request at an edge: samples, or "
                                          "reconstructions and variations of given images")
    gen.add_argument("--store", required=True, help="the cloud's model store")
    gen.add_argument("--toolbox", help="the edge's toolbox directory (none: no caching)")
    gen.add_argument("--capacity", help="toolbox capacity, e.g. 64MB (default: as recorded)")
    gen.add_argument("--task", help="the task; without it the router picks each image's task")
    gen.add_argument("--num", type=int, default=64,
                     help="samples (at most 4096), or variations per input image (default 64; "
                          "inputs x (2 + num) at most 65536)")
    gen.add_argument("--input", help="images to reconstruct and vary: .npy or .png")
    gen.add_argument("--out", required=True, help="the PNG grid to write (a .json goes beside)")
    gen.add_argument("--sensitive", action="store_true",
                     help="take the model straight from the store; cache nothing at the edge")
    gen.add_argument("--seed", type=int, default=0)
    inspect = sub.add_parser("inspect", help="print a saved model's spec or a store's contents")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="the whole spec as JSON")
    for command in (run, gen):
        command.add_argument("--compilation_cache", metavar="DIR",
                             help="JAX's persistent compilation cache, or 'none' (default: "
                                  "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/baim_jax/xla)")
    args, overrides = parser.parse_known_args(argv)
    if argv is None and args.command in ("run", "generate"):
        _start_again_with_huge_pages()
    with faults.held_background_errors() as held:
        try:
            if args.command in ("run", "generate"):
                cpu_compile_flags()
                enable_compilation_cache(cache_dir(args.compilation_cache))
            {"run": _run, "export": _export, "generate": _generate,
             "inspect": _inspect}[args.command](args, overrides)
            return 0
        except Exception as e:  # OSError: a file system that refuses (read-only, full)
            if not isinstance(e, (ValueError, OSError)) and faults.no_space_path(e) is None:
                sys.stderr.write("".join(held))  # a bug: everything it left, then its traceback
                raise
            details = faults.keep_details(held)
            print(f"baim-jax: error: {faults.one_line(e)}"
                  + (f" (background errors: {details})" if details else ""), file=sys.stderr)
            status = 2
        except KeyboardInterrupt:
            print("baim-jax: interrupted", file=sys.stderr)
            status = 130
    if argv is None:  # the process ends here: a failed write's callbacks may still fire
        faults.quiet_until_exit()
    return status

if __name__ == "__main__":
    sys.exit(main())
