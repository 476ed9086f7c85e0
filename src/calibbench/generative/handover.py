"""The declared hand-over of a generator strategy from the calibration stage to the refinement stage.

The calibration stage warms the generator up (``strategy.py``, ``alternating.warm_up``); the
refinement stage continues its training (``alternating.train_alternating``) or samples from it
(reconstruction on a generator's stream, ``refine.source=generator``). What crosses between the
two is one :class:`GeneratorHandover`, stored in ``CalibrationSet.state`` as a plain dict of
tensors (:meth:`GeneratorHandover.to_state`), so it is cached with the calibration set and loads
with ``torch.load(weights_only=True)``; the refinement side reads it back with
:meth:`GeneratorHandover.from_calibration`, which names the strategy when it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor


@dataclass
class GeneratorHandover:
    """``generator``: the warmed-up generator's ``state_dict`` (CPU); ``optimizer``: its Adam
    state; ``strategy_state``: the method's per-run state after the warm-up (FDDA's centers,
    ClusterQ's centroids and EMA counts), CPU tensors; ``class_counts``: labels generated so far."""

    generator: dict[str, Tensor]
    optimizer: Optional[dict[str, Any]]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    class_counts: Optional[Tensor] = None

    def to_state(self) -> dict[str, Any]:
        """The ``CalibrationSet.state`` dict (keys fixed: cached sets keep loading)."""
        return {"generator": self.generator, "optimizer": self.optimizer, "strategy": self.strategy_state,
                "class_counts": self.class_counts}

    @classmethod
    def from_calibration(cls, calib: Any, who: str) -> "GeneratorHandover":
        """The hand-over in ``calib.state``; a RuntimeError naming ``who`` when the set has none
        (it was not made by a generator strategy)."""
        state = getattr(calib, "state", None) or {}
        if "generator" not in state:
            raise RuntimeError(f"{who}: the calibration set carries no generator state (was it made by a "
                               f"generator strategy?)")
        return cls(state["generator"], state.get("optimizer"), state.get("strategy", {}), state.get("class_counts"))


__all__ = ["GeneratorHandover"]
