"""The edge-cloud pipeline end to end (configs/smoke.py), and its resumption after kills."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOKE

import baim_jax
from baim_jax import BAIM, TaskModel
from baim_jax.cli import main
from baim_jax.core.edge_model import EdgeModel

APPROACH_KEYS = ("test_loss", "test_loss_parts", "test_nll", "test_loss_curve",
                 "cloud_trainable_params", "edge_params",
                 "upload_bytes_per_edge", "upload_times", "download_bytes_per_edge",
                 "download_times", "cloud_flops_per_epoch", "edge_flops_per_epoch",
                 "wall_seconds")
TASKS = ["digits_0_4", "digits_5_9"]


@pytest.fixture(scope="module")
def results(smoke_run):
    assert smoke_run["code"] == 0, smoke_run["err"][-2000:]
    return json.loads((smoke_run["workdir"] / "results.json").read_text())


def test_results_has_every_approach_with_its_costs(results):
    assert set(results["approaches"]) == {"finetune", "freeze", "scratch", "fl", "central"}
    for name, row in results["approaches"].items():
        for key in APPROACH_KEYS:
            assert key in row, (name, key)
        assert math.isfinite(row["test_loss"]) and row["test_loss"] > 0
        assert row["test_loss"] == row["test_loss_curve"][-1]
        # The bound's parts add up to it; the importance-weighted NLL is finite and positive.
        assert math.isclose(sum(row["test_loss_parts"].values()), row["test_loss"], rel_tol=1e-6)
        assert math.isfinite(row["test_nll"]) and row["test_nll"] > 0
        # 2 cloud epochs, 2 FL rounds, 4 central epochs (the route's 2 + 2), measured every
        # 2 (curve_every): None between
        curve = row["test_loss_curve"]
        assert len(curve) == (4 if name == "central" else 2)
        assert [v is None for v in curve] == [True, False] * (len(curve) // 2), name
        assert math.isclose(row["test_nll_over_central"],
                            row["test_nll"] / results["approaches"]["central"]["test_nll"])
        for key in ("edge_params", "upload_bytes_per_edge", "download_bytes_per_edge",
                    "edge_flops_per_epoch"):
            low, high = row[key]
            # the central reference's edges train nothing: they upload their raw images
            assert (0 == low == high) if name == "central" and key in (
                "edge_params", "edge_flops_per_epoch") else 0 < low <= high, (name, key)
        assert row["cloud_flops_per_epoch"] > 0 and row["wall_seconds"] > 0


def test_fid_of_every_approach_and_edge(results):
    for name, row in results["approaches"].items():
        assert len(row["fid_curve"]) == len(row["test_loss_curve"])
        assert row["fid"] == row["fid_curve"][-1]
        assert row["fid"] > results["fid_floor"] > 0, name
    for edge in results["edges"]:
        assert edge["fid_initial"] > 0 and edge["fid_personalized"] > 0
    net = results["fid_feature_net"]
    assert "not Inception" in net["name"] and net["test_accuracy"] > 0.8


def test_edges_report_every_class_of_their_task(results):
    classes = {t: [str(c) for c in cs] for t, cs in zip(TASKS, results["config"]["task_classes"])}
    for edge in results["edges"]:
        for key in ("test_loss_initial_per_class", "test_loss_personalized_per_class",
                    "test_nll_initial_per_class", "test_nll_personalized_per_class"):
            assert sorted(edge[key]) == classes[edge["task"]], (edge["id"], key)
        # The task's score is the mean over its images, so it lies within the class means.
        values = edge["test_loss_initial_per_class"].values()
        assert min(values) <= edge["test_loss_initial"] <= max(values)


def test_edges_span_ten_times_in_size(results):
    params = [e["params"] for e in results["edges"]]
    assert max(params) >= 10 * min(params)
    assert results["approaches"]["finetune"]["edge_params"] == [min(params), max(params)]


def test_transfers_follow_the_workflow(results):
    a = results["approaches"]
    fl, rounds = a["fl"], results["config"]["fl"]["rounds"]
    # FedAvg moves the whole float32 model both ways every round.
    assert fl["upload_times"] == fl["download_times"] == rounds
    assert fl["upload_bytes_per_edge"] == [4 * fl["cloud_trainable_params"]] * 2
    # The BAIM route uploads each edge model once and downloads its task model once.
    params = [e["params"] for e in results["edges"]]
    for name in ("finetune", "freeze", "scratch"):
        assert a[name]["upload_times"] == a[name]["download_times"] == 1
        assert a[name]["upload_bytes_per_edge"] == [4 * min(params), 4 * max(params)]
    toolkit_params = [results["toolkit"][e["task"]]["params"] for e in results["edges"]]
    assert a["finetune"]["download_bytes_per_edge"] == [4 * min(toolkit_params),
                                                        4 * max(toolkit_params)]
    # Freezing trains no learner, so less than fine-tuning (same gate and connections).
    assert a["freeze"]["cloud_trainable_params"] < a["finetune"]["cloud_trainable_params"]
    assert a["scratch"]["cloud_trainable_params"] == a["finetune"]["cloud_trainable_params"]


def test_every_model_is_saved_and_loads(smoke_run, results):
    workdir = smoke_run["workdir"]
    for strategy in ("finetune", "freeze", "scratch"):
        model = baim_jax.load(workdir / "baim" / strategy)
        assert isinstance(model, BAIM) and list(model.tasks) == TASKS
    for task in TASKS:
        model = baim_jax.load(results["toolkit"][task]["path"])
        assert isinstance(model, TaskModel) and model.task == task
        assert model.spec.params.total == results["toolkit"][task]["params"]
        assert model.spec.connections_kept == results["toolkit"][task]["connections_kept"]
    for edge in results["edges"]:
        initial = baim_jax.load(workdir / "edges" / edge["id"] / "initial")
        personal = baim_jax.load(workdir / "edges" / edge["id"] / "personalized")
        assert isinstance(initial, EdgeModel) and initial.task == edge["task"]
        assert initial.spec.params.total == edge["params"]
        assert isinstance(personal, TaskModel) and personal.task == edge["task"]
    assert isinstance(baim_jax.load(workdir / "fl"), EdgeModel)
    assert isinstance(baim_jax.load(workdir / "central"), EdgeModel)


def test_every_edge_is_scored_before_and_after_personalisation(results):
    """The same measures before and after (whether personalisation helps is a result of the
    run, reported, not a property of the code)."""
    for edge in results["edges"]:
        for when in ("initial", "personalized"):
            loss, nll = edge[f"test_loss_{when}"], edge[f"test_nll_{when}"]
            assert math.isfinite(loss) and math.isfinite(nll) and 0 < nll, edge["id"]
            assert math.isclose(sum(edge[f"test_loss_{when}_parts"].values()), loss,
                                rel_tol=1e-6)


def test_report_and_figures(smoke_run, results):
    workdir = smoke_run["workdir"]
    report = (workdir / "report.md").read_text()
    for word in ("finetune", "freeze", "scratch", "fl", "upload bytes", "edge_00", "FID",
                 "not Inception", "floor", "The paper's claims"):
        assert word in report
    assert len(results["claims"]) == 5
    for c in results["claims"]:
        assert c["held"] in ("yes", "partly", "no") and f"| {c['claim']} | {c['held']} |" in report
    for name in ["test_loss_curves.png", "fid.png", "personalization.png",
                 "samples_edges_initial.png", "samples_cloud.png",
                 "samples_edges_personalized.png"]:
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name})" in report


def test_results_record_config_versions_and_split(smoke_run, results):
    assert results["config"]["edges"][0]["encoder"] == [32]
    assert {"jax", "flax", "optax", "orbax"} <= set(results["versions"])
    split = json.loads((smoke_run["workdir"] / "split.json").read_text())
    parts = [split["test"], split["cloud"], *split["edges"]]
    together = np.concatenate(parts)
    assert len(together) == len(set(together.tolist()))  # no image in two places
    assert [len(e) for e in split["edges"]] == results["data"]["edges"]
    per_task = results["data"]["test_per_task"]  # what each task's FID draws (and its grid)
    assert list(per_task) == results["config"]["task_names"] and all(per_task.values())
    assert sum(per_task.values()) == results["data"]["test"] == len(split["test"])


def test_finished_run_is_not_redone(smoke_run):
    workdir = smoke_run["workdir"]
    stamps = {p: p.stat().st_mtime_ns for p in (workdir / "phases").iterdir()}
    models = (workdir / "baim" / "finetune" / "spec.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert main(["run", "--config", SMOKE, "--workdir", str(workdir)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (workdir / "phases").iterdir()} == stamps
    assert (workdir / "baim" / "finetune" / "spec.json").stat().st_mtime_ns == models
    assert time.perf_counter() - start < 60


def _comparable(results: dict, workdir: Path) -> dict:
    """results.json without wall times and checkpoint bytes on disk (orbax's metadata varies
    from save to save), and with paths relative to the workdir."""
    out = json.loads(json.dumps(results).replace(str(workdir), "WORKDIR"))
    for row in out["approaches"].values():
        row.pop("wall_seconds")
    for row in out["toolkit"].values():
        row.pop("bytes")
    out.pop("phases")
    return out


# What each phase leaves in a run directory beside its record and its epoch checkpoints.
PHASE_OUTPUTS = {"personalize": ["edges/*/personalized"], "fl": ["fl"], "central": ["central"]}


def _seed(smoke: Path, workdir: Path, unfinished: list[str]) -> None:
    """``workdir``: a copy of the finished smoke run in which the phases ``unfinished`` never
    ran (their records and outputs gone, and the results, report and figures with them)."""
    shutil.copytree(smoke, workdir)
    for name in unfinished:
        (workdir / "phases" / f"{name}.json").unlink()
        for pattern in PHASE_OUTPUTS[name]:
            for path in workdir.glob(pattern):
                shutil.rmtree(path)
    for path in [workdir / "results.json", workdir / "report.md", *workdir.glob("*.png")]:
        path.unlink()


def _run_until(workdir: Path, marker: str, timeout: float = 300) -> None:
    """Runs the smoke pipeline in a subprocess and kills it (SIGKILL) once ``marker`` exists.
    The subprocess is given ``workdir`` relative to its working directory."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "baim_jax.cli", "run", "--config", SMOKE, "--workdir",
         workdir.name], cwd=workdir.parent, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=os.environ)
    deadline = time.monotonic() + timeout
    try:
        while not (workdir / marker).exists():
            assert proc.poll() is None, f"the run ended before {marker} appeared"
            assert time.monotonic() < deadline, f"{marker} did not appear"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def test_killed_run_resumes_to_the_same_results(smoke_run, results, tmp_path, capfd):
    """The smoke run with its last phase (central, 4 epochs) still to do, killed once that
    phase's second epoch is saved; that checkpoint is then damaged (bytes overwritten, as a
    crash can leave them). The rerun skips the finished phases, sets the damaged epoch aside
    with one warning, resumes after epoch 1 and ends with the uninterrupted run's results;
    stderr holds no traceback."""
    workdir = tmp_path / "run"
    _seed(smoke_run["workdir"], workdir, ["central"])
    finished = {p: p.stat().st_mtime_ns for p in (workdir / "phases").iterdir()}
    _run_until(workdir, "ckpt/central/2")
    assert not (workdir / "phases" / "central.json").exists()
    assert (workdir / "ckpt" / "central" / "1").is_dir()  # the last two epochs are kept
    data = max((p for p in (workdir / "ckpt" / "central" / "2" / "state").rglob("*")
                if p.is_file()), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as fh:
        fh.seek(data.stat().st_size // 2)
        fh.write(b"\xff" * 256)
    capfd.readouterr()
    assert main(["run", "--config", SMOKE, "--workdir", str(workdir)]) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err
    warning = [line for line in err.replace("\r", "\n").splitlines() if "warning" in line]
    # Where the bytes land (raw values or compressed chunk data) varies with orbax's layout:
    # either reason is right; test_rundir.py reaches each one on purpose.
    assert len(warning) == 1 and re.search(
        r"ckpt/central/2: (its arrays are not the ones saved|it cannot be restored \(\w+\));",
        warning[0])
    assert warning[0].endswith("the phase resumes after epoch 1")
    assert (workdir / "ckpt" / "set_aside" / "central-2").is_dir()
    resumed = json.loads((workdir / "results.json").read_text())
    assert _comparable(resumed, workdir) == _comparable(results, smoke_run["workdir"])
    assert not (workdir / "ckpt" / "central").exists()
    assert {p: p.stat().st_mtime_ns for p in finished} == finished


def _mounts_tmpfs() -> bool:
    """Whether this machine lets a user namespace mount a tmpfs."""
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _mounts_tmpfs(), reason="no tmpfs in a user namespace here")
def test_a_full_disk_is_one_line_and_the_rerun_resumes(smoke_run, results, tmp_path):
    """The smoke run with its last two phases still to do, on a file system (a tmpfs in a
    user namespace) with 2 MB free: FedAvg's checkpoints fill it. The run ends with one
    error line naming the file it could not write and saying to rerun, no traceback, and every
    phase it had finished intact. Given room (the same file system, remounted larger), the
    same command resumes and ends as the uninterrupted run."""
    seed, mnt = tmp_path / "seed", tmp_path / "small"
    _seed(smoke_run["workdir"], seed, ["fl", "central"])
    mnt.mkdir()
    run = f"{sys.executable} -m baim_jax.cli run --config {SMOKE} --workdir {mnt}/run"
    script = (f"mount -t tmpfs -o size=400m tmpfs {mnt} && cp -a {seed} {mnt}/run && "
              f"used=$(df -k --output=used {mnt} | tail -1) && "
              f"mount -o remount,size=$((used + 2048))k {mnt} && "
              f"{{ {run} 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1; "
              f"ls {mnt}/run/phases > {tmp_path}/phases1; "
              f"mount -o remount,size=400m {mnt} && {run} 2> {tmp_path}/err2; "
              f"echo $? > {tmp_path}/rc2; cp {mnt}/run/results.json {tmp_path}/; }}")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=600,
                   stdout=subprocess.DEVNULL, env=os.environ)
    err1 = (tmp_path / "err1").read_text().replace("\r", "\n")
    assert (tmp_path / "rc1").read_text().strip() == "2"
    assert "Traceback" not in err1
    errors = [line for line in err1.splitlines() if line.startswith("baim-jax: error:")]
    assert len(errors) == 1, errors
    assert f"no space left on device writing {mnt}/run/" in errors[0]
    assert "rerun the same command" in errors[0]
    finished = sorted((tmp_path / "phases1").read_text().split())
    assert finished == sorted(p.name for p in (seed / "phases").iterdir())
    assert (tmp_path / "rc2").read_text().strip() == "0"
    assert "Traceback" not in (tmp_path / "err2").read_text()
    resumed = _comparable(json.loads((tmp_path / "results.json").read_text()), mnt / "run")
    assert resumed == _comparable(results, smoke_run["workdir"])
