"""The GPU-hour saving at equal quality: pure functions over validation curves (no MLflow here).

A curve is a list of points ``(gpu_hours, own_steps, psnr)`` of one variant in one run, taken from
the ``val/gpu_hours``, ``val/<v>/own_steps`` and ``val/<v>/psnr`` metrics of its evaluations.

For the dynamic run D (trains every variant) and the separate runs B_v (``schedule.mode=fixed``, one
per variant), with gh_D = the GPU hours of D at its last evaluation and q_v = D's final val PSNR of v:

    gh_separate_to_match[v] = GPU hours B_v needed to reach q_v (first crossing, linear interpolation
                              between evaluations); when B_v never reaches q_v: its whole budget, a
                              lower bound (``reached[v] = False``)
    iso_quality_saving      = 1 - gh_D / sum_v gh_separate_to_match[v]

A bound anywhere makes the sum a lower bound, so the saving is then a lower bound too
(``iso_quality_saving_is_bound``). A negative saving means the separate runs reached D's quality for
fewer GPU hours than D took.

The equal-budget view, per variant: D's final PSNR against B_v's PSNR at the same GPU hours (gh_D,
interpolated in B_v's curve; None when B_v stopped earlier) and at the same number of v's own
iterations (D's final own_steps of v, interpolated in B_v's step axis).
"""
from __future__ import annotations

from typing import Optional, Sequence

from dyntrain.tracking.savings import BASIS_WORDS, EQUAL_VALIDATION_QUALITY


Point = tuple[float, float, float]  # (gpu_hours, own_steps, psnr)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """y at ``x`` on the polyline (xs ascending); None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0]


def hours_to_reach(curve: Sequence[Point], target: float) -> tuple[float, bool]:
    """(GPU hours at which ``curve`` first reaches PSNR ``target``, True), or (its last GPU hours,
    False) when it never does."""
    pts = sorted(curve)
    if not pts:
        raise ValueError("empty validation curve")
    if pts[0][2] >= target:
        return pts[0][0], True
    for (h0, _, q0), (h1, _, q1) in zip(pts, pts[1:]):
        if q1 >= target > q0:
            return h0 + (h1 - h0) * (target - q0) / (q1 - q0), True
    return pts[-1][0], False


def iso_quality(dynamic: dict[str, Sequence[Point]], separate: dict[str, Sequence[Point]]) -> dict:
    """The comparison of the module docstring. ``dynamic``: variant -> D's curve; ``separate``:
    variant -> B_v's curve (every variant of ``dynamic`` needs one)."""
    missing = sorted(set(dynamic) - set(separate))
    if missing:
        raise ValueError(f"no separate baseline curve for variant(s) {', '.join(missing)}")
    out: dict = {"variants": sorted(dynamic), "gh_separate_to_match": {}, "reached": {},
                 "target_psnr": {}, "psnr_separate_same_gpu_hours": {},
                 "psnr_separate_same_own_steps": {}, "own_steps_dynamic": {}}
    gh_dynamic = max(max(p[0] for p in c) for c in dynamic.values())
    out["gh_dynamic"] = gh_dynamic
    for v in out["variants"]:
        final = sorted(dynamic[v])[-1]
        target = final[2]
        hours, reached = hours_to_reach(separate[v], target)
        base = sorted(separate[v])
        out["target_psnr"][v] = target
        out["gh_separate_to_match"][v] = hours
        out["reached"][v] = reached
        out["own_steps_dynamic"][v] = final[1]
        out["psnr_separate_same_gpu_hours"][v] = interpolate(
            [p[0] for p in base], [p[2] for p in base], gh_dynamic)
        by_steps = sorted((p[1], p[2]) for p in base)
        out["psnr_separate_same_own_steps"][v] = interpolate(
            [s for s, _ in by_steps], [q for _, q in by_steps], final[1])
    total = sum(out["gh_separate_to_match"].values())
    out["gh_separate_total"] = total
    out["iso_quality_saving"] = 1.0 - gh_dynamic / total if total > 0 else None
    out["iso_quality_saving_is_bound"] = not all(out["reached"].values())
    return out


def as_metrics(result: dict, axis: str = "gpu_hours") -> dict[str, float]:
    """The comparison as MLflow metrics of the dynamic run (None values left out): ``iso/...`` and
    ``iso_quality_saving`` on the GPU-hour axis, ``iso_<axis>/...`` and ``iso_quality_saving_<axis>``
    on another cost axis."""
    pre = "iso" if axis == "gpu_hours" else f"iso_{axis}"
    m: dict[str, float] = {f"{pre}/gh_dynamic": result["gh_dynamic"],
                           f"{pre}/gh_separate_total": result["gh_separate_total"],
                           f"{pre}/saving_is_lower_bound": float(result["iso_quality_saving_is_bound"])}
    if result["iso_quality_saving"] is not None:
        m["iso_quality_saving" if axis == "gpu_hours" else f"iso_quality_saving_{axis}"] = \
            result["iso_quality_saving"]
    for v in result["variants"]:
        m[f"{pre}/{v}/gh_separate_to_match"] = result["gh_separate_to_match"][v]
        m[f"{pre}/{v}/reached"] = float(result["reached"][v])
        m[f"{pre}/{v}/psnr_dynamic"] = result["target_psnr"][v]
        for key in ("psnr_separate_same_gpu_hours", "psnr_separate_same_own_steps"):
            if result[key][v] is not None:
                m[f"{pre}/{v}/{key}"] = result[key][v]
    return m


def _num(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_result(result: dict, unit: str = "GPU h") -> str:
    """A table per variant and the headline line (costs in ``unit``)."""
    head = ["variant", "dyn PSNR", "own steps", f"sep {unit} to match", f"sep PSNR @ same {unit}",
            "sep PSNR @ same own steps"]
    rows = []
    for v in result["variants"]:
        hours = _num(result["gh_separate_to_match"][v], ".4g")
        rows.append([v, _num(result["target_psnr"][v], ".2f"), _num(result["own_steps_dynamic"][v], ".0f"),
                     hours if result["reached"][v] else f">= {hours} (not reached)",
                     _num(result["psnr_separate_same_gpu_hours"][v], ".2f"),
                     _num(result["psnr_separate_same_own_steps"][v], ".2f")])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    saving = result["iso_quality_saving"]
    bound = " (lower bound: a baseline never reached the dynamic run's PSNR)" \
        if result["iso_quality_saving_is_bound"] else ""
    lines.append(f"dynamic run: {result['gh_dynamic']:.4g} {unit}; separate runs to the same PSNR: "
                 f"{result['gh_separate_total']:.4g} {unit} -> iso_quality_saving="
                 f"{_num(saving, '.4f')} {BASIS_WORDS[EQUAL_VALIDATION_QUALITY]}{bound}")
    return "\n".join(lines)
