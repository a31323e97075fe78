"""What do the learner pool's big stacked contractions cost, alone, as N grows at fixed K?

The floor under ``step_scaling.py``'s ratio goal: at batch B and K active learners, each of N
learners runs on B K / N rows, so the FLOPs of a step stay fixed while the weights read and
the gradients written grow with N. This times the five contractions of the benchmark learner
(784-256-2x32 / 32-256-784) that touch its two 784x256 kernels, each alone and jitted, on
stacked ``[N, rows, in] x [N, in, out]`` operands as the pool runs them (``vmap`` of a 2-D
matmul):

- ``enc_forward``: image rows times the first encoder kernel;
- ``enc_kernel_grad``: that kernel's gradient;
- ``out_forward``: decoder hidden rows times the output kernel;
- ``out_input_grad``: the gradient flowing back through the output kernel;
- ``out_kernel_grad``: the output kernel's gradient.

Prints one JSON object: per N the median seconds of each, their sum, the FLOP rate of each,
``sum_ratio_32_over_4`` and the 2048^2 float32 matmul's rate for scale.

    python benchmarks/stacked_matmul.py [--sizes 4 32] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json

import jax
from step_scaling import BATCH, K, interleaved_medians, matmul_call

IMAGE, HIDDEN = 784, 256


def _stacked(fn):
    """``fn`` on one learner's 2-D operands, mapped over the leading learner axis."""
    return jax.jit(jax.vmap(fn))


OPS = {  # name: (function of (rows operand, other operand), rows operand width, other shape)
    "enc_forward": (_stacked(lambda x, w: x @ w), IMAGE, (IMAGE, HIDDEN)),
    "enc_kernel_grad": (_stacked(lambda x, g: x.T @ g), IMAGE, ("rows", HIDDEN)),
    "out_forward": (_stacked(lambda h, w: h @ w), HIDDEN, (HIDDEN, IMAGE)),
    "out_input_grad": (_stacked(lambda g, w: g @ w.T), IMAGE, (HIDDEN, IMAGE)),
    "out_kernel_grad": (_stacked(lambda h, g: h.T @ g), HIDDEN, ("rows", IMAGE)),
}


def calls(n: int) -> dict:
    """Zero-argument calls of every op at pool size ``n`` (rows per learner B K / n)."""
    rows = BATCH * K // n
    key = jax.random.key(n)
    out = {}
    for name, (fn, width, other) in OPS.items():
        a = jax.random.normal(key, (n, rows, width))
        b = jax.random.normal(jax.random.fold_in(key, 1),
                              (n, *(rows if d == "rows" else d for d in other)))
        out[name] = (lambda f, a, b: lambda: f(a, b))(fn, a, b)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    flops = 2 * BATCH * K * IMAGE * HIDDEN  # each op, at every N
    timed = {(n, name): fn for n in args.sizes for name, fn in calls(n).items()}
    timed[("matmul", "")] = matmul_call()
    seconds = interleaved_medians(timed, args.repeats)
    result = {"device": jax.devices()[0].device_kind, "batch": BATCH, "k": K,
              "flops_per_op": flops, "repeats": args.repeats,
              "matmul_flops_per_s": 2 * 2048 ** 3 / seconds.pop(("matmul", ""))}
    for n in args.sizes:
        ops = {name: seconds[(n, name)] for name in OPS}
        result[str(n)] = {"rows_per_learner": BATCH * K // n, "seconds": ops,
                          "seconds_sum": sum(ops.values()),
                          "flops_per_s": {k: flops / v for k, v in ops.items()}}
    if {4, 32} <= set(args.sizes):
        result["sum_ratio_32_over_4"] = result["32"]["seconds_sum"] / result["4"]["seconds_sum"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
