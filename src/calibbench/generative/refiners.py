"""``refine=gdfq`` (and every generator method's refiner): the refinement stage of a generator
strategy, the generator and the quantized model trained alternately (``alternating.py``).

The refine config holds the *quantized model's* side (loss terms kd/ce/feature, optimizer, lr,
temperature, BN and activation-range modes: as for ``refine=kd``); the generator's side (its
terms, Adam, labels, real batches, state) is the strategy's. Steps: ``budget.refine_steps``
quantized-model steps (each preceded by one generator step), batch ``budget.gen_batch_size``.

A :class:`GeneratorRefiner` declares ``requires = "generator"``: ``refine.validate`` checks before
any work that the strategy trains one (``Strategy.trains_generator``). It reads the calibration
stage's :class:`~calibbench.generative.handover.GeneratorHandover` and, at the end, adds what the
strategy reports from the final state (``GeneratorStrategy.refinement_record``) to the record.

A method with its own quantized-model objective registers a subclass under its name with its
YAML (e.g. ``@register_refiner("fdda") class FDDARefiner(GeneratorRefiner): pass`` plus
``conf/refine/fdda.yaml`` with ``losses: {ce: 1.0, kd: 20.0}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Protocol, cast

from torch import nn

from calibbench.config import ConfigError
from calibbench.refine import _REGISTRY, Refiner, check_feature_modules, empty_record, register

if TYPE_CHECKING:  # strategies/ imports refine/: annotations only
    from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext
    from calibbench.tracking import Tracker


class _RecordsRefinement(Protocol):
    """What the refiner reads of a generator strategy (``generative/strategy.py`` imports this
    module, so the class itself is not imported here, not even for annotations)."""

    def refinement_record(self, state: dict[str, Any]) -> dict[str, Any]: ...


class GeneratorRefiner(Refiner):
    """Alternating generator / quantized-model training; needs a strategy that trains a generator."""

    requires = "generator"

    def run(self, qmodel: nn.Module, teacher: nn.Module, strategy: Strategy, ctx: StrategyContext,
            calib: CalibrationSet, track: Optional[Tracker] = None) -> dict[str, Any]:
        from calibbench.generative.alternating import train_alternating  # Lightning only when training

        if not getattr(strategy, "trains_generator", False):
            raise ConfigError(f"refine={self.cfg.name} trains a generator and needs a generator strategy "
                              f"(gdfq, ...); strategy {getattr(strategy, 'name', strategy)!r} has none. "
                              f"Use refine=kd with it")
        steps = int(ctx.budget.refine_steps)
        if steps == 0:
            return empty_record(int(ctx.budget.gen_batch_size))
        check_feature_modules(self.cfg, teacher, qmodel)
        record, state = train_alternating(qmodel, teacher, strategy, ctx, calib, self.cfg, steps, track)
        return {**record, **cast(_RecordsRefinement, strategy).refinement_record(state)}


@register("gdfq")
class GDFQRefiner(GeneratorRefiner):
    """GDFQ's quantized-model side: KD (T = 20) + CE to the generator's labels."""


def refiner_class(name: str) -> type[Refiner]:
    return _REGISTRY.get(name)


__all__ = ["GeneratorRefiner", "GDFQRefiner", "refiner_class"]
