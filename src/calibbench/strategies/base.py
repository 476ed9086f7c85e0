"""Strategy contract and registry.

A strategy turns (FP model, data, seed, budget) into calibration images. It never touches the
quantizer: the pipeline quantizes and calibrates with whatever the strategy returns, so every
strategy is compared on exactly the same quantize → calibrate → evaluate path.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from hydra.core.config_store import ConfigStore
from torch import nn

from calibbench.config import BudgetConfig, ConfigError, StrategyConfig

if TYPE_CHECKING:
    from calibbench.datasets import DataModule

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """Calibration images in the model's normalized input space (N×C×H×W, float32, CPU).

    ``labels`` are real labels (real-data strategies) or pseudo/assigned labels (synthetic ones).
    ``info`` explains the choice: selected indices, scores, per-step losses, timings. It must be
    JSON-serialisable (lists, numbers, strings) because it is copied into ``result.json``.
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor] = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield self.images[start:stop], labels


@dataclass
class StrategyContext:
    """Everything a strategy may read. ``model`` is the FP network in eval mode on ``device``."""

    model: nn.Module
    data: "DataModule"
    device: torch.device
    seed: int
    num_samples: int
    budget: BudgetConfig
    progress: bool = True

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run seed: same seed → same draws on any device."""
        return torch.Generator().manual_seed(self.seed + offset)


class Strategy(ABC):
    """Base class. Subclasses are registered with ``@register("name", ConfigDataclass)``."""

    name: str = ""
    synthetic: bool = False  # True when images are generated, not selected from the train split
    cache_version: int = 1  # bump when a change to the algorithm invalidates cached sets

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        """Return ``ctx.num_samples`` calibration images."""

    def batches(self, ctx: StrategyContext, batch_size: Optional[int] = None
                ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Stream of ``(images, labels)`` for a refinement stage.

        The default replays the calibration set; generator-based strategies override this to
        train their generator inside the iterator so the refinement loop stays generic.
        """
        calib = self.calibration_set(ctx)
        yield from calib.batches(batch_size or ctx.budget.calib_batch_size)


_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str, schema: type = StrategyConfig) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: add a strategy to the registry and its schema to Hydra's ConfigStore
    as ``strategy/base_<name>`` (which ``conf/strategy/<name>.yaml`` lists in its defaults)."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        ConfigStore.instance().store(group="strategy", name=f"base_{name}", node=schema)
        return cls

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def build(cfg: Any) -> Strategy:
    """Construct the strategy named by ``cfg.name``; an unknown name lists the valid ones."""
    name = cfg.name
    if name not in _REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; valid choices: {', '.join(available())}")
    return _REGISTRY[name](cfg)
