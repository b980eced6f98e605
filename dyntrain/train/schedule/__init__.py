"""What each optimizer step trains: the variant draw and the training recipes.

``draw``     the variant of every global iteration (a pure function of seed, step and the
             probability table), the step plans of the recipes, the cross-rank check
``recipes``  the per-micro-batch objective of a plan (sandwich sums, in-place distillation) and the
             cost-aware probabilities recomputed after each validation
"""
from dyntrain.train.schedule.draw import (StepPlan, VariantMismatchError, VariantSchedule, new_verify_group, splitmix64,
                   uniform_at, verify_draw)
from dyntrain.train.schedule.recipes import (CostAwareUpdater, cost_aware_probs, install_cost_aware, plan_loss,
                      restoration_loss)

__all__ = ["StepPlan", "VariantMismatchError", "VariantSchedule", "new_verify_group", "splitmix64",
           "uniform_at", "verify_draw", "CostAwareUpdater", "cost_aware_probs", "install_cost_aware",
           "plan_loss", "restoration_loss"]
