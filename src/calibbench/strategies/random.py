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
    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        check_pool(ctx.num_samples, len(ctx.data.pool))
        if self.cfg.class_balanced:
            indices = self._balanced(ctx, ctx.generator("random/class_balanced"))
        else:  # the head of the shared pool order: a uniform sample of SelectQ's pool at this seed
            indices = ctx.pool_permutation()[: ctx.num_samples]
        # Sorted so the set (and its cache key) does not depend on draw order; reading is sequential.
        indices = indices.sort().values.tolist()
        images, labels = ctx.data.load(indices, "train", ctx.budget.calib_batch_size)
        counts = torch.bincount(labels, minlength=ctx.data.num_classes).tolist()
        return CalibrationSet(images, labels, {"indices": indices, "class_counts": counts})

    @staticmethod
    def _balanced(ctx: StrategyContext, gen: torch.Generator) -> torch.Tensor:
        pool = ctx.data.pool
        targets = torch.tensor(ctx.data.targets("train"))[pool]
        k = ctx.data.num_classes
        per_class = torch.full((k,), ctx.num_samples // k)
        per_class[torch.randperm(k, generator=gen)[: ctx.num_samples % k]] += 1
        chosen = []
        for c in range(k):
            members = (targets == c).nonzero().flatten()
            if per_class[c] > len(members):
                raise ConfigError(f"class_balanced: class {c} has {len(members)} images, "
                                  f"{int(per_class[c])} needed; lower num_samples")
            chosen.append(pool[members[torch.randperm(len(members), generator=gen)[: per_class[c]]]])
        return torch.cat(chosen)
