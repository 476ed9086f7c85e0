"""Image synthesis by pixel optimization against the FP model's BN statistics: the loop that ZeroQ,
DSG and PLF compose (``zeroq.py``, ``dsg.py``, ``plf.py``), each with its own loss.

:func:`synthesize` optimizes the run's images batch after batch with Adam on the pixels and a
plateau or cosine schedule (:class:`Synthesis`: what a method sets: batch sizes, iterations,
pixel learning rate, schedule, logging), calling the method's loss on every step. A loss is a
callable ``loss(images, logits, labels) -> {"total": ..., <term>: ...}`` (``total`` first: the
one minimized) that reads the BN-input statistics of the last forward pass from the
:class:`~calibbench.bnstats.BNStatsRecorder` the method built. Errors (a NaN/inf loss, or a batch
whose final loss is above its initial one) are a :class:`SynthesisError` naming the batch and step.

Seeding: image i of the run (0-based, over all batches) starts from the noise of the run's
``"synth/image{i}"`` stream (``ctx.generator``), whatever the batch it lands in. ZeroQ, DSG and PLF
share the streams, so at one seed they optimize the very same starting images — a paired
comparison even though DSG's batches are smaller by default.

Also here, because all three use them: the starting images (:func:`init_images`), ZeroQ's input
term (:func:`input_loss`) and the option checks every synthesis strategy shares.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from calibbench.bnstats import BNStatsRecorder, channel_stats
from calibbench.config import ConfigError, RunConfig, check_choice
from calibbench.datasets import DataModule
from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext

log = logging.getLogger(__name__)

INITS = ("normal", "zeroq_code", "uniform")
LR_SCHEDULES = ("plateau", "cosine")
# The ZeroQ code draws integers 0..254, subtracts 127.5 and divides by 5418.75 — the *variance*
# of U(-128, 127), where its comment says it wants unit variance. The result has std
# sqrt((255² − 1)/12)/5418.75 ≈ 0.01359, i.e. 1/73.6 of N(0, 1) (the "~74×" of METHODS.md).
ZEROQ_CODE_DIVISOR = 5418.75
INPUT_EPS = 1e-6  # eps in the input image's std (the ZeroQ code's value; there is no BN layer there)
IMAGE_STREAM = "synth/image{i}"

Loss = Callable[[Tensor, Tensor, Optional[Tensor]], dict[str, Tensor]]


class SynthesisError(RuntimeError):
    """The synthesis failed: a NaN/inf loss (the message names the batch and the step) or a batch
    that diverged (final loss above the initial one; the message names the batch and both losses)."""


# -- starting images and the input term ----------------------------------------------------------
def image_stream(index: int) -> str:
    """Name of the random stream image ``index`` (0-based over the whole run) starts from; shared
    by zeroq, dsg and plf so all start every image from the same noise at the same seed."""
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


# -- options shared by the synthesis strategies ---------------------------------------------------
def check_options(cfg: Any) -> None:
    """Ranges Hydra's types cannot express in the synthesis keys of ``strategy.*`` (the fields of
    ``ZeroQConfig``, which DSG's and PLF's extend); a ConfigError names the field."""
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


def check_budget(budget: Any, name: str, keys: tuple[Optional[str], ...]) -> None:
    """The budget fields a synthesis strategy reads (images, iterations, batch size) are >= 1."""
    for key in keys:
        if key is not None and int(budget[key]) < 1:
            raise ConfigError(f"budget.{key}={budget[key]} is out of range for strategy={name}: "
                              f"it synthesizes images by optimization, must be >= 1")


def batch_sizes(name: str, num_images: int, batch_size: int, iterations: int, budget_batch: int) -> list[int]:
    """Images per optimized batch: full batches of ``batch_size`` and the rest (the last, smaller)."""
    if budget_batch < 1 or iterations < 1:
        raise ConfigError(f"budget.synth_batch_size={budget_batch} and {name}'s iterations ({iterations}) "
                          f"must both be >= 1 for {name}")
    if num_images < 1:
        raise ConfigError(f"{name}: {num_images} images asked; must be a positive integer")
    full, rest = divmod(num_images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


class SynthesisStrategy(Strategy):
    """What ZeroQ, DSG and PLF share besides the loop they call (:func:`synthesize`): their
    options are checked when built and by preflight (:meth:`check`), together with the budget
    fields the synthesis reads (``budget_fields``)."""

    synthetic = True
    budget_fields: tuple[str, ...] = ("synth_batch_size", "synth_iterations")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.check_options(cfg)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """The strategy's options and the synthesis budget, before any work (preflight)."""
        cls.check_options(cfg.strategy)
        check_budget(cfg.budget, cls.name, cls.budget_fields)

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        """This strategy's own options (``strategy.*``); raise ConfigError."""


# -- the loop ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Synthesis:
    """What a method sets of the shared loop. ``lr`` is Adam's rate on the pixels, read from the
    strategy field ``lr_key`` (``lr`` for zeroq/dsg; ``synth_lr`` for plf, whose ``lr`` is its
    refinement's fine-tuning rate), which error messages name."""

    name: str
    init: str
    sizes: list[int]
    iterations: int
    lr: float
    lr_schedule: str = "plateau"
    lr_patience: int = 100
    min_lr: float = 1e-4
    log_every: int = 1
    lr_key: str = "lr"

    @property
    def starts(self) -> list[int]:
        return [sum(self.sizes[:b]) for b in range(len(self.sizes))]


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def optimize_batch(model: nn.Module, recorder: BNStatsRecorder, loss: Loss, x0: Tensor,
                   labels: Optional[Tensor], plan: Synthesis, device: torch.device, batch: int,
                   bar: tqdm) -> tuple[Tensor, dict[str, list[float]], float, dict[str, float], float, float]:
    """Optimize one batch; returns (images on CPU, logged terms, initial total loss, final
    terms, final lr, loop seconds). Raises :class:`SynthesisError` on a NaN/inf loss and when
    the final total loss is above the initial one (the optimization diverged)."""
    iters, num_batches = plan.iterations, len(plan.sizes)
    x = x0.to(device).requires_grad_(True)
    y = None if labels is None else labels.to(device)
    opt = torch.optim.Adam([x], lr=plan.lr)
    plateau = plan.lr_schedule == "plateau"
    sched: Any = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=plan.lr_patience,
                                                             min_lr=plan.min_lr) if plateau else
                  torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=plan.min_lr))
    logged: dict[str, list[float]] = {}
    initial = math.nan
    t0 = time.perf_counter()
    for step in range(1, iters + 1):
        opt.zero_grad(set_to_none=True)
        recorder.clear()
        terms = loss(x, model(x), y)
        # One host transfer for every term: the values drive the scheduler, the log and the check.
        values = torch.stack([t.detach() for t in terms.values()]).tolist()
        if not _finite(values):
            bad = ", ".join(f"{k}={v}" for k, v in zip(terms, values) if not math.isfinite(v))
            raise SynthesisError(
                f"{plan.name}: non-finite loss in batch {batch + 1}/{num_batches} at step {step}/{iters} "
                f"({bad}); lower strategy.{plan.lr_key} or check the model for NaN outputs")
        if step == 1:
            initial = values[0]  # the loss of the starting images
        terms["total"].backward()
        opt.step()
        sched.step(values[0]) if plateau else sched.step()
        if step % plan.log_every == 0 or step == iters:
            for key, value in zip(terms, values):
                logged.setdefault(key, []).append(value)
        bar.update(1)
        if step % 10 == 0 or step == iters:
            bar.set_postfix(batch=f"{batch + 1}/{num_batches}", loss=f"{values[0]:.4g}")
    loop_seconds = time.perf_counter() - t0
    # The loss of the images actually returned (the last logged value predates the last step).
    with torch.no_grad():
        recorder.clear()
        final_terms = loss(x, model(x), y)
        final = dict(zip(final_terms, torch.stack(list(final_terms.values())).tolist()))
    if not _finite(list(final.values())):
        raise SynthesisError(f"{plan.name}: non-finite loss in batch {batch + 1}/{num_batches} after "
                             f"the last step ({iters}): {final}")
    if final["total"] > initial:
        raise SynthesisError(
            f"{plan.name}: batch {batch + 1}/{num_batches} diverged: total loss {initial:.6g} at the "
            f"start, {final['total']:.6g} after {iters} steps (lr {plan.lr:g}); lower the strategy's "
            f"pixel learning rate (strategy.{plan.lr_key})")
    return (x.detach().cpu().float(), logged, initial, final, float(opt.param_groups[0]["lr"]),
            loop_seconds)


def synthesize(ctx: StrategyContext, model: nn.Module, recorder: BNStatsRecorder, loss: Loss,
               plan: Synthesis, labels: Optional[Tensor] = None,
               begin_batch: Optional[Callable[[int, int], None]] = None,
               extra: Optional[dict[str, Any]] = None, started: Optional[float] = None) -> CalibrationSet:
    """The run's images, batch after batch (``plan.sizes``), each from its seeded starting noise,
    optimized against ``loss``; ``labels`` (image i gets entry i) are handed to the loss and
    returned with the images. ``model`` is the frozen FP model ``recorder`` hooks;
    ``begin_batch(start, size)`` runs before each batch (DSG's layerwise enhancement); ``extra``
    joins the ``info`` (what the method records about its loss); ``started``: the
    ``time.perf_counter()`` the method's synthesis began at (its set-up counts in ``seconds``)."""
    sizes, starts, iters = plan.sizes, plan.starts, plan.iterations
    start = time.perf_counter() if started is None else started
    images: list[Tensor] = []
    out_labels: list[Tensor] = []
    names: list[str] = []
    logs: dict[str, list[list[float]]] = {}
    finals: dict[str, list[float]] = {}
    initial: list[float] = []
    final_lr: list[float] = []
    seconds: list[float] = []
    loop_seconds = 0.0
    with tqdm(total=len(sizes) * iters, desc=f"{plan.name} synthesis", unit="step",
              disable=not ctx.progress, leave=False) as bar:
        for b, (start_i, size) in enumerate(zip(starts, sizes)):
            t0 = time.perf_counter()
            x0 = initial_images(plan.init, ctx, start_i, size)
            y = None if labels is None else labels[start_i:start_i + size]
            if begin_batch is not None:
                begin_batch(start_i, size)
            x, log_b, first_b, final_b, lr_b, loop_s = optimize_batch(
                model, recorder, loss, x0, y, plan, ctx.device, b, bar)
            loop_seconds += loop_s
            initial.append(first_b)
            images.append(x)
            if y is not None:
                out_labels.append(y)
            names = list(log_b)
            for term, values in log_b.items():
                logs.setdefault(term, []).append(values)
            for term, value in final_b.items():
                finals.setdefault(term, []).append(value)
            final_lr.append(lr_b)
            seconds.append(round(time.perf_counter() - t0, 4))
            log.info("%s batch %d/%d: %d images, final loss %.4g (%.1f s)", plan.name, b + 1,
                     len(sizes), size, final_b["total"], seconds[-1])
    total_seconds = time.perf_counter() - start
    weights = [s / sum(sizes) for s in sizes]
    info: dict[str, Any] = {
        "method": plan.name, "init": plan.init, "lr": plan.lr,
        "iterations": iters, "batch_size": sizes[0],
        "num_batches": len(sizes), "batch_sizes": sizes, "batch_starts": starts,
        "init_stream": IMAGE_STREAM,
        "num_bn_layers": recorder.num_layers, "bn_layers": recorder.names,
        "loss_terms": names, "log_every": plan.log_every, "losses": logs,
        "initial_loss": initial, "final_loss": finals["total"],
        "final_loss_mean": sum(w * v for w, v in zip(weights, finals["total"])),
        "final_terms": finals, "final_lr": final_lr,
        "seconds": round(total_seconds, 4), "seconds_per_batch": seconds,
        "seconds_per_iteration": loop_seconds / (iters * len(sizes)),
        **(extra or {}),
    }
    return CalibrationSet(torch.cat(images), torch.cat(out_labels) if out_labels else None, info)


__all__ = ["Synthesis", "SynthesisError", "synthesize", "optimize_batch", "batch_sizes", "check_options",
           "check_budget", "init_images", "initial_images", "image_stream", "input_loss", "IMAGE_STREAM",
           "INITS", "LR_SCHEDULES", "ZEROQ_CODE_DIVISOR", "INPUT_EPS"]
