"""``random``: a seeded uniform sample of real train images — the baseline every strategy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibbench.config import ConfigError, StrategyConfig
from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext, register


@dataclass
class RandomConfig(StrategyConfig):
    name: str = "random"
    # Equal count per class; when num_samples % num_classes = r, r randomly chosen classes get one more.
    class_balanced: bool = False


def check_pool(num_samples: int, pool: int, what: str = "the train split outside the validation split") -> None:
    if num_samples > pool:
        raise ConfigError(f"num_samples={num_samples} is larger than the calibration pool "
                          f"({pool} images in {what}); use num_samples <= {pool}")


@register("random", RandomConfig)
class RandomSelection(Strategy):
    cfg: RandomConfig

    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        check_pool(ctx.num_samples, len(ctx.data.pool))
        if self.cfg.class_balanced:
            candidates, counts = self._balanced(ctx, ctx.generator("random/class_balanced"))
        else:  # the head of the shared pool order: a uniform sample of SelectQ's pool at this seed
            candidates, counts = [ctx.pool_permutation()], [ctx.num_samples]
        # A corrupt file is replaced by the next candidate of its list (the same class when
        # balanced). Images come back in ascending index order, so the set (and its cache key)
        # does not depend on draw order; reading is sequential.
        images, labels, indices, skipped = ctx.data.fill(
            [c.tolist() for c in candidates], counts, ctx.budget.calib_batch_size)
        counts_per_class = torch.bincount(labels, minlength=ctx.data.num_classes).tolist()
        return CalibrationSet(images, labels, {"indices": indices, "class_counts": counts_per_class,
                                               "skipped_corrupt": skipped})

    @staticmethod
    def _balanced(ctx: StrategyContext, gen: torch.Generator) -> tuple[list[torch.Tensor], list[int]]:
        """Per class: its pool images in a seeded order (candidates) and how many to take."""
        pool = ctx.data.pool
        targets = torch.tensor(ctx.data.targets("train"))[pool]
        k = ctx.data.num_classes
        per_class = torch.full((k,), ctx.num_samples // k)
        per_class[torch.randperm(k, generator=gen)[: ctx.num_samples % k]] += 1
        candidates = []
        for c in range(k):
            members = (targets == c).nonzero().flatten()
            if per_class[c] > len(members):
                raise ConfigError(f"class_balanced: class {c} has {len(members)} images, "
                                  f"{int(per_class[c])} needed; lower num_samples")
            candidates.append(pool[members[torch.randperm(len(members), generator=gen)]])
        return candidates, per_class.tolist()
