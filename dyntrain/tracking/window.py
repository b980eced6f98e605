"""The statistics of one logging window: the steps between two progress lines.

The trainer adds every step's record (``samples``, ``loss``, ``data_wait_s``, ``variant``,
``step_time_s``; for a step of several variants also ``variants``, ``losses`` and ``pass_s``) and, at the window's end, turns it into the metrics every tracker receives. The
figures are identical on every rank except the times.
"""
from __future__ import annotations

import time
from typing import Any

from dyntrain.tracking.account import forward_shares


class StepWindow:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.samples = 0
        self.loss_sum = 0.0
        self.data_wait = 0.0
        self.per_variant: dict[str, list[float]] = {}  # name -> [steps, loss sum, seconds]

    def add(self, m: dict[str, Any]) -> None:
        self.steps += 1
        self.samples += m["samples"]
        self.loss_sum += m["loss"]
        self.data_wait += m["data_wait_s"]
        variants = m.get("variants") or (m["variant"],)
        if len(variants) == 1:
            pv = self.per_variant.setdefault(variants[0], [0, 0.0, 0.0])
            pv[0] += 1
            pv[1] += m["loss"]
            pv[2] += m["step_time_s"]
            return
        # a step of several variants (sandwich): each one's own L1, and its share of the step time
        # in proportion to its measured forward time (as the GPU-hour account splits it)
        for v, share in zip(variants, forward_shares(variants, m.get("pass_s"))):
            pv = self.per_variant.setdefault(v, [0, 0.0, 0.0])
            pv[0] += 1
            pv[1] += m.get("losses", {}).get(v, float("nan"))
            pv[2] += m["step_time_s"] * share

    def metrics(self, lr: float) -> dict[str, float]:
        """loss, lr, patches_per_s, step_time_s, data_wait_frac, and loss_<v> / step_time_<v> per
        variant trained in the window."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out: dict[str, float] = {
            "loss": self.loss_sum / self.steps,
            "lr": lr,
            "patches_per_s": self.samples / elapsed,
            "step_time_s": elapsed / self.steps,
            "data_wait_frac": self.data_wait / elapsed,
        }
        for name, (n, loss_sum, secs) in sorted(self.per_variant.items()):
            out[f"loss_{name}"] = loss_sum / n
            out[f"step_time_{name}"] = secs / n
        return out
