"""The paper's claims (docs/design.md §1), each checked against a run's results: held, partly
held or not, with the figures it rests on. Likelihoods are the importance-weighted test NLL,
quality the FID; lower is better for both."""

from __future__ import annotations

STRATEGIES = ("finetune", "freeze", "scratch")
MEASURES = (("test NLL", "test_nll"), ("FID", "fid"))


def _verdict(held: list[bool]) -> str:
    return "yes" if all(held) else ("no" if not any(held) else "partly")


def _ranked(rows: dict, key: str) -> str:
    order = sorted(rows, key=lambda n: rows[n][key])
    return " < ".join(f"{n} {rows[n][key]:.1f}" for n in order)


def _by_measure(rows: dict, test) -> tuple[list[bool], str]:
    held = [test(rows, key) for _, key in MEASURES]
    return held, "; ".join(f"{label}: {_ranked(rows, key)}" for label, key in MEASURES)


def _oscillates_then_converges(curve: list) -> tuple[list[bool], str]:
    """Oscillates: a measured point of the first half above the one before; converges: the
    last step changes the loss by less than 1%."""
    points = [v for v in curve if v is not None]
    half = points[: max(2, (len(points) + 1) // 2)]
    oscillates = any(b > a for a, b in zip(half, half[1:]))
    converges = len(points) > 1 and abs(points[-1] - points[-2]) < 0.01 * abs(points[-2])
    figures = (f"test loss {' -> '.join(f'{v:.1f}' for v in points)}: "
               f"{'rises' if oscillates else 'never rises'} in its first half, last step "
               f"{points[-1] - points[-2]:+.1f} ({'under' if converges else 'over'} 1%)"
               if len(points) > 1 else "one point")
    return [oscillates, converges], figures


def check(results: dict) -> list[dict]:
    """Each claim the run can check: ``{"claim", "held": "yes" | "partly" | "no",
    "figures"}``; a claim whose approaches did not run is left out."""
    approaches = results["approaches"]
    out = []

    def add(claim, held, figures):
        out.append({"claim": claim, "held": _verdict(held), "figures": figures})

    rows = {n: approaches[n] for n in (*STRATEGIES, "fl") if n in approaches}
    if "finetune" in rows and len(rows) > 1:
        add("fine-tuning is the best approach", *_by_measure(
            rows, lambda r, k: all(r["finetune"][k] < r[n][k] for n in r if n != "finetune")))
    if all(n in rows for n in STRATEGIES):
        add("scratch lies between fine-tuning and freezing", *_by_measure(
            rows, lambda r, k: min(r["finetune"][k], r["freeze"][k]) < r["scratch"][k]
            < max(r["finetune"][k], r["freeze"][k])))
    if "freeze" in approaches:
        add("freezing oscillates early, then converges",
            *_oscillates_then_converges(approaches["freeze"]["test_loss_curve"]))
    if "fl" in rows and len(rows) > 1:
        add("FedAvg is the worst approach", *_by_measure(
            rows, lambda r, k: all(r["fl"][k] > r[n][k] for n in r if n != "fl")))
    edges = results.get("edges", [])
    if edges and "test_nll_personalized" in edges[0]:
        better = {label: [e[f"{key}_personalized"] < e[f"{key}_initial"] for e in edges]
                  for label, key in MEASURES}
        add("personalisation improves every edge", [all(v) for v in better.values()],
            "; ".join(f"{label} better on {sum(v)} of {len(v)} edges"
                      for label, v in better.items()))
    return out
