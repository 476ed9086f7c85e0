"""``dsg``: ZeroQ with slack distribution alignment and layerwise sample enhancement.

DSG (Zhang et al., CVPR 2021, "Diversifying Sample Generation for Accurate Data-Free
Quantization") argues that ZeroQ's exact matching makes every synthetic image's statistics
collapse onto the BN statistics (homogenization). It changes ZeroQ's loss in two ways:

- **Slack distribution alignment (SDA)**: per layer and channel,
  ``max(|μ̃ − μ_BN| − δ, 0)² + max(|σ̃ − σ_BN| − γ, 0)²`` on each image's statistics; a deviation
  inside the margin costs nothing. The margins δ, γ are the ε-percentile (ε = 0.9) of the
  deviations observed on the synthetic images at initialization (Gaussian noise) —
  ``margin_source=init``; ``real`` measures them on real train images, ``fixed`` takes constants.
- **Layerwise sample enhancement (LSE)**: the paper sets the batch size N to the number of BN
  layers L and weights image i's SDA loss at layer i by 2 (``I + 11ᵀ``), so different images are
  pulled hardest at different depths. Here batches have L images by default (``batch_size:
  layers``; the last batch smaller) and image g of the run (0-based over all batches) has layer
  ``g mod L`` weighted by ``enhance_weight`` — image i of every full batch at layer i, the paper's
  matrix, and with any other batch size every layer is still enhanced equally often (within one)
  over the whole synthesis.

The CVPR paper's objective has no label term; ``ce_weight > 0`` adds one cross-entropy term
towards random labels (the TPAMI/reference code's addition — counted once here, the reference
code adds it twice). Reasons and deviations: ``docs/zeroq_dsg.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from calibbench.bnstats import BNStatsRecorder, BNTargets, find_bn_layers
from calibbench.config import ConfigError, check_choice
from calibbench.modes import frozen
from calibbench.strategies import synthesis
from calibbench.strategies.base import CalibrationSet, StrategyContext, register
from calibbench.strategies.random import check_pool
from calibbench.strategies.synthesis import (
    IMAGE_STREAM,
    Synthesis,
    SynthesisStrategy,
    init_images,
    input_loss,
    synthesize,
)
from calibbench.strategies.zeroq import ZeroQConfig, ZeroQObjective

log = logging.getLogger(__name__)

MARGIN_SOURCES = ("init", "real", "fixed")
GRANULARITIES = ("layer", "channel")
BATCH_SIZES = ("layers", "budget")  # or a positive integer
# Named random streams (ctx.generator): the margin draw and the CE labels. The starting images
# use the shared "synth/image{i}" streams (synthesis.py), as ZeroQ does.
STREAM_MARGINS, STREAM_LABELS = "dsg/margins", "dsg/labels"


@dataclass
class DSGConfig(ZeroQConfig):
    name: str = "dsg"
    # init: stats of initial (Gaussian) synthetic images, the paper | real: train images | fixed
    margin_source: str = "init"
    epsilon: float = 0.9  # margins = epsilon-quantile of the observed |deviation| (paper: 0.9)
    margin_granularity: str = "layer"  # layer: one δ, γ per BN layer | channel: one per channel
    margin_samples: int = 256  # images observed to set the margins (init / real)
    delta: float = 0.0  # margin_source=fixed: mean margin
    gamma: float = 0.0  # margin_source=fixed: std margin
    enhance_weight: float = 2.0  # LSE: weight of layer (i mod L) for image i; 1 = no enhancement
    ce_weight: float = 0.0  # cross-entropy to random labels; 0 = the CVPR paper (no label term)
    # Images per optimized batch: layers (the number of BN layers L, the paper's N = L) | budget
    # (budget.synth_batch_size) | a positive integer.
    batch_size: Any = "layers"


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


def enhanced_layers(start: int, n: int, num_layers: int, device: Optional[torch.device] = None
                    ) -> Tensor:
    """The layer each of images ``start … start + n − 1`` (run indices) is enhanced at: g mod L."""
    return torch.arange(start, start + n, device=device) % num_layers


def enhancement_weights(n: int, num_layers: int, weight: float, device: Optional[torch.device] = None,
                        start: int = 0) -> Tensor:
    """N×L weights: 1 everywhere, ``weight`` at (i, (start + i) mod L), where ``start`` is the run
    index of the batch's first image — the paper's I + 11ᵀ for N = L and start a multiple of L."""
    w = torch.ones(n, num_layers, device=device)
    w[torch.arange(n, device=device), enhanced_layers(start, n, num_layers, device)] = weight
    return w


def resolve_batch_size(value: Any, num_layers: int, budget_batch: int) -> int:
    """``layers`` → L, ``budget`` → ``budget.synth_batch_size``, an integer ≥ 1 → itself."""
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if isinstance(value, bool) or not (value in BATCH_SIZES or (isinstance(value, int) and value >= 1)):
        raise ConfigError(f"strategy.batch_size={value!r} must be 'layers' (the number of BN layers, "
                          f"the paper), 'budget' (budget.synth_batch_size) or an integer >= 1")
    if value == "layers":
        return int(num_layers)
    if value == "budget":
        return int(budget_batch)
    return int(value)


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
        self._weights: dict[tuple[int, int], Tensor] = {}
        self.start = 0  # run index of the current batch's first image (begin_batch)
        self.enhance_counts = [0] * self.num_layers  # images enhanced per layer so far

    def begin_batch(self, start: int, size: int) -> None:
        self.start = start
        for layer in enhanced_layers(start, size, self.num_layers).tolist():
            self.enhance_counts[layer] += 1

    def info(self) -> dict[str, Any]:
        return {"enhance_counts": list(self.enhance_counts)}

    def weights(self, n: int) -> Tensor:
        key = (n, self.start % self.num_layers)
        if key not in self._weights:
            self._weights[key] = enhancement_weights(n, self.num_layers, self.enhance_weight,
                                                     self.target_mean.device, start=key[1])
        return self._weights[key]

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
class DSG(SynthesisStrategy):
    """The shared synthesis loop with ZeroQ's setting (Adam lr 0.5, plateau schedule, budget
    iterations) and DSG's loss, on batches of L images (the number of BN layers) by default."""

    cfg: DSGConfig
    paper_reading = {"batch_size": "layers"}  # the paper's N = L

    @classmethod
    def check_options(cls, cfg: Any) -> None:
        synthesis.check_options(cfg)
        check_choice("strategy.margin_source", cfg.margin_source, MARGIN_SOURCES)
        check_choice("strategy.margin_granularity", cfg.margin_granularity, GRANULARITIES)
        if not 0.0 <= cfg.epsilon <= 1.0:
            raise ConfigError(f"strategy.epsilon={cfg.epsilon} must be in [0, 1] (a quantile; the paper uses 0.9)")
        if cfg.margin_source != "fixed" and cfg.margin_samples < 1:
            raise ConfigError(f"strategy.margin_samples={cfg.margin_samples} must be >= 1")
        for key in ("delta", "gamma", "enhance_weight", "ce_weight"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"strategy.{key}={getattr(cfg, key)} must be non-negative")
        resolve_batch_size(cfg.batch_size, 1, 1)  # the value's form; L and the budget come later

    def batch_size(self, ctx: StrategyContext) -> int:
        return resolve_batch_size(self.cfg.batch_size, len(find_bn_layers(ctx.model)),
                                  ctx.budget.synth_batch_size)

    def resolved_config(self, ctx: StrategyContext) -> dict[str, Any]:
        """``batch_size`` resolved to the number of images per batch this run uses."""
        out = super().resolved_config(ctx)
        out["batch_size"] = self.batch_size(ctx)
        return out

    def labels(self, ctx: StrategyContext) -> Optional[Tensor]:
        """Uniform random labels (one draw of the ``"dsg/labels"`` stream, independent of the
        batch layout) when ``ce_weight > 0``; none otherwise."""
        if self.cfg.ce_weight <= 0:
            return None
        return torch.randint(0, ctx.data.num_classes, (ctx.num_samples,),
                             generator=ctx.generator(STREAM_LABELS))

    def plan(self, ctx: StrategyContext) -> Synthesis:
        """The shared loop's settings: ``num_samples`` images in batches of :meth:`batch_size`,
        ``budget.synth_iterations`` steps, Adam at ``strategy.lr``."""
        cfg, iters = self.cfg, int(ctx.budget.synth_iterations)
        sizes = synthesis.batch_sizes(self.name, int(ctx.num_samples), self.batch_size(ctx), iters,
                                      int(ctx.budget.synth_batch_size))
        return Synthesis(self.name, cfg.init, sizes, iters, float(cfg.lr), cfg.lr_schedule, cfg.lr_patience,
                         cfg.min_lr, cfg.log_every)

    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        plan = self.plan(ctx)
        labels = self.labels(ctx)
        start = time.perf_counter()
        with frozen(ctx.model) as model, BNStatsRecorder(model) as recorder:  # per-image statistics
            objective, extra = self.objective(ctx, recorder, recorder.targets(ctx.device))
            calib = synthesize(ctx, model, recorder, objective, plan, labels, objective.begin_batch, extra,
                               started=start)
        calib.info.update(objective.info())
        return calib

    def objective(self, ctx: StrategyContext, recorder: BNStatsRecorder, targets: BNTargets
                  ) -> tuple[DSGObjective, dict[str, Any]]:
        """DSG's loss (margins measured here) and what to record about it in ``info``."""
        delta, gamma, info = self.margins(ctx, recorder, targets)
        objective = DSGObjective(recorder, targets, self.cfg.input_weight, delta, gamma,
                                 self.cfg.enhance_weight, self.cfg.ce_weight)
        info.update(enhance_weight=self.cfg.enhance_weight, ce_weight=self.cfg.ce_weight,
                    batch_size_setting=str(self.cfg.batch_size),
                    streams={"init": IMAGE_STREAM, "margins": STREAM_MARGINS
                             if self.cfg.margin_source != "fixed" else None,
                             "labels": STREAM_LABELS if self.cfg.ce_weight > 0 else None})
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
        per_layer = torch.stack([quantile(dev[:, layer_of == i].flatten(), eps) for i in range(num_layers)])
        return per_layer[layer_of]

    def observed_deviations(self, ctx: StrategyContext, recorder: BNStatsRecorder, targets: BNTargets
                            ) -> tuple[Tensor, Tensor]:
        """|μ̃ − μ_BN| and |σ̃ − σ_BN| per image (M×ΣC) on ``margin_samples`` images, no gradient."""
        cfg = self.cfg
        gen = ctx.generator(STREAM_MARGINS)
        n = cfg.margin_samples
        if cfg.margin_source == "init":
            images = init_images(cfg.init, n, ctx.data, gen)
        else:  # real: a uniform draw from the calibration pool (never the validation split)
            pool = ctx.data.pool
            check_pool(n, len(pool), "the calibration pool (strategy.margin_samples)")
            indices = pool[torch.randperm(len(pool), generator=gen)[:n]].sort().values.tolist()
            images, _, _, _ = ctx.data.load_valid(indices, "train", ctx.budget.calib_batch_size)
            n = len(images)  # corrupt files are dropped (with a warning)
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
