"""The guards' budget: how much extra training the guards of a run may do, relative to its fine-tune.

Two guards train models of their own: the learning curve (nested fractions of the training data)
and the from-scratch baseline. Unbounded, they cost more than the fine-tune itself (the default
curve trains on 1.4× the data; the scratch model is a second full fine-tune). `guards.budget` (0.3
by default; null for no limit) caps their training together at that share of the fine-tune's
optimizer steps: the curve shrinks its fractions, the scratch model trains for fewer steps, and
each says so in its details under `budget`. The cap is counted in steps, not seconds, so a run
gives the same figures on any machine and under any load; the seconds each guard took are
reported beside it (metrics.json `timing.guards`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

CURVE_SHARE = 2 / 3  # of the budget, for the curve when the scratch baseline will also train
MIN_CURVE_ROWS = 8  # a curve point trains on at least this many rows
# points (the full-data one included) the budget must leave the curve: err(n) = a·n^(-b) + c has three
# parameters, so three points fit it exactly whatever the data, and the backtest (fit all but the largest,
# predict it) needs a fourth; below this the curve is skipped for lack of budget rather than fitted
MIN_CURVE_POINTS = 4


@dataclass
class GuardBudget:
    """Optimizer steps the guards may still train for (None: no limit)."""

    share: float | None
    fine_tune_steps: int
    used: int = 0
    notes: dict = field(default_factory=dict)  # guard name -> its `budget` details

    @property
    def total(self) -> int | None:
        return None if self.share is None else int(math.floor(self.share * self.fine_tune_steps))

    def remaining(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.used)

    def allot(self, guard: str, others_to_come: bool) -> int | None:
        """Steps `guard` may use now: all that remains, or CURVE_SHARE of it when another guard trains after it."""
        left = self.remaining()
        if left is None:
            return None
        return int(left * CURVE_SHARE) if others_to_come else left

    def spend(self, steps: int) -> None:
        self.used += int(steps)


def min_curve_points(requested: list[float]) -> int:
    """The fewest points the budget may leave the curve: MIN_CURVE_POINTS, or all the recipe asked for when it asked for fewer."""
    return min(MIN_CURVE_POINTS, len(set(requested)))


def curve_fractions(requested: list[float], n_train: int, steps_allowed: int | None, fine_tune_steps: int) -> tuple[list[float], dict | None]:
    """The curve's fractions within `steps_allowed`: each fraction f < 1 trains for about f × the
    fine-tune's steps, so when their sum is over the allowance they are all scaled by the same factor
    (nested subsets still, each at least MIN_CURVE_ROWS rows, the largest dropped while the rounded-up
    steps are still over). Returns (fractions, budget details
    or None when nothing changed)."""
    partial = [f for f in requested if f < 1.0]
    cost = sum(partial) * fine_tune_steps
    if steps_allowed is None or cost <= steps_allowed or not partial:
        return list(requested), None
    scale = steps_allowed / cost
    floor = min(1.0, MIN_CURVE_ROWS / max(1, n_train))
    scaled = sorted({round(max(f * scale, floor), 4) for f in partial})
    scaled = [f for f in scaled if f < 1.0]
    while scaled and sum(math.ceil(round(f * fine_tune_steps, 6)) for f in scaled) > steps_allowed:
        scaled.pop()  # the floor (or a step's rounding up) went over: drop the largest
    out = scaled + [f for f in requested if f >= 1.0]
    largest = max(scaled, default=0.0)
    return out, {"steps_allowed": steps_allowed, "requested_fractions": list(requested), "scaled_by": round(scale, 4),
                 "largest_fraction": largest,
                 "note": f"the learning curve's fractions were scaled by {scale:.2f} to stay within guards.budget "
                         f"({steps_allowed} training steps): its largest partial fit saw {largest:.1%} of the {n_train} training rows"}


class GuardClock:
    """Seconds each guard's measurement took: `with clock("data"): ...`."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    @contextmanager
    def __call__(self, guard: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent[guard] = self.spent.get(guard, 0.0) + time.perf_counter() - started

    def seconds(self, budget: GuardBudget | None = None) -> dict:
        """metrics.json `timing.guards`: `<guard>_seconds` for each guard, their total, and the budget's steps."""
        out = {f"{name}_seconds": round(value, 2) for name, value in self.spent.items()}
        out["total_seconds"] = round(sum(self.spent.values()), 2)
        if budget is not None:
            out["budget"] = {"share": budget.share, "steps_allowed": budget.total, "steps_used": budget.used,
                             "fine_tune_steps": budget.fine_tune_steps}
        return out


def note_budget(guards: dict, budget: GuardBudget | None) -> None:
    """Each guard the budget shortened (or kept from training) says so: details.budget and its summary."""
    if budget is None:
        return
    for name, note in budget.notes.items():
        guard = guards[name]
        guard["details"]["budget"] = note
        if note["note"] not in guard["summary"]:
            guard["summary"] = guard["summary"].rstrip() + f" ({note['note']})"


def memory_refusal(session, method: str, what: str) -> str | None:
    """Why a guard's extra training (`what`, with `method`) would not fit in the memory free now (the
    fine-tuned model is still resident), or None: checked before the guard builds its model."""
    from ..memory import Plan, available_mb, estimate_training_memory, fits

    try:  # the run's own plan (the recipe's batch, length, precision), with this method
        plan = Plan(**{**session.memory_estimate["plan"], "method": method})
        estimate = estimate_training_memory(session.bundle.model, plan)
    except (AttributeError, KeyError, TypeError, ValueError):  # a model the estimate cannot read: train as before
        return None
    have = available_mb(session.device)
    if fits(estimate, session.device, have):
        return None
    return (f"{what} was not run: its training needs about {estimate['total_mb'] / 1024:.1f} GB and "
            f"{have / 1024:.1f} GB is free on the {session.device.type}")
