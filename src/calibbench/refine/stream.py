"""The refinement data stream: an endless batch iterator as a loader Lightning can iterate.

``refine=kd`` and ``plf`` (``distill.py``) train on ``strategy.batches(ctx, calib, batch_size,
generator)`` (:func:`loader`), which replays the calibration set in a seeded random order,
reshuffled every pass (``Strategy.batches``; no strategy overrides it). The generator stage
(``calibbench.generative.alternating``) wraps its own stream in :class:`BatchStream` the same
way: latent codes and labels (``GeneratorStrategy.generator_inputs``), from which its generator,
trained in the same loop, makes the images. This module only adapts such an iterator to
Lightning: an IterableDataset whose items are whole batches (``batch_size=None``: no collation)
and whose iterator is created once and never restarted, so a stream's state runs on across
Lightning epochs. ``num_workers=0``: the consumer may hold a generator network that trains in
this process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

if TYPE_CHECKING:  # strategies/ imports refine/: annotations only
    from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext

Batch = tuple[Tensor, Optional[Tensor]]


class BatchStream(IterableDataset):
    """Yields the batches of ``make_iterator()``, created on first use and then continued.

    (Lightning fetches one batch ahead, so the images actually trained on are counted by the
    training module, not here.)
    """

    def __init__(self, make_iterator: Callable[[], Iterator[Batch]]) -> None:
        super().__init__()
        self._make = make_iterator
        self._it: Optional[Iterator[Batch]] = None

    def __iter__(self) -> Iterator[Batch]:
        if self._it is None:
            self._it = iter(self._make())
        return self._it


def loader(strategy: Strategy, ctx: StrategyContext, calib: CalibrationSet, batch_size: int,
           generator: torch.Generator) -> DataLoader:
    """A DataLoader over ``strategy.batches(ctx, calib, batch_size, generator)``."""
    stream = BatchStream(lambda: strategy.batches(ctx, calib, batch_size, generator))
    return DataLoader(stream, batch_size=None, num_workers=0)
