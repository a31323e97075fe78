#!/usr/bin/env bash
# The accelerator checks of the core as one run, for a machine with a GPU (or TPU) and jax:
#   1. the device and the versions (device.txt);
#   2. benchmarks/step_scaling.py at the CPU's configuration (step_scaling.json, its log
#      beside it) and benchmarks/stacked_matmul.py (stacked_matmul.json);
#   3. step_scaling.py where the device is busy (step_scaling_busy_<hidden>.json): batch and
#      learner widths large enough for the learners' matmuls to fill the device, with its MFU
#      (useful FLOP/s over the card's peak, step_scaling.PEAK_FLOPS) and its fraction of a
#      large matmul's rate; the dense reference path (N times the memory) is left out;
#   4. the tests whose numerics an accelerator changes: the fast paths against the loop
#      reference, training and dispatch (tests.log), in one process (no pytest-xdist needed).
# Every step runs even if one before it failed; the exit status is the tests'.
#
#   bash benchmarks/device_check.sh OUTDIR
#
# STEP_SCALING_ARGS (default "--repeats 50"), BUSY_HIDDEN (default "2048 4096": one busy run
# each, batch 4 x hidden), BUSY_ARGS (appended to each busy run's arguments; a later flag
# wins) and PYTEST_ARGS (default: the three test files) override what the benchmarks and
# pytest are given.
set -uo pipefail
out=${1:?usage: bash benchmarks/device_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$python" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__);
print(jax.devices())"
} > "$out/device.txt" 2>&1

# shellcheck disable=SC2086  # the arguments are meant to split
"$python" benchmarks/step_scaling.py ${STEP_SCALING_ARGS:---repeats 50} \
  > "$out/step_scaling.json" 2> "$out/step_scaling.log"
echo "step_scaling: exit $?" >> "$out/device.txt"
"$python" benchmarks/stacked_matmul.py > "$out/stacked_matmul.json" 2> "$out/stacked_matmul.log"
echo "stacked_matmul: exit $?" >> "$out/device.txt"

for hidden in ${BUSY_HIDDEN:-2048 4096}; do
  # shellcheck disable=SC2086
  "$python" benchmarks/step_scaling.py --sizes 8 32 --repeats 30 --batch $((4 * hidden)) \
    --hidden "$hidden" --matmul-size 8192 \
    --variants seconds_per_grad seconds_per_grad_no_connections seconds_per_train_step \
    ${BUSY_ARGS:-} > "$out/step_scaling_busy_$hidden.json" 2> "$out/step_scaling_busy_$hidden.log"
  echo "step_scaling busy (hidden $hidden): exit $?" >> "$out/device.txt"
done

# shellcheck disable=SC2086
"$python" -m pytest -q -o addopts="" -p no:cacheprovider \
  ${PYTEST_ARGS:--k "not four_devices" tests/test_equivalence.py tests/test_training.py tests/test_dispatch_units.py} \
  > "$out/tests.log" 2>&1
status=$?
echo "tests: exit $status" >> "$out/device.txt"
exit $status
