"""``zeroq``: synthetic calibration images whose per-image BN-input statistics match the BN stats.

ZeroQ (Cai et al., CVPR 2020) optimizes the pixels of a noise batch with Adam so that, at every
BatchNorm layer, each image's channel mean and std of the BN input equal the layer's running
mean and ``sqrt(running_var + eps)``; the image itself is pulled to channel mean 0 / std 1. No
labels are used. See ``docs/zeroq_dsg.md`` for every decision and the reference code's quirks.

The optimization loop here is shared with ``dsg`` (strategies/dsg.py), which swaps the objective
and the batch size: :class:`ZeroQ` owns the batches, seeding, the optimizer, logging and error
handling (a NaN/inf loss, or a batch whose final loss is above its initial one, is a
:class:`SynthesisError`).

Seeding: image i of the run (0-based, over all batches) starts from the noise of the run's
``"synth/image{i}"`` stream (``ctx.generator``), whatever the batch it lands in. ZeroQ and DSG share
the streams, so at one seed both optimize the very same starting images — a paired comparison
even though DSG's batches are smaller by default.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from calibbench.bnstats import BNStatsRecorder, BNTargets, channel_stats, frozen
from calibbench.config import ConfigError, RunConfig, StrategyConfig, check_choice
from calibbench.datasets import DataModule
from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext, register

log = logging.getLogger(__name__)

INITS = ("normal", "zeroq_code", "uniform")
LR_SCHEDULES = ("plateau", "cosine")
# The ZeroQ code draws integers 0..254, subtracts 127.5 and divides by 5418.75 — the *variance*
# of U(-128, 127), where its comment says it wants unit variance. The result has std
# sqrt((255² − 1)/12)/5418.75 ≈ 0.01359, i.e. 1/73.6 of N(0, 1) (the "~74×" of METHODS.md).
ZEROQ_CODE_DIVISOR = 5418.75
INPUT_EPS = 1e-6  # eps in the input image's std (the ZeroQ code's value; there is no BN layer there)


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


class SynthesisError(RuntimeError):
    """The synthesis failed: a NaN/inf loss (the message names the batch and the step) or a batch
    that diverged (final loss above the initial one; the message names the batch and both losses)."""


IMAGE_STREAM = "synth/image{i}"


def image_stream(index: int) -> str:
    """Name of the random stream image ``index`` (0-based over the whole run) starts from; shared
    by zeroq and dsg so both start every image from the same noise at the same seed."""
    return IMAGE_STREAM.format(i=index)


def init_images(kind: str, n: int, data: DataModule, generator: torch.Generator) -> Tensor:
    """``n`` starting images (CPU, normalized input space) drawn from ``generator``."""
    shape = (n, len(data.mean), data.input_size, data.input_size)
    if kind == "normal":
        return torch.randn(shape, generator=generator)
    if kind == "zeroq_code":
        return (torch.randint(0, 255, shape, generator=generator).float() - 127.5) / ZEROQ_CODE_DIVISOR
    if kind == "uniform":
        return data.normalize(torch.rand(shape, generator=generator))
    raise ConfigError(f"unknown strategy.init {kind!r}; valid choices: {', '.join(INITS)}")


def initial_images(kind: str, ctx: StrategyContext, start: int, size: int) -> Tensor:
    """Starting images ``start … start + size − 1`` of the run: each from its own stream
    (:func:`image_stream`), so an image's start does not depend on the batch layout."""
    return torch.cat([init_images(kind, 1, ctx.data, ctx.generator(image_stream(i)))
                      for i in range(start, start + size)])


def input_loss(images: Tensor) -> Tensor:
    """ZeroQ's term on the image itself: per-image channel mean → 0, std → 1, squared, / N."""
    mean, std = channel_stats(images, per_image=True, correction=1, eps=INPUT_EPS)
    return (mean.pow(2).sum() + (std - 1).pow(2).sum()) / images.shape[0]


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

    def begin_batch(self, start: int, size: int) -> None:
        """Called before a batch's optimization with the run index of its first image; ZeroQ's
        loss does not depend on it (DSG's layerwise enhancement does)."""

    def info(self) -> dict[str, Any]:
        """What the objective adds to ``info`` after the synthesis."""
        return {}

    def __call__(self, images: Tensor, logits: Tensor, labels: Optional[Tensor]) -> dict[str, Tensor]:
        """Loss terms of the last forward pass; ``total`` first (the one that is minimized)."""
        dm, ds = self.deviations()
        bn = (dm.pow(2).sum() + ds.pow(2).sum()) / images.shape[0]
        inp = input_loss(images)
        return {"total": bn + self.input_weight * inp, "bn": bn, "input": inp}


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


@register("zeroq", ZeroQConfig)
class ZeroQ(Strategy):
    """Pixels optimized with Adam against the BN statistics; several independent batches when
    ``num_samples`` exceeds ``budget.synth_batch_size`` (the last one smaller)."""

    cfg: ZeroQConfig

    synthetic = True

    # Budget fields this strategy's synthesis reads: (images, iterations); PLF reads its own.
    images_key: Optional[str] = None  # None: the run's num_samples
    iterations_key = "synth_iterations"

    def __init__(self, cfg: ZeroQConfig) -> None:
        super().__init__(cfg)
        self.check_options(cfg)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """The strategy's options and the synthesis budget, before any work (preflight)."""
        cls.check_options(cfg.strategy)
        budget = cfg.budget
        for key in ("synth_batch_size", cls.iterations_key, cls.images_key):
            if key is not None and int(getattr(budget, key)) < 1:
                raise ConfigError(f"budget.{key}={getattr(budget, key)} is out of range for strategy={cls.name}: "
                                  f"it synthesizes images by optimization, must be >= 1")

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        """Ranges Hydra's types cannot express in ``strategy.*``; a ConfigError names the field."""
        check_choice("strategy.init", cfg.init, INITS)
        for key in ("lr", "min_lr", "input_weight"):
            if getattr(cfg, key) < 0 or (key == "lr" and cfg.lr == 0):
                raise ConfigError(f"strategy.{key}={getattr(cfg, key)} must be "
                                  f"{'positive' if key == 'lr' else 'non-negative'}")
        check_choice("strategy.lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
        if cfg.lr_patience < 0:
            raise ConfigError(f"strategy.lr_patience={cfg.lr_patience} must be >= 0")
        if cfg.log_every < 1:
            raise ConfigError(f"strategy.log_every={cfg.log_every} must be >= 1")

    # -- what dsg overrides -----------------------------------------------------------------
    def make_objective(self, ctx: StrategyContext, recorder: BNStatsRecorder, targets: BNTargets
                       ) -> tuple[ZeroQObjective, dict[str, Any]]:
        """The loss and what to record about it in ``info``."""
        return ZeroQObjective(recorder, targets, self.cfg.input_weight), {}

    def labels(self, ctx: StrategyContext) -> Optional[Tensor]:
        """Labels the ``num_samples`` images are optimized towards (image i gets entry i);
        ZeroQ uses none."""
        return None

    def batch_size(self, ctx: StrategyContext) -> int:
        """Images per optimized batch: ``budget.synth_batch_size`` (DSG resolves its own)."""
        return int(ctx.budget.synth_batch_size)

    def num_images(self, ctx: StrategyContext) -> int:
        """Images to synthesize: the run's ``num_samples`` (PLF reads its own budget field)."""
        return int(ctx.num_samples)

    def iterations(self, ctx: StrategyContext) -> int:
        """Optimization steps per batch: ``budget.synth_iterations``."""
        return int(ctx.budget.synth_iterations)

    def pixel_lr(self) -> float:
        """Adam's learning rate on the pixels (``strategy.lr``; PLF names it ``synth_lr``)."""
        return float(self.cfg.lr)

    def make_recorder(self, model: nn.Module) -> BNStatsRecorder:
        """The hooks the objective reads: per-image BN-input statistics (PLF: per batch)."""
        return BNStatsRecorder(model)

    # -- the shared loop --------------------------------------------------------------------
    def batch_sizes(self, ctx: StrategyContext) -> list[int]:
        if ctx.budget.synth_batch_size < 1 or self.iterations(ctx) < 1:
            raise ConfigError(f"budget.synth_batch_size={ctx.budget.synth_batch_size} and "
                              f"{self.name}'s iterations ({self.iterations(ctx)}) must both be "
                              f">= 1 for {self.name}")
        if self.num_images(ctx) < 1:
            raise ConfigError(f"{self.name}: {self.num_images(ctx)} images asked; must be a positive integer")
        bs = self.batch_size(ctx)
        full, rest = divmod(self.num_images(ctx), bs)
        return [bs] * full + ([rest] if rest else [])

    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        sizes = self.batch_sizes(ctx)
        starts = [sum(sizes[:b]) for b in range(len(sizes))]
        all_labels = self.labels(ctx)
        iters = self.iterations(ctx)
        start = time.perf_counter()
        images: list[Tensor] = []
        labels: list[Tensor] = []
        names: list[str] = []
        logs: dict[str, list[list[float]]] = {}
        finals: dict[str, list[float]] = {}
        initial: list[float] = []
        final_lr: list[float] = []
        seconds: list[float] = []
        loop_seconds = 0.0
        with frozen(ctx.model) as model, self.make_recorder(model) as recorder:
            targets = recorder.targets(ctx.device)
            objective, extra = self.make_objective(ctx, recorder, targets)
            with tqdm(total=len(sizes) * iters, desc=f"{self.name} synthesis", unit="step",
                      disable=not ctx.progress, leave=False) as bar:
                for b, (start_i, size) in enumerate(zip(starts, sizes)):
                    t0 = time.perf_counter()
                    x0 = initial_images(self.cfg.init, ctx, start_i, size)
                    y = None if all_labels is None else all_labels[start_i:start_i + size]
                    objective.begin_batch(start_i, size)
                    x, log_b, first_b, final_b, lr_b, loop_s = self._optimize(
                        model, recorder, objective, x0, y, ctx, b, len(sizes), bar)
                    loop_seconds += loop_s
                    initial.append(first_b)
                    images.append(x)
                    if y is not None:
                        labels.append(y)
                    names = list(log_b)
                    for term, values in log_b.items():
                        logs.setdefault(term, []).append(values)
                    for term, value in final_b.items():
                        finals.setdefault(term, []).append(value)
                    final_lr.append(lr_b)
                    seconds.append(round(time.perf_counter() - t0, 4))
                    log.info("%s batch %d/%d: %d images, final loss %.4g (%.1f s)", self.name, b + 1,
                             len(sizes), size, final_b["total"], seconds[-1])
        total_seconds = time.perf_counter() - start
        weights = [s / sum(sizes) for s in sizes]
        info: dict[str, Any] = {
            "method": self.name, "init": self.cfg.init, "lr": self.pixel_lr(),
            "iterations": iters, "batch_size": sizes[0],
            "num_batches": len(sizes), "batch_sizes": sizes, "batch_starts": starts,
            "init_stream": IMAGE_STREAM,
            "num_bn_layers": recorder.num_layers, "bn_layers": recorder.names,
            "loss_terms": names, "log_every": self.cfg.log_every, "losses": logs,
            "initial_loss": initial, "final_loss": finals["total"],
            "final_loss_mean": sum(w * v for w, v in zip(weights, finals["total"])),
            "final_terms": finals, "final_lr": final_lr,
            "seconds": round(total_seconds, 4), "seconds_per_batch": seconds,
            "seconds_per_iteration": loop_seconds / (iters * len(sizes)),
            **extra, **objective.info(),
        }
        out_labels = torch.cat(labels) if labels else None
        return CalibrationSet(torch.cat(images), out_labels, info)

    def _optimize(self, model: nn.Module, recorder: BNStatsRecorder, objective: ZeroQObjective,
                  x0: Tensor, labels: Optional[Tensor], ctx: StrategyContext, batch: int,
                  num_batches: int, bar: tqdm) -> tuple[Tensor, dict[str, list[float]], float,
                                                        dict[str, float], float, float]:
        """Optimize one batch; returns (images on CPU, logged terms, initial total loss, final
        terms, final lr, loop seconds). Raises :class:`SynthesisError` on a NaN/inf loss and when
        the final total loss is above the initial one (the optimization diverged)."""
        cfg, iters = self.cfg, self.iterations(ctx)
        x = x0.to(ctx.device).requires_grad_(True)
        y = None if labels is None else labels.to(ctx.device)
        opt = torch.optim.Adam([x], lr=self.pixel_lr())
        plateau = cfg.lr_schedule == "plateau"
        sched: Any = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=cfg.lr_patience,
                                                                 min_lr=cfg.min_lr) if plateau else
                      torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=cfg.min_lr))
        logged: dict[str, list[float]] = {}
        initial = math.nan
        t0 = time.perf_counter()
        for step in range(1, iters + 1):
            opt.zero_grad(set_to_none=True)
            recorder.clear()
            terms = objective(x, model(x), y)
            # One host transfer for every term: the values drive the scheduler, the log and the check.
            values = torch.stack([t.detach() for t in terms.values()]).tolist()
            if not _finite(values):
                bad = ", ".join(f"{k}={v}" for k, v in zip(terms, values) if not math.isfinite(v))
                raise SynthesisError(
                    f"{self.name}: non-finite loss in batch {batch + 1}/{num_batches} at step {step}/{iters} "
                    f"({bad}); lower strategy.lr or check the model for NaN outputs")
            if step == 1:
                initial = values[0]  # the loss of the starting images
            terms["total"].backward()
            opt.step()
            sched.step(values[0]) if plateau else sched.step()
            if step % cfg.log_every == 0 or step == iters:
                for key, value in zip(terms, values):
                    logged.setdefault(key, []).append(value)
            bar.update(1)
            if step % 10 == 0 or step == iters:
                bar.set_postfix(batch=f"{batch + 1}/{num_batches}", loss=f"{values[0]:.4g}")
        loop_seconds = time.perf_counter() - t0
        # The loss of the images actually returned (the last logged value predates the last step).
        with torch.no_grad():
            recorder.clear()
            final_terms = objective(x, model(x), y)
            final = dict(zip(final_terms, torch.stack(list(final_terms.values())).tolist()))
        if not _finite(list(final.values())):
            raise SynthesisError(f"{self.name}: non-finite loss in batch {batch + 1}/{num_batches} after "
                                 f"the last step ({iters}): {final}")
        if final["total"] > initial:
            raise SynthesisError(
                f"{self.name}: batch {batch + 1}/{num_batches} diverged: total loss {initial:.6g} at the "
                f"start, {final['total']:.6g} after {iters} steps (lr {self.pixel_lr():g}); lower the "
                f"strategy's pixel learning rate")
        return (x.detach().cpu().float(), logged, initial, final, float(opt.param_groups[0]["lr"]),
                loop_seconds)
