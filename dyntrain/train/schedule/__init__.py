"""What each optimizer step trains.

``draw``     the variant of every global iteration and the probability table (pure functions of
             seed, step and the table)
``plans``    ``VariantSchedule``: the step plans of the recipes (dynamic, fixed, sandwich, distill)
``verify``   the optional cross-rank check of the draw
``recipes``  the per-micro-batch objective of a plan (sandwich sums, in-place distillation) and the
             cost-aware probabilities recomputed after each validation
"""
from dyntrain.train.schedule.draw import ProbabilityTable, splitmix64, uniform_at
from dyntrain.train.schedule.plans import StepPlan, VariantSchedule
from dyntrain.train.schedule.recipes import CostAwareUpdater, cost_aware_probs, plan_loss, restoration_loss
from dyntrain.train.schedule.verify import VariantMismatchError, new_verify_group, verify_draw


__all__ = ["ProbabilityTable", "StepPlan", "VariantMismatchError", "VariantSchedule", "new_verify_group",
           "splitmix64", "uniform_at", "verify_draw", "CostAwareUpdater", "cost_aware_probs", "plan_loss",
           "restoration_loss"]
