"""The saving where it matters: fine-tuned quality from dynamic vs separate pre-training checkpoints.

Pure functions over points ``(cost, iterations, psnr)``: one per pre-training checkpoint of one arm,
``cost`` its pre-training cost on one axis (GPU hours or PFLOP, ``val/<axis>`` at the checkpoint's
step), ``iterations`` the optimizer steps so far, ``psnr`` what that checkpoint reaches after a fixed
fine-tuning budget (or, for the proxy, the pre-training validation PSNR).

For the dynamic run D (trains every variant, cost C_D at its last checkpoint, a share ``w_v`` of which
went to variant v's steps) and the separate runs B_v, per variant v with q_v = D's final PSNR of v:

    cost_to_match[v]   = cost B_v needed to reach q_v: first crossing, interpolated linearly between
                         its checkpoints (from the from-scratch start at cost 0 when one is given);
                         B_v's whole budget when never reached (a lower bound: ``bound``)
    saving[v]          = 1 - w_v C_D / cost_to_match[v]         the share of v's separate
                                                                 pre-training that D saves
    family saving      = 1 - C_D / sum_v cost_to_match[v]        (the paper's S+L comparison)

With two variants drawn at p = 0.5 and no transfer between them, D's v has half the steps of B_v
and saving[v] ~ 0; the paper's claim (each variant as good as if trained alone for all N steps)
is saving[v] ~ 0.5. A saving is undefined (None) when q_v is reached at cost 0 (from scratch already
matches D: pre-training does not matter for v in this regime).

The equal-budget views, per variant: at equal iterations (D's checkpoint at step k vs B_v's at k) and
at equal cost (B_v interpolated at C_D, and at D's share of it, w_v C_D; None beyond B_v's budget).
"""
from __future__ import annotations

from typing import Optional, Sequence

from dyntrain.eval.iso_quality import hours_to_reach, interpolate


Point = tuple[float, float, float]  # (cost, iterations, psnr)


def _curve(points: Sequence[Point], scratch: Optional[float]) -> list[Point]:
    pts = sorted(points)
    if scratch is not None:
        pts = [(0.0, 0.0, float(scratch))] + pts
    return pts


def saving_at_equal_quality(dynamic: dict[str, Sequence[Point]], separate: dict[str, Sequence[Point]],
                            shares: dict[str, float], scratch: Optional[dict[str, float]] = None) -> dict:
    """The comparison of the module docstring on one cost axis. ``dynamic``/``separate``: variant ->
    points; ``shares``: variant -> w_v (fractions of D's cost, summing to ~1); ``scratch``: variant ->
    fine-tuned PSNR from a random start (cost 0), or None (the proxy has no such point)."""
    missing = sorted(set(dynamic) - set(separate))
    if missing:
        raise ValueError(f"no separate run for variant(s) {', '.join(missing)}")
    if any(not dynamic[v] or not separate[v] for v in dynamic):
        raise ValueError("every variant needs at least one point in each arm")
    variants = sorted(dynamic)
    cost_d = max(max(p[0] for p in dynamic[v]) for v in variants)
    out: dict = {"variants": variants, "cost_dynamic": cost_d, "per_variant": {}}
    total = 0.0
    for v in variants:
        final = sorted(dynamic[v])[-1]
        base = _curve(separate[v], (scratch or {}).get(v))
        cost, reached = hours_to_reach(base, final[2])
        total += cost
        w_cost = shares[v] * cost_d
        costs, qs = [p[0] for p in base], [p[2] for p in base]
        out["per_variant"][v] = {
            "target_psnr": final[2], "cost_to_match": cost, "reached": reached, "bound": not reached,
            "dynamic_cost_share": shares[v],
            "saving": None if cost <= 0 else 1.0 - w_cost / cost,
            "separate_psnr_at_dynamic_cost": interpolate(costs, qs, cost_d),
            "separate_psnr_at_dynamic_share": interpolate(costs, qs, w_cost),
            "equal_iterations": equal_iterations(dynamic[v], separate[v]),
        }
    out["cost_separate_total"] = total
    out["family_saving"] = None if total <= 0 else 1.0 - cost_d / total
    out["family_bound"] = any(r["bound"] for r in out["per_variant"].values())
    return out


def equal_iterations(dynamic: Sequence[Point], separate: Sequence[Point]) -> list[dict]:
    """For each of D's checkpoints whose step B_v also has: both PSNRs and D minus B_v."""
    by_step = {int(p[1]): p[2] for p in separate}
    rows = []
    for cost, steps, q in sorted(dynamic):
        if int(steps) in by_step:
            rows.append({"iterations": int(steps), "dynamic": q, "separate": by_step[int(steps)],
                         "dynamic_minus_separate_db": q - by_step[int(steps)]})
    return rows


def pretraining_gain(dynamic_final: dict[str, float], scratch: dict[str, float]) -> dict[str, float]:
    """Fine-tuned PSNR from D's last checkpoint minus from scratch, per variant (dB)."""
    return {v: dynamic_final[v] - scratch[v] for v in dynamic_final if v in scratch}


def cost_shares(per_variant_cost: dict[str, float]) -> dict[str, float]:
    """Each variant's fraction of the dynamic run's cost (equal shares when nothing was measured)."""
    total = sum(max(0.0, c) for c in per_variant_cost.values())
    if total <= 0:
        return {v: 1.0 / len(per_variant_cost) for v in per_variant_cost}
    return {v: max(0.0, c) / total for v, c in per_variant_cost.items()}
