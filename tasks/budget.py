"""The training budget's stopping rule, shared by stage 4's guard (tasks/train.py `BudgetGuard`), which stops with it, and
stage 3's probe (tasks/probe.py), which plans the steps with it: one rule in one place, imported by both (the probe's
record is read by training, so the rule lives in neither)."""

from __future__ import annotations

import math
import sys


def stop_nearest(elapsed_s: float, next_s: float, final_save_s: float, budget_s: float) -> bool:
    """Whether stopping now ends the run nearer the deadline than one more step: stopping ends at elapsed + the final
    save, going on at elapsed + `next_s` (the step, and a checkpoint due now: a budget stop saves none) + the final save;
    the deadline is nearer the first once it is past their midpoint, i.e. once half the next and the final save reach it.
    `BudgetGuard` decides with it at every step, and the probe plans with it (`planned_steps`)."""
    return elapsed_s + next_s / 2 + final_save_s >= budget_s


def checkpoint_every(step_s: float, checkpoint_every_s: float) -> int:
    """Steps of `step_s` between the guard's checkpoints: one falls due at the first step that ends `checkpoint_every_s`
    or more after the last (its clock restarts after each save, whose time is not a step's). `training.checkpoint_minutes`
    of inf (or so large its seconds are): never, as the guard's clock never reaches it."""
    every = checkpoint_every_s / max(step_s, 1e-9)
    return max(math.ceil(every), 1) if math.isfinite(every) else sys.maxsize


def checkpoints_saved(steps: int, step_s: float, checkpoint_every_s: float) -> int:
    """The checkpoints a run of `steps` steps saves at `step_s` a step (none at the step a budget stop ends it)."""
    return max(steps - 1, 0) // checkpoint_every(step_s, checkpoint_every_s)


def planned_steps(budget_s: float, start_s: float, step_s: float, checkpoint_every_s: float, checkpoint_s: float, final_save_s: float) -> int:
    """The step where `BudgetGuard` stops a run whose steps take `step_s` each, from `start_s` into the budget (launch and
    load), with a checkpoint of `checkpoint_s` due every `checkpoint_every_s` and a final save of `final_save_s`: the
    probe's plan (tasks/probe.py), so the steps a user reads and the warm-up built on them are the run's. At least one
    (the guard decides after a step). The guard's weighing grows with each step, so the first step it stops at is found
    by bisection."""
    step_s = max(step_s, 1e-9)
    every = checkpoint_every(step_s, checkpoint_every_s)

    def stops_after(n: int) -> bool:
        elapsed = start_s + n * step_s + checkpoints_saved(n, step_s, checkpoint_every_s) * checkpoint_s
        return stop_nearest(elapsed, step_s + (checkpoint_s if n % every == 0 else 0.0), final_save_s, budget_s)

    lo, hi = 1, max(math.ceil((budget_s - start_s) / step_s) + 1, 1)  # at hi the steps alone pass the budget: it stops
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stops_after(mid) else (mid + 1, hi)
    return lo
