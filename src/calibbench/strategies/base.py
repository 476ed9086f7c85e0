"""Strategy contract and registry.

A strategy turns (FP model, data, seed, budget) into calibration images. It never touches the
quantizer: the pipeline quantizes and calibrates with whatever the strategy returns, so every
strategy is compared on exactly the same quantize → calibrate → evaluate path.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from torch import nn

from calibbench.config import BudgetConfig, GuardConfig, RunConfig, StrategyConfig, to_container
from calibbench.registry import Registry
from calibbench.seeding import stream_seed

if TYPE_CHECKING:
    from calibbench.datasets import DataModule

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """Calibration images in the model's normalized input space (N×C×H×W, float32, CPU).

    ``labels`` are real labels (real-data strategies) or pseudo/assigned labels (synthetic ones).
    ``info`` explains the choice: selected indices, scores, per-step losses, timings. It must be
    JSON-serialisable (lists, numbers, strings) because it is copied into ``result.json``.
    ``state`` is what the strategy hands on to its refinement stage: empty for every strategy in
    this package; a generator strategy stores its ``GeneratorHandover`` there (the warmed-up
    generator, its optimizer and the method's state: ``calibbench.generative.handover``), which
    the generator refiners read back. Cached with the set, never written to the record.
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor] = None
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, positions: torch.Tensor) -> "CalibrationSet":
        """The images (and labels) at ``positions``, in that order; ``info`` is shared."""
        labels = None if self.labels is None else self.labels[positions]
        return CalibrationSet(self.images[positions], labels, self.info, self.state)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield self.images[start:stop], labels

    def replay(self, batch_size: int, generator: torch.Generator
               ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Endless full batches over successive random permutations drawn from ``generator``."""
        if len(self) == 0:
            raise ValueError("replay(): the calibration set is empty")
        order = torch.empty(0, dtype=torch.long)
        while True:
            while len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(self), generator=generator)])
            take, order = order[:batch_size], order[batch_size:]
            yield self.images[take], None if self.labels is None else self.labels[take]


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
    guard: Optional[GuardConfig] = None  # the run's guard config (refine/guard.py); not part of any cache key

    def generator(self, stream: str) -> torch.Generator:
        """A CPU generator for the named random ``stream`` of this run (same on any device).

        Its seed hashes (run seed, stream name), so no two streams replay each other: seed s+1 of
        one stream is unrelated to seed s of another (``seed + offset`` made ``random`` at seed 1
        replay SelectQ's pool draw at seed 0).
        """
        return torch.Generator().manual_seed(stream_seed(self.seed, stream))

    def pool_permutation(self) -> torch.Tensor:
        """The calibration pool (``data.pool``: train indices outside the validation split) in the
        seeded order of the shared ``"pool"`` stream.

        Shared on purpose: ``random`` takes its first ``num_samples`` entries and SelectQ's
        ``pool_size`` subset is its first ``pool_size`` entries, so at one seed the random set is
        a uniform sample of the very pool SelectQ ranks — paired comparisons share the pool.
        """
        pool = self.data.pool
        return pool[torch.randperm(len(pool), generator=self.generator("pool"))]


class Strategy(ABC):
    """Base class. Subclasses are registered with ``@register("name", ConfigDataclass)``."""

    name: str = ""
    synthetic: bool = False  # True when images are generated, not selected from the train split
    # True when the images come from a generator trained inside the refinement stage: what a
    # refiner declaring ``requires = "generator"`` needs (checked by preflight, before work).
    trains_generator: bool = False
    # The paper's reading of each config field whose calibbench default departs from it (e.g.
    # SelectQ's select: the paper says "highest"). A run that departs is labelled as such.
    paper_reading: dict[str, Any] = {}

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        """Return :meth:`num_images` calibration images."""

    def num_images(self, ctx: StrategyContext) -> int:
        """Size of the set this strategy returns: the run's ``num_samples`` (PLF's comes from its
        budget, the paper's 5120 being part of the method)."""
        return int(ctx.num_samples)

    def resolved_config(self, ctx: StrategyContext) -> dict[str, Any]:
        """The strategy config with every ``null``-means-fallback value replaced by the value the
        run will use (e.g. SelectQ's ``batch_size: null`` → ``budget.eval_batch_size``).

        The calibration cache key hashes this, so two runs that compute the same set share an
        entry and two that do not never do. Override when a field falls back to ctx/budget.
        """
        cfg = self.cfg
        if isinstance(cfg, DictConfig):
            return to_container(cfg)
        return dict(asdict(cfg)) if is_dataclass(cfg) else dict(cfg)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """The class-level preflight hook: every option of this strategy in the run config ``cfg``
        (``cfg.strategy`` and the budget fields the strategy reads); raise ConfigError naming the
        key. Called by :func:`calibbench.preflight.preflight` before the model or data exist."""

    def check_run(self, cfg: RunConfig) -> None:
        """Checks of the whole run config that only this strategy knows (e.g. a generator strategy
        needs a refinement stage); raise ConfigError. Called by the preflight on the one built
        strategy, after :meth:`check` and ``refine.validate``, before any work."""

    @property
    def streams_fresh_images(self) -> bool:
        """True when :meth:`batches` is overridden to stream new images every step (no fixed set):
        declared here so that a refiner that needs a fixed set (``refine=plf``) asks the strategy
        instead of importing this module."""
        return type(self).batches is not Strategy.batches

    def paper_deviations(self) -> list[str]:
        """``["select=lowest"]``: the fields of this run that differ from the paper's reading."""
        return [f"{key}={getattr(self.cfg, key)}" for key, paper in self.paper_reading.items()
                if getattr(self.cfg, key) != paper]

    def batches(self, ctx: StrategyContext, calib: CalibrationSet, batch_size: int,
                generator: torch.Generator) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """The refinement stream: an endless iterator of ``(images, labels)`` batches (labels
        ``None`` when the set has none); the refinement stage takes as many as it has steps.

        It replays ``calib`` (the set the run calibrated with, never recomputed) in the seeded
        random order of ``generator``, reshuffled every pass; every batch holds exactly
        ``batch_size`` images (a batch may span two passes, so each image is seen equally often).
        The refiners that train on a fixed set (``refine=kd``, ``plf``) read it; no strategy
        overrides it. A generator strategy does not train its generator here: its refiner
        (``requires = "generator"``, ``calibbench.generative``) continues the generator from the
        hand-over in ``calib.state`` and draws its own latent/label stream
        (``GeneratorStrategy.generator_inputs``).
        """
        yield from calib.replay(batch_size, generator)


_REGISTRY: Registry[type[Strategy]] = Registry("strategy")


def register(name: str, schema: type = StrategyConfig) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: add a strategy to the registry and its schema to Hydra's ConfigStore
    as ``schema/strategy/base_<name>`` (which ``conf/strategy/<name>.yaml`` lists in its defaults)."""

    def store_schema(cls: type[Strategy]) -> None:
        ConfigStore.instance().store(group="schema/strategy", name=f"base_{name}", node=schema)

    return _REGISTRY.register(name, on_add=store_schema)


def available() -> list[str]:
    return _REGISTRY.available()


def get(name: str) -> type[Strategy]:
    """The class registered as ``name``; an unknown name lists the valid ones."""
    return _REGISTRY.get(name)


def build(cfg: StrategyConfig) -> Strategy:
    """Construct the strategy named by ``cfg.name``; an unknown name lists the valid ones."""
    return _REGISTRY.get(cfg.name)(cfg)
