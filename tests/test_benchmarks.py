"""The benchmark scripts run and print the JSON they promise (a smoke test: nothing is timed
against a goal here; speed goals live in benchmarks/)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import chex
import jax

ROOT = Path(__file__).resolve().parents[1]


def _step_scaling():
    path = ROOT / "benchmarks" / "step_scaling.py"
    spec = importlib.util.spec_from_file_location("step_scaling", path)
    step_scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_scaling)
    return step_scaling, path


# Small learners (8x8 images) so that compiling stays cheap; routing, connections and
# capacities do not depend on the learners' widths.
SMALL = ["--hidden", "16", "--latent", "4", "--image-size", "8", "--matmul-size", "64"]


def test_step_scaling_prints_its_json(monkeypatch, capsys, tmp_path):
    step_scaling, path = _step_scaling()
    monkeypatch.setattr(sys, "argv", [str(path), "--sizes", "2", "4", "--repeats", "2",
                                      *SMALL, "--trace", str(tmp_path / "trace")])
    with jax.numpy_dtype_promotion("standard"):  # as the script runs (conftest makes it strict)
        step_scaling.main()
    result = json.loads(capsys.readouterr().out)
    assert result["learner"]["encoder"] == [16] and result["learner"]["image_shape"] == [8, 8, 1]
    for key in ("seconds_per_grad", "seconds_per_train_step", "seconds_per_grad_dense",
                "seconds_per_grad_no_connections", "seconds_per_grad_pool_only",
                "grad_over_pool_only"):
        assert set(result[key]) == {"2", "4"} and all(v > 0 for v in result[key].values())
    assert result["ratio_4_over_2"] > 0 and 0 < result["fraction_of_matmul"]
    assert result["ratio_4_over_2_pool_only"] > 0
    assert result["grad_flops_per_s"] > 0 and result["matmul_flops_per_s"] > 0
    # Learners of 64 * 16 + 16 * (2 * 4) + 4 * 16 + 16 * 64 = 2240 MACs (4480 FLOPs) an image,
    # K = 2 of them on each of 256 images, forward and backward (3 times the forward).
    assert result["useful_flops_per_grad"] == 3 * 2 * 256 * 4480
    load = result["load"]["4"]
    # Balanced routing: every learner gets B K / N = 128 rows of its own; learner m also feeds
    # m+1, whose 128 rows are the other half of the batch, so the busiest learner needs all 256.
    assert load["active_learners_per_example"] == 2 and load["capacity"] == 256
    # A feeder runs only the stages before the input its connection leaves from, never the
    # output stage: only the learner's own 128 rows run that.
    assert load["capacity_per_position"][-1] == 128
    assert 1.0 < load["executed_over_useful"] < 2.0 and 0 < result["fraction_of_matmul_executed"]
    assert load["kept_connections"] == 4
    assert list((tmp_path / "trace").rglob("*.trace.json.gz"))
    assert result["peak_flops"] is None and "mfu" not in result  # no peak known for a CPU


def test_step_scaling_times_the_variants_asked_for_with_mfu(monkeypatch, capsys):
    # A device's busy configuration skips the dense path (N times the memory): only the
    # variants asked for are built and timed, and a given peak gives the MFU of each size.
    step_scaling, path = _step_scaling()
    monkeypatch.setattr(sys, "argv", [str(path), "--sizes", "2", "--repeats", "1", *SMALL,
                                      "--batch", "64", "--variants",
                                      "seconds_per_grad_no_connections", "--peak-flops", "1e12"])
    with jax.numpy_dtype_promotion("standard"):
        step_scaling.main()
    result = json.loads(capsys.readouterr().out)
    assert result["batch"] == 64 and result["load"]["2"]["capacity"] == 64
    assert "seconds_per_grad_dense" not in result and "grad_over_pool_only" not in result
    useful = result["useful_flops_per_grad"]
    for key, variant in (("mfu", "seconds_per_grad"),
                         ("mfu_no_connections", "seconds_per_grad_no_connections")):
        assert result[key]["2"] == useful / result[variant]["2"] / 1e12
    assert result["fraction_of_matmul_no_connections"] > 0


def test_serve_prints_its_json(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--tasks", "2", "--learners",
         "2", "--requests", "6", "--num", "2"], capture_output=True, text=True, check=True,
        timeout=600)
    result = json.loads(out.stdout)
    latency = result["latency_seconds"]
    # Two tasks, room for one: the first request misses, so does every change of task.
    assert latency["miss"]["count"] >= 1
    assert latency["hit"]["count"] + latency["miss"]["count"] == 6
    assert result["hit_ratio"] == latency["hit"]["count"] / 6
    assert result["bytes_downloaded"] >= latency["miss"]["count"] * (
        result["toolkit_bytes"] // 2 // 2)
    assert result["toolbox_capacity_bytes"] < result["toolkit_bytes"]
    assert result["requests_per_second"] > 0 and sum(result["requests_per_task"]) == 6


def test_stacked_matmul_times_the_pools_contractions(monkeypatch, capsys):
    path = ROOT / "benchmarks" / "stacked_matmul.py"
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("stacked_matmul", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # The three gradients are those of the two forwards (what the pool's backward runs).
    x, h = jax.random.normal(jax.random.key(0), (3, 5, 784)), jax.random.normal(
        jax.random.key(1), (3, 5, 256))
    w1, w2 = jax.random.normal(jax.random.key(2), (3, 784, 256)), jax.random.normal(
        jax.random.key(3), (3, 256, 784))
    g1, g2 = jax.random.normal(jax.random.key(4), (3, 5, 256)), jax.random.normal(
        jax.random.key(5), (3, 5, 784))
    op = {name: fn for name, (fn, _, _) in bench.OPS.items()}
    _, back1 = jax.vjp(op["enc_forward"], x, w1)
    _, back2 = jax.vjp(op["out_forward"], h, w2)
    close = dict(rtol=1e-5, atol=1e-3)
    chex.assert_trees_all_close(op["enc_kernel_grad"](x, g1), back1(g1)[1], **close)
    chex.assert_trees_all_close(op["out_input_grad"](g2, w2), back2(g2)[0], **close)
    chex.assert_trees_all_close(op["out_kernel_grad"](h, g2), back2(g2)[1], **close)
    monkeypatch.setattr(sys, "argv", [str(path), "--sizes", "4", "32", "--repeats", "1"])
    bench.main()
    result = json.loads(capsys.readouterr().out)
    assert result["4"]["rows_per_learner"] == 128 and result["32"]["rows_per_learner"] == 16
    assert set(result["32"]["seconds"]) == set(bench.OPS) and result["sum_ratio_32_over_4"] > 0


def test_step_profile_attributes_the_steps_time_to_its_kernels():
    # The smoke config's BAIM (small; the case study's is the default) in its own process, as
    # the kernel trace events need their XLA flag before JAX starts.
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--config",
         str(ROOT / "configs" / "smoke.py"), "--steps", "1", "--top", "3"],
        capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(out.stdout)
    assert "--xla_cpu_enable_xprof_traceme=true" in result["xla_flags"]
    assert result["wall_ms"] > 0 and result["thread_ms"] and result["cores_busy"] > 0
    families = result["families"]
    # The learners' matmuls are kernels of their own (XNNPACK's or Eigen's), the sums of the
    # families are the kernels' time, and no family keeps the number of one instruction.
    assert {"ynn_fusion", "dot"} & set(families)
    assert abs(sum(families.values()) - result["kernel_ms"]) < 0.05
    assert not any(name[-1].isdigit() for name in families)
    top = result["top"]
    assert len(top) == 3 and top[0]["ms"] >= top[1]["ms"] >= top[2]["ms"]
    # Each listed kernel is an instruction of the compiled step (XLA's own copies carry no
    # JAX op name).
    assert all(t["shape"] for t in top)
    assert any(t["op_name"].startswith("jit(_train_step)") for t in top)
    assert result["stored_learner_params"] >= result["real_learner_params"] > 0
    # The storage bound: the groups' shapes hold no more entries than the stacked leaves.
    storage = result["storage"]
    assert storage["adam_entries"]["stored"] >= storage["adam_entries"]["group_shapes"] > 0
    assert all(v > 0 for v in storage["adam_ms"].values())
    assert math.isfinite(storage["group_cuts_ms"])
