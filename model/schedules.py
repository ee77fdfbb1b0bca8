"""Step schedules of the COTS objective: momentum that rises, a queue that opens and grows,
distillation that fades in. Pure functions of the objective's step count, so a resumed run
(which restores the count) follows the same schedule as an uninterrupted one."""

from __future__ import annotations

import math


def linear_ramp(step: int, start: int, length: int) -> float:
    """0 before ``start``, then rising linearly to 1 over ``length`` steps (a step at
    ``start`` when length is 0)."""
    if step < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (step - start) / length)


def momentum_at(step: int, start: float, final: float | None, ramp_steps: int) -> float:
    """The EMA factor at ``step``: ``start`` rising to ``final`` along a half cosine over
    ``ramp_steps`` (BYOL), then constant; ``start`` throughout when there is no ``final``."""
    if final is None:
        return start
    progress = linear_ramp(step, 0, ramp_steps)
    return final - (final - start) * (1.0 + math.cos(math.pi * progress)) / 2.0
