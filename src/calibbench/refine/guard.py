"""The divergence guard of every training stage: a loss that explodes stops the run.

Each stage (``refine=kd``/``plf``/generator refiners' quantized-model player, the generator player
and its warm-up, each reconstruction unit) keeps one :class:`LossGuard` per player. On every step:

- a NaN/inf term stops the run (as before), naming the player, the step and the term;
- a total loss above ``guard.factor`` × its value at the stage's first step stops it too: a
  :class:`DivergenceError` naming the stage, the step, the term that grew the most and the
  learning rate to lower. The reference is floored at :data:`FLOOR`, so a loss that starts near 0
  (a W8 model's kd, an empty PLF split) does not trip on noise.

Reconstruction also compares each unit's loss on its whole calibration set after reconstruction
(hard rounding) with the loss before it (nearest rounding): a healthy unit ends at or below its
start, so ``guard.unit_factor`` × the start bounds it (:func:`check_unit`).

Why these defaults (``conf/config.yaml``: ``guard.factor: 1000``, ``guard.unit_factor: 10``):
healthy kd and reconstruction losses fall from their first step (README, docs/results.md: kd
0.14 → 0.1, every unit's loss_end ≤ loss_start at budget=cpu, ≤ 1.05× at the 4 smoke iterations);
a generator's loss can rise after warm-up, by a few times at most, and a single batch's loss can be
a few times the first batch's. 1000× is far outside all of that, while an exploding run passes it
within steps (kd at ``refine.lr=1e9``: 0.14 → 1e16). A unit whose rounding diverged ends many times
above its start (``refine=qdrop refine.lr=1e9``: the first unit 0.065 → 0.85, 13×), healthy units
at most 1.05×: 10 sits between. ``guard.factor=0`` / ``unit_factor=0`` switch a check off.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

from calibbench.config import GuardConfig

FLOOR = 1e-3  # the reference loss is at least this (a loss near 0 at the start)


class DivergenceError(FloatingPointError):
    """A training loss grew past the guard's bound (a FloatingPointError, like a NaN loss)."""


def factors(guard: Optional[GuardConfig]) -> tuple[float, float]:
    """(factor, unit_factor) of the run's ``guard`` config (defaults when absent)."""
    if guard is None:
        return 1000.0, 10.0
    return float(guard.factor), float(guard.unit_factor)


class LossGuard:
    """NaN/inf and divergence checks for one player's loss in one stage."""

    def __init__(self, stage: str, factor: float, steps: int, hint: str) -> None:
        self.stage, self.factor, self.steps, self.hint = stage, float(factor), int(steps), hint
        self.start: Optional[float] = None
        self.term_start: dict[str, float] = {}

    def check(self, terms: Mapping[str, float], step: int, total: Optional[float] = None) -> None:
        """``terms``: the step's unweighted term values; ``total``: the loss minimized (default:
        the sum of the terms). Raises FloatingPointError / DivergenceError."""
        bad = {name: v for name, v in terms.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(
                f"refine: {self.stage} loss term(s) {', '.join(f'{k!r} = {v}' for k, v in bad.items())} "
                f"at step {step} of {self.steps}; {self.hint} or check the stream's images")
        value = float(sum(terms.values()) if total is None else total)
        if not math.isfinite(value):
            raise FloatingPointError(f"refine: {self.stage} loss = {value} at step {step} of {self.steps}; "
                                     f"{self.hint}")
        if self.start is None:
            self.start = value
            self.term_start = dict(terms)
            return
        bound = self.factor * max(abs(self.start), FLOOR)
        if self.factor > 0 and value > bound:
            name = max(terms, key=lambda k: terms[k] / max(abs(self.term_start.get(k, 0.0)), FLOOR))
            raise DivergenceError(
                f"refine: {self.stage} loss diverged at step {step} of {self.steps}: {value:.4g} > "
                f"guard.factor={self.factor:g} x {self.start:.4g} (its value at the first step); term "
                f"{name!r} = {terms[name]:.4g} (first step: {self.term_start.get(name, float('nan')):.4g}). "
                f"{self.hint[0].upper()}{self.hint[1:]}")


def check_unit(stage: str, unit: str, loss_start: float, loss_end: float, unit_factor: float,
               hint: str) -> None:
    """A reconstruction unit whose whole-set loss ended above ``unit_factor`` × its start."""
    if not math.isfinite(loss_end):
        raise FloatingPointError(f"refine: {stage} unit {unit!r}: loss after reconstruction = {loss_end}; {hint}")
    if unit_factor > 0 and loss_end > unit_factor * max(loss_start, FLOOR):
        raise DivergenceError(
            f"refine: {stage} unit {unit!r} diverged: term 'recon' on the calibration set = {loss_end:.4g} "
            f"after its iterations > guard.unit_factor={unit_factor:g} x {loss_start:.4g} before them. "
            f"{hint[0].upper()}{hint[1:]}")
