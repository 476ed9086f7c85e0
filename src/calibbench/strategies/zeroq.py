"""``zeroq``: synthetic calibration images whose per-image BN-input statistics match the BN stats.

ZeroQ (Cai et al., CVPR 2020) optimizes the pixels of a noise batch with Adam so that, at every
BatchNorm layer, each image's channel mean and std of the BN input equal the layer's running
mean and ``sqrt(running_var + eps)``; the image itself is pulled to channel mean 0 / std 1. No
labels are used. See ``docs/zeroq_dsg.md`` for every decision and the reference code's quirks.

The optimization loop is the shared :func:`~calibbench.strategies.synthesis.synthesize` (batches,
seeded starting images, Adam, schedule, logging, :class:`SynthesisError` on a NaN/inf loss or a
diverged batch), which ``dsg`` and ``plf`` compose too, each with its own loss; this module holds
ZeroQ's loss (:class:`ZeroQObjective`) and options.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from calibbench.bnstats import BNStatsRecorder, BNTargets
from calibbench.config import StrategyConfig
from calibbench.modes import frozen
from calibbench.strategies import synthesis
from calibbench.strategies.base import CalibrationSet, StrategyContext, register
from calibbench.strategies.synthesis import Synthesis, SynthesisStrategy, input_loss, synthesize

log = logging.getLogger(__name__)

@dataclass
class ZeroQConfig(StrategyConfig):
    name: str = "zeroq"
    # normal: N(0,1) in normalized space | zeroq_code: the code's ~74x smaller init | uniform: U(0,1) pixels
    init: str = "normal"
    lr: float = 0.5  # Adam on the pixels
    lr_patience: int = 100  # ReduceLROnPlateau on the total loss (factor 0.1)
    min_lr: float = 1e-4
    # plateau: ReduceLROnPlateau (ZeroQ's code) | cosine: cosine decay to min_lr over the iterations
    lr_schedule: str = "plateau"
    input_weight: float = 1.0  # weight of the input-image term (mean 0 / std 1)
    log_every: int = 1  # keep every k-th step's loss terms in info


class ZeroQObjective:
    """Σ over BN layers and images of ‖μ̃ − μ_BN‖² + ‖σ̃ − σ_BN‖², divided by the batch size,
    plus ``input_weight`` × :func:`input_loss`.

    All layers' per-image statistics are concatenated (N×ΣC) and compared with the concatenated
    targets in one tensor expression: no Python loop over layers or channels per step.
    """

    def __init__(self, recorder: BNStatsRecorder, targets: BNTargets, input_weight: float = 1.0) -> None:
        self.recorder = recorder
        self.target_mean, self.target_std = targets.flat()
        self.input_weight = input_weight

    def deviations(self) -> tuple[Tensor, Tensor]:
        """(μ̃ − μ_BN, σ̃ − σ_BN), each N×ΣC, from the last forward pass."""
        mean, std = self.recorder.flat_image_stats()
        return mean - self.target_mean, std - self.target_std

    def __call__(self, images: Tensor, logits: Tensor, labels: Optional[Tensor]) -> dict[str, Tensor]:
        """Loss terms of the last forward pass; ``total`` first (the one that is minimized)."""
        dm, ds = self.deviations()
        bn = (dm.pow(2).sum() + ds.pow(2).sum()) / images.shape[0]
        inp = input_loss(images)
        return {"total": bn + self.input_weight * inp, "bn": bn, "input": inp}


@register("zeroq", ZeroQConfig)
class ZeroQ(SynthesisStrategy):
    """Pixels optimized with Adam against the BN statistics; several independent batches when
    ``num_samples`` exceeds ``budget.synth_batch_size`` (the last one smaller)."""

    cfg: ZeroQConfig

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        """Ranges Hydra's types cannot express in ``strategy.*``; a ConfigError names the field."""
        synthesis.check_options(cfg)

    def plan(self, ctx: StrategyContext) -> Synthesis:
        """The shared loop's settings: ``num_samples`` images in batches of
        ``budget.synth_batch_size``, ``budget.synth_iterations`` steps, Adam at ``strategy.lr``."""
        cfg, iters = self.cfg, int(ctx.budget.synth_iterations)
        sizes = synthesis.batch_sizes(self.name, int(ctx.num_samples), int(ctx.budget.synth_batch_size), iters,
                                      int(ctx.budget.synth_batch_size))
        return Synthesis(self.name, cfg.init, sizes, iters, float(cfg.lr), cfg.lr_schedule, cfg.lr_patience,
                         cfg.min_lr, cfg.log_every)

    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        plan = self.plan(ctx)
        start = time.perf_counter()
        with frozen(ctx.model) as model, BNStatsRecorder(model) as recorder:  # per-image statistics
            objective = ZeroQObjective(recorder, recorder.targets(ctx.device), self.cfg.input_weight)
            return synthesize(ctx, model, recorder, objective, plan, started=start)
