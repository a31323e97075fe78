"""Test set-up: 4 fake CPU devices, strict dtype promotion, small learner topologies, the
session's smoke run and how pytest-xdist schedules the tests that share it."""

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# 4 fake devices; backend optimisation off and XLA:CPU's older loop emitters, which compile a
# small graph 2.5x faster: tests compile many small graphs, and compiling dominates their time
# on a 2-core CPU.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4"
                           + " --xla_backend_optimization_level=0"
                           + " --xla_cpu_use_fusion_emitters=false").strip()
# A persistent compilation cache for this session: the pipeline tests' subprocesses (killed
# and resumed runs) then reuse what the in-process smoke run compiled.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="baim_jax_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# One directory per pytest-xdist worker (and the subprocesses its tests start): jax's cache
# eviction is not safe between processes writing one directory at once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

from baim_jax.core.learners import LearnerSpec  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
# Exact float32 matmuls: on GPUs the default (TF32) makes paths differ by ~1e-4.
jax.config.update("jax_default_matmul_precision", "highest")

IMAGE = (8, 8, 1)


@contextlib.contextmanager
def backend_compiles():
    """Yields a list that collects the duration of every XLA compile run within."""
    from jax import monitoring

    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        monitoring.unregister_event_duration_listener(listen)


def mlp(encoder, latent, decoder, likelihood="bernoulli"):
    return LearnerSpec("mlp", IMAGE, tuple(encoder), latent, tuple(decoder), likelihood)


def conv(encoder, latent, decoder, likelihood="bernoulli"):
    return LearnerSpec("conv", IMAGE, tuple(encoder), latent, tuple(decoder), likelihood)


@pytest.fixture
def mlp_specs():
    """Four heterogeneous MLP learners (widths, depths, latent sizes differ)."""
    return [mlp([16], 4, [16]), mlp([12, 10], 3, [8]), mlp([6], 5, [6, 9, 7]), mlp([16], 4, [16])]


@pytest.fixture
def conv_specs():
    """Four heterogeneous convolutional learners."""
    return [conv([4, 6], 4, [4, 6]), conv([3, 5, 7], 3, [8, 5]), conv([6, 4], 5, [6, 9, 7]),
            conv([4, 6], 4, [5, 5])]


@pytest.fixture
def images():
    return jax.random.uniform(jax.random.key(0), (6, *IMAGE))


SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.py")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One ``baim-jax run`` of configs/smoke.py (in-process), shared by the pipeline and CLI
    tests: its workdir, exit status and output."""
    import contextlib
    import io

    from baim_jax.cli import main

    workdir = tmp_path_factory.mktemp("smoke") / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", "--config", SMOKE, "--workdir", str(workdir)])
    return {"workdir": workdir, "code": code, "out": out.getvalue(), "err": err.getvalue()}


# The test files whose tests use the smoke run (above): with pytest-xdist, one worker takes them
# all, so that the run is made once; every other test is scheduled on its own.
SMOKE_FILES = ("test_cli.py", "test_pipeline.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's ``load`` scheduling, but the smoke run's files form one unit of work."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SmokeRunTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "smoke_run" if Path(nodeid.split("::", 1)[0]).name in SMOKE_FILES else nodeid

    return SmokeRunTogether(config, log)
