"""``plf``: labelled synthetic images for data-free quantization via pseudo-label filtering.

Fan et al. (``papers/004``), section 3.1: images start from noise and are optimized so that the
statistics of each batch at every BN layer match the layer's running mean and variance (eq. 1)
while the FP model assigns them their target label (eq. 2):

    L_DATA = sum_l ||mu_l^p - mu_l^s||^2 + ||sigma_l^p - sigma_l^s||^2  +  gamma * CE(P(x), y)

The loop is the shared :func:`~calibbench.strategies.synthesis.synthesize` (batches, seeded
starting images shared with zeroq/dsg, Adam, schedule, divergence checks), composed with PLF's own
objective (batch statistics instead of ZeroQ's per-image ones, variances as eq. 1 writes them, no
input-image term, the CE term), class-balanced labels, and its own budget (``plf_samples`` images,
``plf_iterations`` steps per batch). The refinement that filters the set by reliability is ``refine=plf``
(``refine/plf.py``), this strategy's default; ``strategy.t_low`` … ``strategy.lr`` are that stage's
keys (conf/strategy/plf.yaml routes them to ``refine.plf``), so they stay out of the calibration
cache key: a ``mu`` ablation reuses the synthesized set.

Two learning rates, two keys: ``strategy.synth_lr`` is Adam's rate on the *pixels* (ZeroQ's and
DSG's ``strategy.lr``), ``strategy.lr`` the quantized model's *fine-tuning* rate of ``refine=plf``
(copied into ``refine.plf.lr``). The keys stay as they are (existing configs and sweeps use them);
the synthesis reads ``synth_lr`` only, its errors name it, and ``info["lr"]`` is the pixel rate.

Decisions where the paper is silent (docs/plf.md): the pixel optimizer is ZeroQ's (Adam, lr 0.5)
with a cosine decay instead of ZeroQ's plateau schedule (with eq. 1 on batch variances, plateau at
lr 0.5 lets a quarter of the batches blow up in their last steps); sigma in eq. 1 is the variance
(the paper's words, "mean and variance"); the CE is the batch mean (eq. 2 writes a sum over the N
images, which only rescales gamma by the batch size); labels are ``i mod N_c`` shuffled by the
seeded ``"plf/labels"`` stream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from calibbench.bnstats import BNStatsRecorder, BNTargets
from calibbench.config import ConfigError, check_plf_values
from calibbench.modes import frozen
from calibbench.strategies import synthesis
from calibbench.strategies.base import CalibrationSet, StrategyContext, register
from calibbench.strategies.synthesis import Synthesis, SynthesisStrategy, input_loss, synthesize
from calibbench.strategies.zeroq import ZeroQConfig, ZeroQObjective

log = logging.getLogger(__name__)

STREAM_LABELS = "plf/labels"
# The refinement stage's keys, exposed as strategy.* for the paper's ablations; not part of what
# the synthesized set depends on.
REFINE_KEYS = ("t_low", "t_high", "beta", "mu", "tau", "lr", "use_high", "use_low")


@dataclass
class PLFConfig(ZeroQConfig):
    name: str = "plf"
    input_weight: float = 0.0  # eq. 2 has no input-image term (ZeroQ's); > 0 adds it
    synth_lr: float = 0.5  # Adam on the pixels (ZeroQ's value; the paper gives none)
    lr_schedule: str = "cosine"  # ZeroQ's plateau schedule lets batches blow up late here (docs/plf.md)
    gamma: float = 10.0  # eq. 2 (CIFAR 10, ImageNet 0.1: conf/strategy/plf.yaml picks by family)
    # refine=plf's keys (conf/strategy/plf.yaml copies them into refine.plf / refine.lr)
    t_low: float = 0.2
    t_high: float = 0.5
    beta: float = 0.3
    mu: float = 100.0
    tau: float = 1.0
    lr: float = 1e-3  # the quantized model's fine-tuning learning rate (SGD)
    use_high: bool = True
    use_low: bool = True


class PLFObjective(ZeroQObjective):
    """eq. 2: the BN loss of eq. 1 on batch statistics plus gamma * CE to the assigned labels."""

    def __init__(self, recorder: BNStatsRecorder, targets: BNTargets, gamma: float,
                 input_weight: float = 0.0) -> None:
        super().__init__(recorder, targets, input_weight)
        self.gamma = float(gamma)
        # eq. 1 compares variances; recorder and targets hold sqrt(var + eps) with the same eps,
        # so squaring both gives var + eps on each side and the eps cancels in the difference.
        self.target_var = self.target_std.pow(2)

    def __call__(self, images: Tensor, logits: Tensor, labels: Optional[Tensor]) -> dict[str, Tensor]:
        mean, std = self.recorder.flat_batch_stats()
        bn = (mean - self.target_mean).pow(2).sum() + (std.pow(2) - self.target_var).pow(2).sum()  # eq. 1
        if labels is None:  # PLF synthesizes labelled, class-balanced batches
            raise ValueError("PLF's objective needs the batch labels")
        ce = F.cross_entropy(logits, labels)  # L_IL of eq. 2, batch mean
        terms = {"total": bn + self.gamma * ce, "bn": bn, "ce": ce}  # eq. 2
        if self.input_weight > 0:
            inp = input_loss(images)
            terms["total"] = terms["total"] + self.input_weight * inp
            terms["input"] = inp
        return terms


@register("plf", PLFConfig)
class PLF(SynthesisStrategy):
    """Class-balanced labelled synthesis; the reliability split happens in ``refine=plf``."""

    cfg: PLFConfig
    budget_fields = ("synth_batch_size", "plf_iterations", "plf_samples")

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        synthesis.check_options(cfg)
        if cfg.gamma < 0:
            raise ConfigError(f"strategy.gamma={cfg.gamma} is negative; must be >= 0")
        if not cfg.synth_lr > 0:
            raise ConfigError(f"strategy.synth_lr={cfg.synth_lr} must be positive")
        check_plf_values("strategy", cfg)

    def num_images(self, ctx: StrategyContext) -> int:
        return int(ctx.budget.plf_samples)

    def plan(self, ctx: StrategyContext) -> Synthesis:
        """The shared loop's settings: ``budget.plf_samples`` images in batches of
        ``budget.synth_batch_size``, ``budget.plf_iterations`` steps, Adam at ``strategy.synth_lr``."""
        cfg, iters = self.cfg, int(ctx.budget.plf_iterations)
        sizes = synthesis.batch_sizes(self.name, self.num_images(ctx), int(ctx.budget.synth_batch_size), iters,
                                      int(ctx.budget.synth_batch_size))
        return Synthesis(self.name, cfg.init, sizes, iters, float(cfg.synth_lr), cfg.lr_schedule, cfg.lr_patience,
                         cfg.min_lr, cfg.log_every, lr_key="synth_lr")

    def labels(self, ctx: StrategyContext) -> Tensor:
        """Class-balanced assigned labels: ``i mod N_c`` in a seeded random order."""
        n = self.num_images(ctx)
        labels = torch.arange(n) % ctx.data.num_classes
        return labels[torch.randperm(n, generator=ctx.generator(STREAM_LABELS))]

    def resolved_config(self, ctx: StrategyContext) -> dict[str, Any]:
        """The synthesis keys only: the refinement's keys (REFINE_KEYS) do not change the set."""
        out = super().resolved_config(ctx)
        for key in REFINE_KEYS:
            out.pop(key, None)
        return out

    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        plan = self.plan(ctx)
        labels = self.labels(ctx)
        start = time.perf_counter()
        with frozen(ctx.model) as model, BNStatsRecorder(model, per_image=False, per_batch=True) as recorder:
            objective = PLFObjective(recorder, recorder.targets(ctx.device), self.cfg.gamma, self.cfg.input_weight)
            calib = synthesize(ctx, model, recorder, objective, plan, labels,
                               extra={"gamma": self.cfg.gamma, "bn_stats": "batch", "labels_stream": STREAM_LABELS},
                               started=start)
        with torch.no_grad():
            agree = []
            for images, targets in calib.batches(int(ctx.budget.eval_batch_size)):
                agree.append(ctx.model(images.to(ctx.device)).argmax(1).cpu() == targets)
        calib.info["num_images"] = len(calib)
        calib.info["fp_agrees_with_label"] = float(torch.cat(agree).float().mean())
        return calib
