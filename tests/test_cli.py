"""The command line, in-process: ``baim_jax.cli.main([...])`` returns the exit status.

The session's smoke run (``conftest.smoke_run``) is shared by the tests of its output, of
``inspect`` and of the refusal to overwrite a run of another config.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from baim_jax.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.py")
TASKS = ["digits_0_4", "digits_5_9"]


def run_args(workdir, *overrides):
    return ["run", "--config", CONFIG, "--workdir", str(workdir), *overrides]


@pytest.fixture(scope="module")
def run(smoke_run):
    return smoke_run


def test_run_succeeds_and_prints_every_approach(run):
    assert run["code"] == 0, run["err"][-2000:]
    assert "Traceback" not in run["err"]
    for name in ("finetune", "freeze", "scratch", "fl"):
        assert f"{name}: test loss" in run["out"]
    assert "results.json" in run["out"]


def test_run_shows_progress_bars(run):
    # tqdm writes to stderr: one bar per phase, with a rate.
    for desc in ("edges: local training", "cloud: finetune", "edges: personalisation",
                 "fl: FedAvg rounds"):
        assert desc in run["err"], desc
    assert "step/s" in run["err"]


# --------------------------------------------------------------------------------- inspect


def test_inspect_prints_summary(run, capsys):
    path = run["workdir"] / "baim" / "finetune"
    spec = json.loads((path / "spec.json").read_text())
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("baim model")
    for n in range(4):
        assert f"learner {n}:" in out
    conns = spec["connections"]
    assert f"connections: {conns['kept']} kept of {conns['potential']}" in out
    assert f"parameters: {spec['params']['total']:,}" in out


def test_inspect_task_model(run, capsys):
    assert main(["inspect", str(run["workdir"] / "toolkit" / TASKS[1])]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("task model") and TASKS[1] in out


def test_inspect_edge_model(run, capsys):
    assert main(["inspect", str(run["workdir"] / "edges" / "edge_00" / "initial")]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("edge model") and "gate none" in out and "learner 0:" in out


def test_inspect_json(run, capsys):
    path = run["workdir"] / "baim" / "finetune"
    assert main(["inspect", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    spec = json.loads(out)
    assert spec == json.loads((path / "spec.json").read_text())
    for key in ("learners", "tasks", "k", "h", "connections", "params"):
        assert key in spec, key


# ------------------------------------------------------------------------------ bad inputs


def _assert_usage_error(code, capsys, *words):
    _assert_one_error_line(code, *capsys.readouterr(), *words)


def _assert_one_error_line(code, out, err, *words):
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("baim-jax: error:"), err
    for word in words:
        assert word in lines[0], (word, lines[0])


BAD_CONFIGS = {
    "unknown key": (["--config.nope=1"], ["nope", "unknown config key"]),
    "unknown nested key": (["--config.baim.nope=1"], ["nope", "unknown config key"]),
    "wrong type": (["--config.edge.epochs=abc"], ["edge.epochs", "expected int"]),
    "K larger than a squad": (["--config.baim.k=3"], ["k: 3", "squad"]),
    "negative h": (["--config.baim.h=-1"], ["h:", ">= 0"]),
    "unknown latent design": (["--config.baim.latent=both"], ["latent: 'both'", "shared"]),
    "patience without validation": (["--config.edge.validation_fraction=0.0"],
                                    ["edge.patience", "validation_fraction"]),
    "validation of half an edge": (["--config.edge.validation_fraction=0.5"],
                                   ["edge.validation_fraction", "[0, 0.5)"]),
    "negative patience": (["--config.edge.patience=-1"], ["edge.patience", "-1"]),
    "unknown schedule": (["--config.central.schedule=linear"],
                         ["central.schedule", "'linear'", "cosine"]),
    "unknown prior": (["--config.baim.prior_init=size"], ["prior_init: 'size'", "params"]),
    "unknown decoder pruning": (["--config.cloud.decoder_pruning=kl"],
                                ["cloud.decoder_pruning: 'kl'", "kl_cost"]),
    "KL-cost pruning without decoder connections": (
        ["--config.cloud.decoder_pruning=kl_cost", "--config.baim.connect=['enc']"],
        ["cloud.decoder_pruning", "'kl_cost'", "['enc']"]),
    "rho zero": (["--config.cloud.rho=0"], ["rho"]),
    "rho above one": (["--config.cloud.rho=1.5"], ["rho", "(0, 1]"]),
    "unknown strategy": (["--config.strategies=['finetune','melt']"], ["strategy", "melt"]),
    "edge with no data": (
        ["--config.edges=[{'task':0,'encoder':[8],'latent':2,'decoder':[8],'share':1e-9},"
         "{'task':0,'encoder':[8],'latent':2,'decoder':[8]},"
         "{'task':1,'encoder':[8],'latent':2,'decoder':[8]},"
         "{'task':1,'encoder':[8],'latent':2,'decoder':[8]}]"], ["edges[0]", "no data"]),
    "task with no edge": (
        ["--config.edges=[{'task':0,'encoder':[8],'latent':2,'decoder':[8]},"
         "{'task':0,'encoder':[8],'latent':2,'decoder':[8]}]"], ["digits_5_9", "no edge"]),
    "edge model that cannot be built": (
        ["--config.edges=[{'task':0,'encoder':[8],'latent':-2,'decoder':[8]},"
         "{'task':0,'encoder':[8],'latent':2,'decoder':[8]},"
         "{'task':1,'encoder':[8],'latent':2,'decoder':[8]},"
         "{'task':1,'encoder':[8],'latent':2,'decoder':[8]}]"], ["edges[0]", "latent", "-2"]),
    "edge field of the wrong type": (
        ["--config.edges=[{'task':0,'encoder':8,'latent':2,'decoder':[8]},"
         "{'task':1,'encoder':[8],'latent':2,'decoder':[8]}]", "--config.baim.k=1"],
        ["edges[0]"]),
    "edge model above the upload limit": (
        ["--config.cloud.max_upload_params=1000"], ["edges[0]", "max_upload_params"]),
    "unknown dataset": (["--config.data.dataset=imagenet"], ["data.dataset", "imagenet"]),
    "rate of a strategy not run": (["--config.cloud.learning_rates={'melt': 1e-3}"],
                                   ["cloud.learning_rates", "'melt'"]),
    "negative strategy rate": (["--config.cloud.learning_rates={'freeze': -1.0}"],
                               ["cloud.learning_rates['freeze']", "> 0"]),
    "capacity factors not one per stage position": (
        ["--config.baim.capacity_factor=[1.0, 1.0]"],
        ["capacity_factor", "2 factors given", "6 stage positions"]),
    "capacity factor zero": (["--config.baim.capacity_factor=0.0"], ["capacity_factor", "> 0"]),
    "unsafe task name": (["--config.task_names=['../up','digits_5_9']"],
                         ["task_names", "'../up'", "not a safe task name"]),
    "edges not dicts": (["--config.edges=[1, 2]"], ["edges[0]", "expected a dict"]),
    "edge share not a number": (
        ["--config.edges=[{'task':0,'encoder':[8],'latent':2,'decoder':[8],'share':'x'},"
         "{'task':1,'encoder':[8],'latent':2,'decoder':[8]}]", "--config.baim.k=1"],
        ["edges[0].share", "'x'"]),
    "edge latent not an integer": (
        ["--config.edges=[{'task':0,'encoder':[8],'latent':8.5,'decoder':[8]},"
         "{'task':1,'encoder':[8],'latent':2,'decoder':[8]}]", "--config.baim.k=1"],
        ["edges[0].latent", "8.5"]),
    "edge task a boolean": (
        ["--config.edges=[{'task':True,'encoder':[8],'latent':2,'decoder':[8]},"
         "{'task':1,'encoder':[8],'latent':2,'decoder':[8]}]", "--config.baim.k=1"],
        ["edges[0].task", "True"]),
    "task classes not lists": (["--config.task_classes=[0, 1]"], ["task_classes[0]"]),
    "task classes of strings": (["--config.task_classes=['ab', 'cd']"], ["task_classes[0]"]),
    "seed out of range": (["--config.seed=100000000000000000000000"], ["seed", "2^32"]),
    "negative seed": (["--config.seed=-1"], ["seed", "2^32"]),
    "curve_every zero": (["--config.curve_every=0"], ["curve_every", ">= 1"]),
    "batch larger than the data": (["--config.edge.batch_size=1000000000000"],
                                   ["edge.batch_size", "data.size"]),
    "infinite learning rate": (["--config.edge.learning_rate=1e999"],
                               ["edge.learning_rate", "finite"]),
    "more devices than the machine has": (["--config.devices=64"], ["devices", "got 64"]),
}



@pytest.mark.parametrize("name", sorted(p.name for p in Path(CONFIG).parent.glob("*.py")))
def test_every_shipped_config_validates(name):
    """The configs the docs run (smoke, case_study, paper) pass the pipeline's checks."""
    from baim_jax.cli import load_config
    from baim_jax.core import learners
    from baim_jax.framework import plan as plan_lib

    plan = plan_lib.validate(load_config(str(Path(CONFIG).parent / name), []))
    if name == "paper.py":  # the paper's protocol: 10 edges spanning at least 30x in size
        sizes = [learners.count_params(s) for s in plan.specs]
        assert len(sizes) == 10 and max(sizes) >= 30 * min(sizes)
        assert plan.config.edge.epochs == plan.config.cloud.epochs == plan.config.fl.rounds == 100

@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_run_refuses_bad_config(case, tmp_path, capsys):
    overrides, words = BAD_CONFIGS[case]
    workdir = tmp_path / "run"
    code = main(run_args(workdir, *overrides))
    _assert_usage_error(code, capsys, *words)
    assert not workdir.exists()  # refused before any work started


CONFIG_FILES = {
    "returns None": ("def get_config():\n    return None\n", ["returned a NoneType"]),
    "returns a dict": ("import sys; sys.path.insert(0, {root!r})\n"
                       "from configs.smoke import get_config as g\n"
                       "def get_config():\n    return g().to_dict()\n", ["returned a dict"]),
    "exits": ("import sys\ndef get_config():\n    sys.exit(0)\n", ["SystemExit"]),
    "lacks a key": ("import sys; sys.path.insert(0, {root!r})\n"
                    "from configs.smoke import get_config as g\n"
                    "def get_config():\n    c = g()\n    del c['devices']\n    return c\n",
                    ["missing key(s) ['devices']"]),
    "sets of classes": ("import sys; sys.path.insert(0, {root!r})\n"
                        "from configs.smoke import get_config as g\n"
                        "def get_config():\n    c = g()\n"
                        "    c.task_classes = [{{0, 1}}, {{2, 3}}]\n    return c\n",
                        ["task_classes[0]"]),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES), ids=list(CONFIG_FILES))
def test_run_refuses_bad_config_file(case, tmp_path, capsys):
    text, words = CONFIG_FILES[case]
    root = str(Path(__file__).resolve().parents[1])
    (tmp_path / "bad.py").write_text(text.format(root=root))
    workdir = tmp_path / "run"
    code = main(["run", "--config", str(tmp_path / "bad.py"), "--workdir", str(workdir)])
    _assert_usage_error(code, capsys, *words)
    assert not workdir.exists()


def test_run_refuses_a_config_that_is_not_python(tmp_path, capsys):
    (tmp_path / "smoke.txt").write_text("x = 1")
    code = main(["run", "--config", str(tmp_path / "smoke.txt"), "--workdir",
                 str(tmp_path / "run")])
    _assert_usage_error(code, capsys, "not a Python file")


def test_run_refuses_missing_config_file(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = main(["run", "--config", str(tmp_path / "missing.py"), "--workdir", str(workdir)])
    _assert_usage_error(code, capsys, "no such file", "missing.py")
    assert not workdir.exists()


def test_run_refuses_workdir_of_another_config(run, capsys):
    workdir = run["workdir"]
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    code = main(run_args(workdir, "--config.cloud.epochs=3"))
    _assert_usage_error(code, capsys, "different config", str(workdir))
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before


def test_run_refuses_a_foreign_non_empty_workdir(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("keep me")
    code = main(run_args(tmp_path))
    _assert_usage_error(code, capsys, "not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_inspect_refuses_non_model_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    code = main(["inspect", str(tmp_path)])
    _assert_usage_error(code, capsys, "spec.json", str(tmp_path))


def test_inspect_refuses_missing_directory(tmp_path, capsys):
    code = main(["inspect", str(tmp_path / "nowhere")])
    _assert_usage_error(code, capsys, "nowhere")


def test_run_refuses_workdir_that_is_a_file(tmp_path, capsys):
    workdir = tmp_path / "results.txt"
    workdir.write_text("keep me")
    code = main(run_args(workdir))
    _assert_usage_error(code, capsys, "workdir")
    assert workdir.read_text() == "keep me"


# ------------------------------------------------------------------- export, generate (service)


@pytest.fixture(scope="module")
def store(run, tmp_path_factory):
    """The smoke run's toolkit and router, published by ``baim-jax export``."""
    path = tmp_path_factory.mktemp("service") / "store"
    code = main(["export", "--workdir", str(run["workdir"]), "--store", str(path)])
    return {"path": path, "code": code}


def test_export_publishes_the_toolkit_and_router(store, run, capsys):
    assert store["code"] == 0
    manifest = json.loads((store["path"] / "manifest.json").read_text())
    assert sorted(manifest["models"]) == ["_router", *TASKS]
    results = json.loads((run["workdir"] / "results.json").read_text())
    for task in TASKS:
        assert manifest["models"][task]["params"] == results["toolkit"][task]["params"]
    assert main(["inspect", str(store["path"])]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("model store") and "router (TSGate)" in out
    for task in TASKS:
        assert f"task {task}: revision 1" in out


def test_generate_downloads_then_serves_from_the_toolbox(store, tmp_path, capsys):
    args = ["generate", "--store", str(store["path"]), "--toolbox", str(tmp_path / "box"),
            "--task", TASKS[0], "--num", "16", "--out", str(tmp_path / "grid.png")]
    assert main(args) == 0
    out, _ = capsys.readouterr()
    assert f"16 samples of task {TASKS[0]}" in out and f"{TASKS[0]} from store;" in out
    record = json.loads((tmp_path / "grid.json").read_text())
    assert record["sources"] == {TASKS[0]: "store"} and record["bytes_downloaded"] > 0
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert main(args) == 0
    out, _ = capsys.readouterr()
    assert f"{TASKS[0]} from toolbox; 0 bytes downloaded" in out


def test_generate_keeps_its_compiled_sampler_in_the_compilation_cache(store, tmp_path):
    """A fresh process (as every ``generate`` is) fills the directory given; a second one
    then finds there what it would compile (JAX counts the hits)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cache = tmp_path / "xla"
    code = ("import sys; from jax import monitoring; hits = []; "
            "monitoring.register_event_listener(lambda e, **kw: hits.append(e) "
            "if e == '/jax/compilation_cache/cache_hits' else None); "
            "from baim_jax.cli import main; code = main(sys.argv[1:]); "
            "print('hits', len(hits)); sys.exit(code)")
    args = ["generate", "--store", str(store["path"]), "--task", TASKS[1], "--num", "4",
            "--out", str(tmp_path / "grid.png"), "--compilation_cache", str(cache)]
    hits = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        hits.append(int(out.stdout.split("hits ")[-1]))
    assert any(cache.iterdir())
    assert hits[0] == 0 and hits[1] > 0


def test_compilation_cache_directory(tmp_path):
    from baim_jax.cli import cache_dir

    assert cache_dir("none") is None
    assert cache_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    # Default: JAX's own variable, else under $XDG_CACHE_HOME.
    assert cache_dir(None, {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "j")}) == tmp_path / "j"
    assert cache_dir(None, {"XDG_CACHE_HOME": str(tmp_path / "x")}) == (
        tmp_path / "x" / "baim_jax" / "xla")
    # A default that cannot be made turns the cache off; a given one is an error.
    (tmp_path / "file").write_text("")
    assert cache_dir(None, {"XDG_CACHE_HOME": str(tmp_path / "file")}) is None
    with pytest.raises(ValueError, match="--compilation_cache: cannot use"):
        cache_dir(str(tmp_path / "file"))


def test_cpu_runs_compile_with_llvm_at_o1_unless_told_otherwise():
    from baim_jax.cli import CPU_LLVM_LEVEL, accelerator_possible, cpu_compile_flags

    cpu = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
    assert cpu_compile_flags(cpu)
    assert cpu["XLA_FLAGS"] == f"--xla_cpu_multi_thread_eigen=false {CPU_LLVM_LEVEL}"
    assert not cpu_compile_flags(cpu)  # set once
    # The user's own level stands; a platform list naming an accelerator is left alone.
    own = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=3"}
    gpu = {"JAX_PLATFORMS": "cuda,cpu"}
    assert not cpu_compile_flags(own) and own["XLA_FLAGS"].endswith("level=3")
    assert not cpu_compile_flags(gpu) and "XLA_FLAGS" not in gpu
    assert accelerator_possible({"JAX_PLATFORMS": "tpu"})
    assert not accelerator_possible({"JAX_PLATFORMS": " cpu "})


def test_cpu_runs_ask_malloc_for_huge_pages_where_the_kernel_gives_them():
    from baim_jax.cli import HUGE_PAGE_MALLOC, huge_page_environ

    cpu = {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    env = huge_page_environ(cpu, "madvise", (2, 36))
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGE_MALLOC}"
    assert env["JAX_PLATFORMS"] == "cpu" and "GLIBC_TUNABLES" in cpu  # a copy, not the caller's
    assert huge_page_environ({"JAX_PLATFORMS": "cpu"}, "madvise", (2, 35))["GLIBC_TUNABLES"] \
        == HUGE_PAGE_MALLOC
    # Set already (no second start), huge pages always or never, an old glibc or another C
    # library, or an accelerator: nothing to change.
    assert huge_page_environ(env, "madvise", (2, 36)) is None
    for mode, glibc in (("always", (2, 36)), ("never", (2, 36)), ("", (2, 36)),
                        ("madvise", (2, 31)), ("madvise", ())):
        assert huge_page_environ(cpu, mode, glibc) is None
    assert huge_page_environ({"JAX_PLATFORMS": "cuda"}, "madvise", (2, 36)) is None


def test_the_command_starts_again_with_huge_pages_and_only_then(monkeypatch, tmp_path):
    from baim_jax import cli

    started = []
    monkeypatch.setattr(cli.os, "execve", lambda *a: started.append(a))
    # main() as a program ends by silencing the process's hooks and logs; not pytest's.
    monkeypatch.setattr(cli.faults, "quiet_until_exit", lambda: None)
    monkeypatch.setattr(cli, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(cli, "_glibc_version", lambda: (2, 36))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    args = ["generate", "--store", str(tmp_path / "none"), "--task", "a", "--out",
            str(tmp_path / "g.png")]
    monkeypatch.setattr(cli.sys, "argv", ["baim-jax", *args])
    cli.main()  # execve is stubbed: main goes on to refuse the missing store
    (path, argv, env), = started
    assert (path, argv) == (sys.executable, [sys.executable, "-m", "baim_jax.cli", *args])
    assert env["GLIBC_TUNABLES"] == cli.HUGE_PAGE_MALLOC and env["JAX_PLATFORMS"] == "cpu"
    cli.main(args)  # called in-process with its arguments: never started again
    monkeypatch.setattr(cli.sys, "argv", ["baim-jax", "inspect", str(tmp_path)])
    cli.main()  # inspect runs nothing heavy
    assert len(started) == 1

    def refuse(*_):
        raise PermissionError("not allowed")

    monkeypatch.setattr(cli.os, "execve", refuse)
    monkeypatch.setattr(cli.sys, "argv", ["baim-jax", *args])
    assert cli.main() == 2  # could not start again: went on here, to the missing store


def test_a_program_refuses_a_bad_input_in_one_line_after_starting_again(tmp_path):
    """``main()`` as a program; where this machine gives huge pages on request it starts the
    command again first (``python -m baim_jax.cli``), which then refuses in one line."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    code = ("import sys; from baim_jax import cli; sys.argv = ['baim-jax', *sys.argv[1:]]; "
            "sys.exit(cli.main())")
    out = subprocess.run([sys.executable, "-c", code, "generate", "--store",
                          str(tmp_path / "none"), "--task", "a", "--out", str(tmp_path / "g.png")],
                         capture_output=True, text=True, env=env, timeout=120)
    _assert_one_error_line(out.returncode, out.stdout, out.stderr, "none")


def test_a_bad_compilation_cache_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["generate", "--store", str(tmp_path), "--task", "a", "--out",
                 str(tmp_path / "g.png"), "--compilation_cache", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("baim-jax: error: --compilation_cache")


def test_generate_serves_what_the_toolbox_holds_when_the_store_is_gone(store, tmp_path,
                                                                       capsys):
    """Paper step 7: with the store out of reach, what the toolbox holds is still served (by
    task, and images through the cached router); anything else is refused in one line."""
    from baim_jax.evaluation.data import embedded_digits

    images, _ = embedded_digits()
    np.save(tmp_path / "in.npy", np.asarray(images[:1]))  # one image: one task cached
    cloud = tmp_path / "store"
    shutil.copytree(store["path"], cloud)

    def generate(*request):
        return main(["generate", "--store", str(cloud), "--toolbox", str(tmp_path / "box"),
                     "--num", "2", "--out", str(tmp_path / "grid.png"), *request])

    assert generate("--input", str(tmp_path / "in.npy")) == 0
    routed = json.loads((tmp_path / "grid.json").read_text())["tasks"]
    assert generate("--task", routed[0]) == 0
    capsys.readouterr()
    cloud.rename(tmp_path / "elsewhere")
    assert generate("--input", str(tmp_path / "in.npy")) == 0
    record = json.loads((tmp_path / "grid.json").read_text())
    assert record["tasks"] == routed and record["bytes_downloaded"] == 0
    assert set(record["sources"].values()) == {"toolbox"}
    assert generate("--task", routed[0]) == 0
    assert f"{routed[0]} from toolbox; 0 bytes downloaded" in capsys.readouterr()[0]
    missing = next(t for t in TASKS if t not in routed)
    _assert_usage_error(generate("--task", missing), capsys, "not a model store")


def test_generate_varies_given_images_routed_by_the_tsgate(store, tmp_path, capsys):
    from baim_jax.evaluation.data import embedded_digits

    images, _ = embedded_digits()
    np.save(tmp_path / "in.npy", np.asarray(images[:3]))
    code = main(["generate", "--store", str(store["path"]), "--input", str(tmp_path / "in.npy"),
                 "--num", "2", "--out", str(tmp_path / "grid.png"), "--sensitive"])
    assert code == 0, capsys.readouterr()
    out, _ = capsys.readouterr()
    assert "3 image(s)" in out and "_router from store, sensitive" in out
    record = json.loads((tmp_path / "grid.json").read_text())
    assert len(record["tasks"]) == 3 and set(record["tasks"]) <= set(TASKS)


BAD_GENERATE = {
    "unknown task": (["--task", "nope"], ["'nope' is not in the store"]),
    "path traversal": (["--task", "../../etc"], ["not a safe task name"]),
    "absolute task": (["--task", "/etc/passwd"], ["not a safe task name"]),
    "not png": (["--task", TASKS[0], "--out", "{tmp}/grid.jpg"], ["--out", ".png"]),
    "capacity without toolbox": (["--task", TASKS[0], "--capacity", "1MB"], ["--capacity"]),
    "bad capacity": (["--task", TASKS[0], "--toolbox", "{tmp}/box", "--capacity", "lots"],
                     ["capacity", "lots"]),
    "no task nor input": ([], ["name a task or give images"]),
    "zero samples": (["--task", TASKS[0], "--num", "0", "--toolbox", "{tmp}/empty_box"],
                     ["num"]),
    "missing input": (["--input", "{tmp}/none.npy"], ["--input", "no such file"]),
    "input of the wrong shape": (["--input", "{tmp}/small.npy"], ["images", "does not fit"]),
    "input not an image": (["--input", "{tmp}/text.png"], ["--input", "not a readable PNG"]),
    "empty input file": (["--input", "{tmp}/empty.npy"], ["--input", "not a readable .npy"]),
    "out beside a json that is not a record": (["--task", TASKS[0], "--out", "{tmp}/results.png"],
                                               ["results.json", "not a generate record"]),
    "out is a directory": (["--task", TASKS[0], "--out", "{tmp}/dir.png"], ["is a directory"]),
    "infinite capacity": (["--task", TASKS[0], "--toolbox", "{tmp}/box", "--capacity", "inf"],
                          ["capacity", "finite"]),
    "seed out of range": (["--task", TASKS[0], "--seed", "100000000000000000000000"],
                          ["--seed", "2^32"]),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE), ids=list(BAD_GENERATE))
def test_generate_refuses_bad_input(case, store, tmp_path, capsys):
    np.save(tmp_path / "small.npy", np.zeros((2, 8, 8, 1), np.float32))
    (tmp_path / "text.png").write_text("not a png")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "results.json").write_text('{"toolkit": {}}')  # e.g. a run's results
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "empty_box").mkdir()
    before = (store["path"] / "manifest.json").read_text()
    extra, words = BAD_GENERATE[case]
    args = ["generate", "--store", str(store["path"]), "--out", str(tmp_path / "grid.png")]
    code = main(args + [a.format(tmp=tmp_path) for a in extra])
    _assert_usage_error(code, capsys, *words)
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "box").exists()
    assert sorted(p.name for p in (tmp_path / "empty_box").iterdir()) == []
    assert (store["path"] / "manifest.json").read_text() == before
    assert (tmp_path / "results.json").read_text() == '{"toolkit": {}}'



def test_generate_refuses_missing_store(tmp_path, capsys):
    code = main(["generate", "--store", str(tmp_path / "nostore"), "--task", TASKS[0],
                 "--out", str(tmp_path / "grid.png")])
    _assert_usage_error(code, capsys, "not a model store")
    assert not (tmp_path / "nostore").exists()


def test_export_refuses_unfinished_run(tmp_path, capsys):
    code = main(["export", "--workdir", str(tmp_path), "--store", str(tmp_path / "store")])
    _assert_usage_error(code, capsys, "no finished baim-jax run")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("argv,words", [
    (["generate", "--store", "s", "--out", "o.png", "--num", "abc"], ["--num", "'abc'"]),
    (["run", "--config", "configs/smoke.py"], ["--workdir", "required"]),
    (["train"], ["invalid choice", "'train'"])])
def test_a_bad_command_line_is_one_error_line(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    _assert_usage_error(exit_info.value.code, capsys, *words)


def test_a_full_disk_during_export_is_one_line_and_changes_nothing(store, run, monkeypatch,
                                                                  capfd):
    """ENOSPC injected where the store copies a model's files (for machines where no small
    file system can be mounted): one error line naming the file, no traceback, and the store
    it was publishing to keeps its models."""
    from baim_jax import files

    before = json.loads((store["path"] / "manifest.json").read_text())

    def full(src, digests, dest, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(dest / "state" / "x"))

    monkeypatch.setattr(files, "copy_verified", full)
    capfd.readouterr()
    code = main(["export", "--workdir", str(run["workdir"]), "--store", str(store["path"])])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("baim-jax: error: no space left on device writing ")
    assert "rerun the same command" in err
    assert json.loads((store["path"] / "manifest.json").read_text()) == before
