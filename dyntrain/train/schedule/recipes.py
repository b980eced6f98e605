"""The losses of the training recipes, and the cost-aware draw.

A step's ``StepPlan`` (``dyntrain.train.schedule``) names the variants that train on it. For each
micro-batch ``plan_loss`` runs them in the plan's order and returns the objective of one backward
pass (DeepSpeed reduces each gradient once per micro-batch, so the losses are summed first and
``engine.backward`` runs once):

    paper / fixed        L1(v(x), y)                                   (one variant)
    sandwich             sum_v w_v * L1(v(x), y)                       (every active variant)
    + distill (teacher T) a student s != T adds  distill_weight * L1(s(x), sg(T(x)))
                         where sg = detach: no gradient reaches the weights through the target

L1 is ``restoration_loss``: the output clamped to [0, 1], in fp32. In sandwich mode T(x) is the
teacher's own training pass of the same micro-batch (it runs first), so distillation costs no extra
forward. In dynamic mode a step whose drawn variant is a student runs T forward without gradient
first, every ``schedule.distill.every`` steps: the extra cost is one forward of T (about a third of a
T step), paid only on the steps that use it, instead of running T's training pass every step as a
sandwich would. The per-variant L1 (without the distillation term) is reported as ``loss_<v>``.

Cost-aware probabilities (``schedule.variant_probs: cost_aware``) are recomputed after every
validation from figures that every rank holds identically and that a resumed run reproduces exactly
(the all-reduced validation PSNR, and each variant's cost from the model and the config):

    gap_v   = max_u psnr_u - psnr_v + headroom_db     (how far v is below the best variant)
    share_v = gap_v / sum_u gap_u                     (the share of GPU time v should get)
    p_v     ~ share_v / c_v                           (c_v: v's cost per step, its forward FLOPs at the
                                                       crop size: cheap steps are drawn more often
                                                       for the same GPU time)
    then every p_v is raised to at least min_prob and the whole renormalised.

The cost is the FLOP count, not the measured step time: measured times differ from run to run (and
between an interrupted run and its resumption), so probabilities built on them would make the draw
after a resume differ from the uninterrupted run's. With FLOPs the whole table is a function of
(seed, config, validation history). The table is also saved with checkpoints and logged as
``schedule/p_<v>`` metrics.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from dyntrain.logs import get_logger
from dyntrain.train.callbacks import StepContext
from dyntrain.train.schedule.plans import StepPlan


log = get_logger(__name__)

Forward = Callable[[torch.Tensor, tuple], torch.Tensor]


def restoration_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the output clamped to [0, 1] and the target, in fp32."""
    return F.l1_loss(output.float().clamp(0.0, 1.0), target.float())


def plan_loss(forward: Forward, plan: StepPlan, variants: Mapping[str, Sequence[int]], x: torch.Tensor,
              y: torch.Tensor, mark: Optional[Callable[[str], None]] = None
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(objective of the micro-batch, per-variant L1 in plan order) for ``plan`` (module docstring).
    ``mark(label)`` is called after each pass ("teacher" for a no-gradient teacher forward, else the
    variant), so that the caller can time the passes."""
    target: Optional[torch.Tensor] = None
    if plan.teacher_pass:
        with torch.no_grad():
            target = forward(x, tuple(variants[plan.teacher])).detach().float().clamp(0.0, 1.0)
        if mark is not None:
            mark("teacher")
    total: Optional[torch.Tensor] = None
    parts = []
    for name, weight in zip(plan.variants, plan.weights):
        out = forward(x, tuple(variants[name]))
        l1 = restoration_loss(out, y)
        objective = l1
        if plan.teacher is not None:
            if name == plan.teacher and not plan.teacher_pass:
                target = out.detach().float().clamp(0.0, 1.0)
            elif name != plan.teacher and target is not None and plan.distill_weight:
                objective = l1 + plan.distill_weight * F.l1_loss(out.float().clamp(0.0, 1.0), target)
        term = objective * weight if weight != 1.0 else objective
        total = term if total is None else total + term
        parts.append(l1)
        if mark is not None:
            mark(name)
    assert total is not None
    return total, parts


# ----------------------------------------------------------------------------------- cost-aware
def cost_aware_probs(psnr: Mapping[str, float], cost: Mapping[str, float], headroom_db: float,
                     min_prob: float) -> dict[str, float]:
    """The probabilities of the module docstring (variants in ``psnr``; ``cost`` > 0 each)."""
    names = sorted(psnr)
    best = max(psnr[n] for n in names)
    gap = {n: best - psnr[n] + headroom_db for n in names}
    total_gap = sum(gap.values())
    raw = {n: gap[n] / total_gap / cost[n] for n in names}
    s = sum(raw.values())
    p = {n: raw[n] / s for n in names}
    floor = min(min_prob, 1.0 / len(names))
    # raise the starved ones to the floor, take the difference from the others in proportion
    low = {n for n in names if p[n] < floor}
    if low:
        rest = 1.0 - floor * len(low)
        high_total = sum(p[n] for n in names if n not in low)
        p = {n: floor if n in low else p[n] / high_total * rest for n in names}
    return p


class CostAwareUpdater:
    """The cost-aware draw: after each validation, set the schedule's probabilities from that
    validation (``cost_aware_probs``) from the next step on. It follows the validation explicitly:
    the job subscribes ``update`` to it (``validation.then(updater.update)``)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @staticmethod
    def costs(ctx: StepContext, names: Sequence[str]) -> dict[str, float]:
        """c_v: forward FLOPs of one sample (the account's work count), or, where the model's FLOPs
        could not be counted, the sum of v's reuse factors (identical on every rank either way)."""
        flops = ctx.account.flops_per_sample
        if all(flops.get(n, 0.0) > 0 for n in names):
            return {n: flops[n] for n in names}
        return {n: float(sum(ctx.schedule.variants[n])) for n in names}

    def update(self, ctx: StepContext, val: Mapping[str, float]) -> Optional[dict[str, float]]:
        schedule, step = ctx.schedule, ctx.step
        names = [n for n in schedule.names if f"val/{n}/psnr" in val]
        if len(names) < 2:
            return None
        c = self.cfg.schedule.cost_aware
        probs = cost_aware_probs({n: val[f"val/{n}/psnr"] for n in names}, self.costs(ctx, names),
                                 c.headroom_db, c.min_prob)
        schedule.set_probs(step, probs)
        ctx.tracker.log_metrics({f"schedule/p_{n}": p for n, p in probs.items()}, step=step)
        if ctx.rank == 0:
            log.info(f"[{self.cfg.run.name}] cost-aware draw from step {step}: " +
                     ", ".join(f"{n} {p:.3f}" for n, p in sorted(probs.items())))
        return probs
