"""Figures over seeds: the mean with a 95% interval, and paired differences between arms.

The interval is Student's t-interval over the per-seed values, ``mean +- t(0.975, K-1) * s / sqrt(K)``
with ``s`` the sample standard deviation of the K seeds. With the handful of seeds a benchmark can
afford (4 on CPU) a bootstrap over seeds has too few distinct resamples to mean anything; the
t-interval is exact when the per-seed values are normal and reasonably robust otherwise. The
quantile is scipy's (``scipy.stats.t``), so any K works, not a table's.

A paired comparison of two arms run on the same seeds takes the per-seed differences and gives their
mean and t-interval: the seed's own luck (data order, initialisation) cancels, so a difference can be
significant even where the two arms' own intervals overlap.

Missing values (``None``: a saving that is undefined for that seed) are left out and counted, never
read as zero.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence


METHOD = "student-t 95% interval over seeds"


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom (scipy)."""
    if not 0.5 < p < 1:
        raise ValueError(f"t_quantile: p must be in (0.5, 1), got {p}")
    if df < 1:
        raise ValueError(f"t_quantile: needs df >= 1, got {df}")
    # lazy: scipy (a dependency) costs ~0.3 s to import; only interval computations need it
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_ci95(values: Sequence[Optional[float]]) -> dict:
    """{"mean", "ci95": [lo, hi], "per_seed", "n", "missing", "method"}. One value: its interval is
    unknown (None, None); none: mean None too."""
    per_seed = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
                for v in values]
    xs = [v for v in per_seed if v is not None]
    out = {"mean": None, "ci95": [None, None], "per_seed": per_seed, "n": len(xs),
           "missing": len(per_seed) - len(xs), "method": METHOD}
    if not xs:
        return out
    mean = sum(xs) / len(xs)
    out["mean"] = mean
    if len(xs) >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        half = t_quantile(0.975, len(xs) - 1) * sd / math.sqrt(len(xs))
        out["ci95"] = [mean - half, mean + half]
    return out


def paired_difference(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> dict:
    """``a - b`` seed by seed (the two lists in the same seed order), with ``mean_ci95``'s fields plus
    ``significant``: the interval excludes 0."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same seeds on both sides: {len(a)} vs {len(b)} values")
    diffs = [None if x is None or y is None else x - y for x, y in zip(a, b)]
    out = mean_ci95(diffs)
    lo, hi = out["ci95"]
    out["significant"] = lo is not None and (lo > 0 or hi < 0)
    return out


def with_bound(values: Sequence[Optional[float]], bounds: Sequence[bool]) -> dict:
    """``mean_ci95`` plus ``bound``: True when any seed's value is only a bound (a target never
    reached within the budget), so the mean is a bound too."""
    out = mean_ci95(values)
    out["bound"] = any(bool(b) for b in bounds)
    out["bound_seeds"] = sum(bool(b) for b in bounds)
    return out


def format_ci(summary: dict, spec: str = ".3f") -> str:
    """``m [lo, hi]`` (and ``(bound)``): how the docs' tables show a figure over seeds."""
    if summary.get("mean") is None:
        return "n/a"
    lo, hi = summary["ci95"]
    text = format(summary["mean"], spec)
    if lo is not None:
        text += f" [{format(lo, spec)}, {format(hi, spec)}]"
    if summary.get("bound"):
        text += " (bound)"
    return text
