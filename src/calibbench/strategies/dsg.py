"""``dsg``: ZeroQ with slack distribution alignment and layerwise sample enhancement.

DSG (Zhang et al., CVPR 2021, "Diversifying Sample Generation for Accurate Data-Free
Quantization") argues that ZeroQ's exact matching makes every synthetic image's statistics
collapse onto the BN statistics (homogenization). It changes ZeroQ's loss in two ways:

- **Slack distribution alignment (SDA)**: per layer and channel,
  ``max(|μ̃ − μ_BN| − δ, 0)² + max(|σ̃ − σ_BN| − γ, 0)²`` on each image's statistics; a deviation
  inside the margin costs nothing. The margins δ, γ are the ε-percentile (ε = 0.9) of the
  deviations observed on the synthetic images at initialization (Gaussian noise) —
  ``margin_source=init``; ``real`` measures them on real train images, ``fixed`` takes constants.
- **Layerwise sample enhancement (LSE)**: image i of a batch has the SDA loss of BN layer
  ``i mod L`` weighted by ``enhance_weight`` (the paper's ``I + 11ᵀ``: 2) instead of 1, so
  different images are pulled hardest at different depths.

The CVPR paper's objective has no label term; ``ce_weight > 0`` adds one cross-entropy term
towards random labels (the TPAMI/reference code's addition — counted once here, the reference
code adds it twice). Reasons and deviations: ``docs/zeroq_dsg.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from calibbench.bnstats import BNStatsRecorder, BNTargets
from calibbench.config import ConfigError, check_choice
from calibbench.strategies.base import StrategyContext, register
from calibbench.strategies.zeroq import (ZeroQ, ZeroQConfig, ZeroQObjective, init_images,
                                         input_loss)

log = logging.getLogger(__name__)

MARGIN_SOURCES = ("init", "real", "fixed")
GRANULARITIES = ("layer", "channel")
# Seed offset of the margin draw: below the batch stride (zeroq.BATCH_SEED_STRIDE), so it never
# coincides with a batch's stream for seeds < 500,000.
MARGIN_SEED_OFFSET = 500_009


@dataclass
class DSGConfig(ZeroQConfig):
    name: str = "dsg"
    margin_source: str = "init"  # init: stats of initial (Gaussian) synthetic images, the paper | real: train images | fixed
    epsilon: float = 0.9  # margins = epsilon-quantile of the observed |deviation| (paper: 0.9)
    margin_granularity: str = "layer"  # layer: one δ, γ per BN layer | channel: one per channel
    margin_samples: int = 256  # images observed to set the margins (init / real)
    delta: float = 0.0  # margin_source=fixed: mean margin
    gamma: float = 0.0  # margin_source=fixed: std margin
    enhance_weight: float = 2.0  # LSE: weight of layer (i mod L) for image i; 1 = no enhancement
    ce_weight: float = 0.0  # cross-entropy to random labels; 0 = the CVPR paper (no label term)


def slack_hinge(deviation: Tensor, margin: Tensor | float) -> Tensor:
    """``max(|deviation| − margin, 0)²``: zero inside the margin, quadratic beyond it."""
    return F.relu(deviation.abs() - margin).pow(2)


def quantile(x: Tensor, q: float, dim: int = 0) -> Tensor:
    """Linear-interpolation quantile along ``dim`` by sorting (torch.quantile caps input size)."""
    n = x.shape[dim]
    s = x.sort(dim=dim).values
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return s.select(dim, lo) * (1 - frac) + s.select(dim, hi) * frac


def enhancement_weights(n: int, num_layers: int, weight: float, device: Optional[torch.device] = None
                        ) -> Tensor:
    """N×L weights: 1 everywhere, ``weight`` at (i, i mod L) — the paper's I + 11ᵀ for N = L."""
    w = torch.ones(n, num_layers, device=device)
    idx = torch.arange(n, device=device)
    w[idx, idx % num_layers] = weight
    return w


class DSGObjective(ZeroQObjective):
    """SDA with LSE on the BN layers, ZeroQ's input term, optional CE.

    Terms: ``slack`` (the plain SDA sum, every layer weight 1), ``enhance`` (what LSE adds on top),
    ``input``, ``ce`` (only with ``ce_weight > 0``), and ``bn`` — ZeroQ's unslackened loss, logged
    for comparison only (no gradient, not part of ``total``).
    """

    def __init__(self, recorder: BNStatsRecorder, targets: BNTargets, input_weight: float,
                 delta: Tensor, gamma: Tensor, enhance_weight: float, ce_weight: float) -> None:
        super().__init__(recorder, targets, input_weight)
        self.delta, self.gamma = delta, gamma  # (ΣC,) each, aligned with targets.flat()
        self.layer_of = targets.layer_index().to(self.target_mean.device)
        self.num_layers = len(targets.names)
        self.enhance_weight, self.ce_weight = enhance_weight, ce_weight
        self._weights: dict[int, Tensor] = {}

    def weights(self, n: int) -> Tensor:
        if n not in self._weights:
            self._weights[n] = enhancement_weights(n, self.num_layers, self.enhance_weight,
                                                   self.target_mean.device)
        return self._weights[n]

    def __call__(self, images: Tensor, logits: Tensor, labels: Optional[Tensor]) -> dict[str, Tensor]:
        dm, ds = self.deviations()
        n = images.shape[0]
        hinge = slack_hinge(dm, self.delta) + slack_hinge(ds, self.gamma)  # N×ΣC
        per_layer = hinge.new_zeros(n, self.num_layers).index_add_(1, self.layer_of, hinge)  # N×L
        slack = per_layer.sum() / n
        enhance = ((self.weights(n) - 1) * per_layer).sum() / n
        inp = input_loss(images)
        total = slack + enhance + self.input_weight * inp
        terms = {"total": total, "slack": slack, "enhance": enhance, "input": inp}
        if self.ce_weight > 0:
            if labels is None:
                raise RuntimeError("dsg: ce_weight > 0 needs labels for the batch")
            ce = F.cross_entropy(logits, labels)
            terms["ce"] = ce
            terms["total"] = total + self.ce_weight * ce
        with torch.no_grad():
            terms["bn"] = (dm.pow(2).sum() + ds.pow(2).sum()) / n
        return terms


@register("dsg", DSGConfig)
class DSG(ZeroQ):
    """ZeroQ's loop and setting (Adam lr 0.5, plateau schedule, budget sizes) with DSG's loss."""

    def validate(self) -> None:
        super().validate()
        cfg = self.cfg
        check_choice("strategy.margin_source", cfg.margin_source, MARGIN_SOURCES)
        check_choice("strategy.margin_granularity", cfg.margin_granularity, GRANULARITIES)
        if not 0.0 <= cfg.epsilon <= 1.0:
            raise ConfigError(f"strategy.epsilon={cfg.epsilon} must be in [0, 1] (a quantile; the paper uses 0.9)")
        if cfg.margin_source != "fixed" and cfg.margin_samples < 1:
            raise ConfigError(f"strategy.margin_samples={cfg.margin_samples} must be >= 1")
        for key in ("delta", "gamma", "enhance_weight", "ce_weight"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"strategy.{key}={getattr(cfg, key)} must be non-negative")

    def batch_labels(self, ctx: StrategyContext, generator: torch.Generator, size: int) -> Optional[Tensor]:
        if self.cfg.ce_weight <= 0:
            return None
        return torch.randint(0, ctx.data.num_classes, (size,), generator=generator)

    def make_objective(self, ctx: StrategyContext, recorder: BNStatsRecorder, targets: BNTargets
                       ) -> tuple[DSGObjective, dict[str, Any]]:
        delta, gamma, info = self.margins(ctx, recorder, targets)
        objective = DSGObjective(recorder, targets, self.cfg.input_weight, delta, gamma,
                                 self.cfg.enhance_weight, self.cfg.ce_weight)
        info.update(enhance_weight=self.cfg.enhance_weight, ce_weight=self.cfg.ce_weight)
        return objective, info

    # -- margins ----------------------------------------------------------------------------
    def margins(self, ctx: StrategyContext, recorder: BNStatsRecorder, targets: BNTargets
                ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """(δ, γ), each (ΣC,) aligned with ``targets.flat()``, and a summary for ``info``."""
        cfg = self.cfg
        t_mean, _ = targets.flat()
        layer_of = targets.layer_index().to(t_mean.device)
        info: dict[str, Any] = {"margin_source": cfg.margin_source, "epsilon": cfg.epsilon,
                                "margin_granularity": cfg.margin_granularity}
        if cfg.margin_source == "fixed":
            delta = torch.full_like(t_mean, cfg.delta)
            gamma = torch.full_like(t_mean, cfg.gamma)
        else:
            dev_m, dev_s = self.observed_deviations(ctx, recorder, targets)
            delta = self._reduce(dev_m, layer_of, len(targets.names))
            gamma = self._reduce(dev_s, layer_of, len(targets.names))
            info["margin_samples"] = int(dev_m.shape[0])
            if cfg.margin_source == "real":
                info["images_seen"] = int(dev_m.shape[0])
        counts = torch.bincount(layer_of, minlength=len(targets.names)).clamp_min(1)

        def per_layer(v: Tensor) -> list[float]:  # channel granularity: mean over the layer's channels
            return (v.new_zeros(len(targets.names)).index_add_(0, layer_of, v) / counts).tolist()

        info["delta_per_layer"] = per_layer(delta)
        info["gamma_per_layer"] = per_layer(gamma)
        return delta, gamma, info

    def _reduce(self, dev: Tensor, layer_of: Tensor, num_layers: int) -> Tensor:
        """ε-quantile of |deviation| per channel, or per layer (pooled over images and channels)."""
        eps = self.cfg.epsilon
        if self.cfg.margin_granularity == "channel":
            return quantile(dev, eps, dim=0)
        per_layer = torch.stack([quantile(dev[:, layer_of == l].flatten(), eps) for l in range(num_layers)])
        return per_layer[layer_of]

    def observed_deviations(self, ctx: StrategyContext, recorder: BNStatsRecorder, targets: BNTargets
                            ) -> tuple[Tensor, Tensor]:
        """|μ̃ − μ_BN| and |σ̃ − σ_BN| per image (M×ΣC) on ``margin_samples`` images, no gradient."""
        cfg = self.cfg
        gen = ctx.generator(MARGIN_SEED_OFFSET)
        n = cfg.margin_samples
        if cfg.margin_source == "init":
            images = init_images(cfg.init, n, ctx.data, gen)
        else:
            from calibbench.strategies.random import check_pool

            pool = len(ctx.data.train)  # type: ignore[arg-type]
            check_pool(n, pool, "the train split (strategy.margin_samples)")
            indices = torch.randperm(pool, generator=gen)[:n].sort().values.tolist()
            images, _ = ctx.data.load(indices, "train", ctx.budget.calib_batch_size)
        t_mean, t_std = targets.flat()
        dev_m, dev_s = [], []
        chunk = max(1, ctx.budget.synth_batch_size)
        with torch.no_grad():
            for start in range(0, n, chunk):
                recorder.clear()
                ctx.model(images[start:start + chunk].to(ctx.device))
                mean, std = recorder.flat_image_stats()
                dev_m.append((mean - t_mean).abs())
                dev_s.append((std - t_std).abs())
        return torch.cat(dev_m), torch.cat(dev_s)
