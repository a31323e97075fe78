#!/usr/bin/env bash
# The accelerator checks of the core as one run, for a machine with a GPU (or TPU) and jax:
#   1. the device and the versions (device.txt);
#   2. benchmarks/step_scaling.py (step_scaling.json, its log beside it) and
#      benchmarks/stacked_matmul.py (stacked_matmul.json);
#   3. the tests whose numerics an accelerator changes: the fast paths against the loop
#      reference, training and dispatch (tests.log), in one process (no pytest-xdist needed).
# Every step runs even if one before it failed; the exit status is the tests'.
#
#   bash benchmarks/device_check.sh OUTDIR
#
# STEP_SCALING_ARGS (default "--repeats 50") and PYTEST_ARGS (default: the three test files)
# override what the benchmark and pytest are given.
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

# shellcheck disable=SC2086
"$python" -m pytest -q -o addopts="" -p no:cacheprovider \
  ${PYTEST_ARGS:--k "not four_devices" tests/test_equivalence.py tests/test_training.py tests/test_dispatch_units.py} \
  > "$out/tests.log" 2>&1
status=$?
echo "tests: exit $status" >> "$out/device.txt"
exit $status
