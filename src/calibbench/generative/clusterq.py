"""``clusterq``: ClusterQ (Gao et al., 2022), generator-based data-free quantization with class-wise
centroids of deep-layer feature statistics — the paper's semantics (METHODS.md "ClusterQ"; only the
abstract is in ``papers/003``, so the decisions below are calibbench's and say where they come from).

**Deep layers and state.** The FP model's BN layers in forward order (``bn_layers``: every
BatchNorm2d, L of them) are recorded for the global BNS term; the *deep* ones are
``layers[K:]`` with the 0-based index ``K = max(0, ceil(L/2) − 2)`` (``k_indexing=zero_based``, the
default: the ClusterQ code's ``start_layer = int((L + 1)/2) − 2`` used as a 0-based index, the only
source for ClusterQ's K; pytorchcv resnet20: L = 21 with the two projection-shortcut BNs, K = 9,
12 deep layers). ``k_indexing=one_based`` reads K as FDDA's paper does (layers counted from 1, so
0-based start K − 1: 13 deep layers on resnet20), for a like-for-like comparison with ``fdda``. The per-run state
(``GenStepOutputs.state``) holds, with ``D`` = the deep layers' channels side by side:

- ``centroid_mean[c]``, ``centroid_std[c]`` (num_classes × D): class c's centroid, initialised for
  every class to the deep layers' BN statistics (``running_mean``, ``sqrt(running_var + eps)``);
- ``ema_updates[c]``: how many EMA updates class c has had;
- ``deep_start`` (K) and ``deep_channels`` (channels per deep layer, to split D).

**Class statistics.** For the images of class c in a batch, the (mean, std) of a deep layer's input
pooled over those images and positions, as a BN layer in training mode would see that subset
(biased variance): ``mean_c = avg_i m_i``, ``std_c = sqrt(avg_i s_i² + avg_i (m_i − mean_c)²)``
from the per-image means m_i and stds s_i = sqrt(var_i + eps) (law of total variance; the eps
carries through, so std_c = sqrt(var_c + eps), comparable with the centroids).

**EMA update** (:meth:`ClusterQ.update_state`, after every generator step, ``no_grad``): once the
step exceeds ``ema_warmup_steps`` (null: ``budget.gen_warmup_steps``, the generator warm-up, as the
ClusterQ code starts its centroid updates when its warm-up ends), let ``S_c`` be the images of
label c that the FP model classifies *correctly* (argmax of the step's logits == c); for every class
with ``S_c`` non-empty, with ``d = ema_decay`` (0.2)::

    centroid_mean[c] ← (1 − d) · centroid_mean[c] + d · mean_c(S_c)
    centroid_std[c]  ← (1 − d) · centroid_std[c]  + d · std_c(S_c)

i.e. 0.2 weights the *new* batch statistic (the ClusterQ code's ``soft_decay`` side, PyTorch BN's
momentum convention). Misclassified images are left out; a class without a correct image in the
step keeps its centroid. The EMA runs on the std (METHODS.md's "stats"), the code's on the variance.
Each update's centroid shift — the RMS over the 2·D coordinates of (new − old), averaged over the
updated classes — is recorded with its step and the number of classes updated.

**Generator loss** ``strategy.losses``: ``ce`` + ``bns`` (global batch statistics over every BN
layer, as gdfq) + ``align`` (:class:`AlignTerm`) + ``diversity`` (:class:`DiversityTerm`). Both
new terms average per-layer MSEs over the deep layers and compare the std or the variance as
``bns_moment`` says (default var, the GDFQ/ClusterQ code's moment).

- ``align``: every class present in the batch, its class statistics (mean_c, std_c) to its centroid.
- ``diversity``: the same pull toward a *perturbed* centroid: target = centroid + ε with
  ε ~ N(0, ``div_var_mean``) on the mean and N(0, ``div_var_std``) on the compared moment (the
  variance under ``bns_moment=var``, as FDDA perturbs the variance; the std under ``std``), drawn
  afresh every step, so the expected target is the centroid itself (issue 21: the noise used to be
  added to the std and squared, E = σ² + 1); ``div_level=image`` (default) gives every image its
  own ε and compares that image's statistics -- its mean, and its spread about the class centroid's
  mean, whose expectation is the class-pooled variance the centroid holds (distinct targets within
  a class are what counters class-wise mode collapse; FDDA's D-BNS reading); ``div_level=class``
  perturbs the class statistics of ``align`` instead. The gradient is real: 2(stat − centroid − ε)
  reaches the generator.

**Quantized model**: KD fine-tuning on the generated batches, alternating with the generator
(``refine=clusterq``: the ClusterQ code's KD at T = 20 plus CE to the generator's labels, SGD
Nesterov); :meth:`ClusterQ.refinement_record` adds the refinement stage's centroid shifts to its
record (from the state the refinement ended with, handed back by the alternating stage).
``refine=none`` is an error (GeneratorStrategy.check_run).

**How the public code (DiamondSheep/ClusterQ) differs** — it does no clustering at all: its
"centroids" are initialised from, and EMA-updated toward, the teacher's BN *running* statistics
(the hooks store ``module.running_mean``/``running_var``, not the batch's), so they never leave
the BN statistics; its update reads one generated image per class per epoch and keeps the class if
that image is classified correctly; its class-wise loss compares the *whole batch's* statistics to
each sample's class centroid; its diversity term ``MSE(x, x + U(−a, a))`` has no gradient (and its
weight ``D_BNSLoss_weight`` is 0). calibbench implements the paper's description instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from calibbench.bnstats import bn_targets
from calibbench.config import BudgetConfig, ConfigError, RunConfig, check_choice
from calibbench.generative.handover import GeneratorHandover
from calibbench.generative.refiners import GeneratorRefiner
from calibbench.generative.strategy import (
    K_INDEXING,
    GeneratorStrategy,
    GeneratorStrategyConfig,
    class_stats,
    deep_start,
)
from calibbench.generative.terms import GenLossTerm, GenStepOutputs, gen_term, moment_mse, noisy_targets, spread
from calibbench.record import CURVE_POINTS, thin
from calibbench.refine import register as register_refiner
from calibbench.strategies.base import CalibrationSet, StrategyContext, register

if TYPE_CHECKING:
    pass

DIV_LEVELS = ("image", "class")


def deep_image_stats(out: GenStepOutputs) -> tuple[Tensor, Tensor]:
    """The deep layers' per-image (mean, std), N×D (needs ``per_image_stats``)."""
    if out.bn_image is None:
        raise RuntimeError("clusterq terms need per-image BN statistics (per_image_stats=True)")
    deep = out.bn_image[int(out.state["deep_start"]):]
    return torch.cat([m for m, _ in deep], 1), torch.cat([s for _, s in deep], 1)


def layer_mse(pred: Tensor, target: Tensor, channels: list[int]) -> Tensor:
    """MSE per deep layer (over rows and that layer's channels), averaged over the layers."""
    err = (pred - target).pow(2)
    return torch.stack([part.mean() for part in err.split(list(channels), dim=1)]).mean()


def stats_loss(mean: Tensor, std: Tensor, t_mean: Tensor, t_std: Tensor, channels: list[int],
               moment: str, t_var: Optional[Tensor] = None) -> Tensor:
    """:func:`~calibbench.generative.terms.moment_mse` averaged per deep layer (:func:`layer_mse`):
    the means + the moment (std² vs target std² -- or ``t_var`` when given --, or std vs std)."""
    t_spread = t_var if moment == "var" and t_var is not None else spread(t_std, moment)
    return moment_mse(mean, std, t_mean, t_spread, moment, lambda a, b: layer_mse(a, b, channels))


def diversity_targets(t_mean: Tensor, t_std: Tensor, var_mean: float, var_spread: float, moment: str,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """The perturbed centroid: ``(mean + ε_μ, spread + ε_σ)`` with ε_μ ~ N(0, var_mean) and
    ε_σ ~ N(0, var_spread), where the spread is the moment compared (``var``: the variance σ², as
    FDDA adds its noise to the variance; ``std``: σ). Unbiased: E[target] = centroid, for either
    moment (adding the noise to σ and squaring would give E = σ² + var_spread). ``generator=None``
    draws from torch's global generator (what :class:`DiversityTerm` does)."""
    return noisy_targets(t_mean, spread(t_std, moment), math.sqrt(var_mean), math.sqrt(var_spread), generator)


@gen_term("align")
class AlignTerm(GenLossTerm):
    """Each present class's pooled deep-layer statistics to its centroid (mean over classes,
    channels and deep layers)."""

    per_image_stats = True

    def __call__(self, out: GenStepOutputs) -> Tensor:
        mean, std = deep_image_stats(out)
        present, cmean, cstd = class_stats(mean, std, out.labels)
        state = out.state
        return stats_loss(cmean, cstd, state["centroid_mean"][present], state["centroid_std"][present],
                          state["deep_channels"], getattr(self.cfg, "bns_moment", "var"))


@gen_term("diversity")
class DiversityTerm(GenLossTerm):
    """Statistics to a Gaussian-perturbed centroid, ε drawn afresh each step (per image or per
    class, ``div_level``); variances ``div_var_mean`` / ``div_var_std``. At ``div_level=image``
    an image's spread is taken about its class centroid's mean, ``sqrt(s_i² + (m_i − μ_c)²)``:
    by the law of total variance its expectation is the class's pooled variance, which is what the
    centroid holds (an image's own variance alone lacks the spread of the image means)."""

    per_image_stats = True

    def __call__(self, out: GenStepOutputs) -> Tensor:
        mean, std = deep_image_stats(out)
        labels = out.labels
        state = out.state
        if getattr(self.cfg, "div_level", "image") == "class":
            labels, mean, std = class_stats(mean, std, labels)
        else:
            std = torch.sqrt(std.pow(2) + (mean - state["centroid_mean"][labels]).pow(2))
        moment = getattr(self.cfg, "bns_moment", "var")
        t_mean, t_std = state["centroid_mean"][labels], state["centroid_std"][labels]
        d_mean, d_spread = diversity_targets(t_mean, t_std, float(self.cfg.div_var_mean),
                                             float(self.cfg.div_var_std), moment)
        if moment == "var":
            return stats_loss(mean, std, d_mean, t_std, state["deep_channels"], moment, t_var=d_spread)
        return stats_loss(mean, std, d_mean, d_spread, state["deep_channels"], moment)


@dataclass
class ClusterQConfig(GeneratorStrategyConfig):
    name: str = "clusterq"
    ema_decay: float = 0.2  # weight of the new class statistic: c <- (1 - d) c + d s
    ema_warmup_steps: Optional[int] = None  # null: budget.gen_warmup_steps
    div_var_mean: float = 0.5  # variance of the Gaussian added to the centroid mean (diversity)
    div_var_std: float = 1.0  # variance of the Gaussian added to the centroid std (diversity)
    div_level: str = "image"  # image: per-image targets | class: per-class targets
    k_indexing: str = "zero_based"  # zero_based: the ClusterQ code's start layer | one_based: FDDA's paper


@register("clusterq", ClusterQConfig)
class ClusterQ(GeneratorStrategy):
    """Generator with class-wise centroid alignment, EMA centroids and a diversity term."""

    cfg: ClusterQConfig

    def __init__(self, cfg: ClusterQConfig) -> None:
        super().__init__(cfg)
        self.shifts: list[tuple[int, int, float]] = []  # (step, classes updated, RMS shift)
        self._ema_warmup = 0

    # -- config ---------------------------------------------------------------------------------
    def ema_warmup(self, budget: BudgetConfig) -> int:
        value = self.cfg.ema_warmup_steps
        return int(budget.gen_warmup_steps) if value is None else int(value)

    def resolved_config(self, ctx: StrategyContext) -> dict[str, Any]:
        resolved = super().resolved_config(ctx)
        resolved["ema_warmup_steps"] = self.ema_warmup(ctx.budget)
        return resolved

    def check_run(self, cfg: RunConfig) -> None:
        super().check_run(cfg)
        c = self.cfg
        if not 0 < float(c.ema_decay) <= 1:
            raise ConfigError(f"strategy clusterq ema_decay={c.ema_decay} must be in (0, 1] (the weight "
                              f"of the new class statistic)")
        if c.ema_warmup_steps is not None and int(c.ema_warmup_steps) < 0:
            raise ConfigError(f"strategy clusterq ema_warmup_steps={c.ema_warmup_steps} must be >= 0 "
                              f"(or null: budget.gen_warmup_steps)")
        for key in ("div_var_mean", "div_var_std"):
            if float(getattr(c, key)) < 0:
                raise ConfigError(f"strategy clusterq {key}={getattr(c, key)} is a variance, must be >= 0")
        check_choice("strategy clusterq div_level", c.div_level, DIV_LEVELS)
        check_choice("strategy clusterq k_indexing", c.k_indexing, K_INDEXING)

    # -- hooks ----------------------------------------------------------------------------------
    def setup_state(self, ctx: StrategyContext, layers: list[tuple[str, _BatchNorm]]) -> dict[str, Any]:
        """Centroids of every class = the deep layers' BN statistics; resets the shift log."""
        self.shifts = []
        self._ema_warmup = self.ema_warmup(ctx.budget)
        start = deep_start(len(layers), self.cfg.k_indexing)
        targets = bn_targets(layers[start:], ctx.device)
        mean, std = targets.flat()
        classes = self.cfg.num_classes if self.cfg.num_classes is not None else self.model_classes(ctx)
        return {"centroid_mean": mean.repeat(int(classes), 1), "centroid_std": std.repeat(int(classes), 1),
                "ema_updates": torch.zeros(int(classes), dtype=torch.long, device=ctx.device),
                "deep_start": start, "deep_channels": targets.channels}

    def update_state(self, state: dict[str, Any], out: GenStepOutputs, step: int) -> None:
        if step <= self._ema_warmup:
            return
        self.shifts.append((int(step), *ema_update(state, out, float(self.cfg.ema_decay))))

    # -- records --------------------------------------------------------------------------------
    def shift_record(self, max_points: int = CURVE_POINTS) -> dict[str, list]:
        """The centroid shift per EMA update (thinned to ``max_points``, first and last kept)."""
        rows = [self.shifts[i] for i in thin(len(self.shifts), max_points)]
        return {"step": [r[0] for r in rows], "classes_updated": [r[1] for r in rows],
                "shift": [r[2] for r in rows]}

    def refinement_record(self, state: dict[str, Any]) -> dict[str, Any]:
        """The refinement stage's centroid shifts and the EMA updates per class (warm-up included)."""
        return {"centroid_shift": self.shift_record(), "ema_updates_per_class": state["ema_updates"].tolist()}

    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        calib = super().calibration_set(ctx)
        state = GeneratorHandover.from_calibration(calib, "clusterq").strategy_state
        calib.info.update({
            "ema_warmup_steps": self.ema_warmup(ctx.budget), "ema_decay": float(self.cfg.ema_decay),
            "k_indexing": self.cfg.k_indexing, "deep_start": int(state["deep_start"]),
            "deep_layers": len(state["deep_channels"]),
            "ema_updates_per_class": state["ema_updates"].tolist(),
            "centroid_shift": self.shift_record()})
        return calib


@torch.no_grad()
def ema_update(state: dict[str, Any], out: GenStepOutputs, decay: float) -> tuple[int, float]:
    """One EMA update of the centroids from the correctly classified images of ``out`` (module
    docstring); returns (classes updated, mean RMS shift of the updated centroids)."""
    correct = out.logits.argmax(1) == out.labels
    if not bool(correct.any()):
        return 0, 0.0
    mean, std = deep_image_stats(out)
    present, cmean, cstd = class_stats(mean.detach()[correct], std.detach()[correct], out.labels[correct])
    c_mean, c_std = state["centroid_mean"], state["centroid_std"]
    old_mean, old_std = c_mean[present].clone(), c_std[present].clone()
    c_mean[present] = (1 - decay) * old_mean + decay * cmean.to(c_mean.dtype)
    c_std[present] = (1 - decay) * old_std + decay * cstd.to(c_std.dtype)
    state["ema_updates"][present] += 1
    delta = torch.cat([c_mean[present] - old_mean, c_std[present] - old_std], 1)
    shift = delta.pow(2).mean(1).sqrt().mean()
    return int(present.numel()), float(shift)


@register_refiner("clusterq")
class ClusterQRefiner(GeneratorRefiner):
    """ClusterQ's quantized-model side (KD + CE, conf/refine/clusterq.yaml): the alternating stage
    of ``refine=gdfq``; the record gets the centroid shifts through :meth:`ClusterQ.refinement_record`."""


__all__ = ["ClusterQ", "ClusterQConfig", "ClusterQRefiner", "AlignTerm", "DiversityTerm", "ema_update"]
