"""The generator's loss terms, and the statistics helpers the generator methods share.

Generator loss terms (``GEN_TERMS``, filled with ``@gen_term("name")``) map one generator step
(:class:`GenStepOutputs`: images, labels, the FP model's logits and its per-layer BN-input
statistics, the BN running statistics, the step, the strategy's state) to a scalar. A method module
adds its own terms (FDDA's D-BNS/C-BNS, ClusterQ's centroid alignment) by decorating a
:class:`GenLossTerm` subclass in its own file; the strategy config's ``losses`` dict weights them.

Shared by every term that compares BN statistics (``bns`` here, FDDA's C-BNS/D-BNS, ClusterQ's
alignment and diversity): :func:`spread` (the moment compared: variance or std),
:func:`moment_mse` (MSE of the means + MSE of the spreads) and :func:`noisy_targets` (a class
centre plus Gaussian noise, drawn from the generator the caller passes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from calibbench.bnstats import BNTargets
from calibbench.config import ConfigError, check_choice
from calibbench.registry import Registry

BNS_MOMENTS = ("var", "std")


def spread(std: Tensor, moment: str) -> Tensor:
    """The spread statistic compared: the variance (``moment=var``, as std²: the eps both stds
    carry cancels in a difference) or the std itself (``moment=std``)."""
    return std.pow(2) if moment == "var" else std


def moment_mse(mean: Tensor, std: Tensor, t_mean: Tensor, t_spread: Tensor, moment: str,
               mse: Callable[[Tensor, Tensor], Tensor] = F.mse_loss) -> Tensor:
    """``mse(mean, t_mean) + mse(spread(std), t_spread)``: the BN-moment loss of one set of
    statistics against its targets (``t_spread`` already a spread: the target's variance or std,
    possibly noisy). ``mse`` is how the squared errors are averaged (default: over everything;
    ClusterQ averages per deep layer first)."""
    spread_term = mse(spread(std, moment), t_spread)
    return mse(mean, t_mean) + spread_term


def noisy_targets(t_mean: Tensor, t_spread: Tensor, sd_mean: float, sd_spread: float,
                  generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """A class centre plus Gaussian noise: ``(t_mean + N(0, sd_mean²), t_spread + N(0, sd_spread²))``,
    element-wise, the mean's noise drawn first, both from ``generator`` (``None``: torch's global
    generator) on the CPU and moved to the targets' device and dtype."""
    noise_mean = torch.randn(t_mean.shape, generator=generator).to(t_mean) * sd_mean
    noise_spread = torch.randn(t_spread.shape, generator=generator).to(t_spread) * sd_spread
    return t_mean + noise_mean, t_spread + noise_spread


@dataclass
class GenStepOutputs:
    """What one generator step computed (all on the autograd graph into the generator).

    ``bn_batch``: per recorded BN layer of the FP model, the (mean, std) over the batch (C,) of
    that layer's input; ``bn_image``: the same per image (N×C), when the strategy asked for it.
    ``targets``: the layers' running statistics (std = sqrt(running_var + eps), same eps as the
    recorded stds). ``state``: the strategy's per-run state (FDDA's centers, ClusterQ's centroids).
    """

    images: Tensor
    labels: Tensor
    logits: Tensor
    bn_batch: list[tuple[Tensor, Tensor]]
    targets: BNTargets
    step: int
    bn_image: Optional[list[tuple[Tensor, Tensor]]] = None
    state: dict[str, Any] = field(default_factory=dict)


class GenLossTerm(ABC):
    """One named generator loss term; ``cfg`` is the strategy config (read only your options)."""

    name: str = ""
    per_image_stats: bool = False  # True: the step must record per-image BN statistics too

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def __call__(self, out: GenStepOutputs) -> Tensor:
        """The term's scalar value for this step."""


GEN_TERMS: Registry[type[GenLossTerm]] = Registry("generator loss term")


def gen_term(name: str) -> Callable[[type[GenLossTerm]], type[GenLossTerm]]:
    """Class decorator: make a generator loss term available as ``strategy.losses.<name>``."""
    return GEN_TERMS.register(name)


def available_gen_terms() -> list[str]:
    return GEN_TERMS.available()


def build_gen_terms(cfg: Any, strategy: str = "generator") -> list[tuple[str, float, GenLossTerm]]:
    """``(name, weight, term)`` for every term of ``cfg.losses`` with a positive weight."""
    terms = []
    for name, weight in cfg.losses.items():
        check_choice(f"strategy {strategy} generator loss term", name, available_gen_terms())
        if float(weight) < 0:
            raise ConfigError(f"strategy.losses.{name}={weight} is negative; weights must be >= 0")
        if float(weight) > 0:
            terms.append((name, float(weight), GEN_TERMS.get(name)(cfg)))
    if not terms:
        raise ConfigError(f"strategy {strategy}: no generator loss term with a positive weight "
                          f"(strategy.losses={dict(cfg.losses)}); valid: {', '.join(available_gen_terms())}")
    return terms


@gen_term("ce")
class GenCETerm(GenLossTerm):
    """CE(F(G(z, y)), y): the FP model must classify each generated image as its label."""

    def __call__(self, out: GenStepOutputs) -> Tensor:
        return F.cross_entropy(out.logits, out.labels)


@gen_term("bns")
class GenBNSTerm(GenLossTerm):
    """BN-statistics loss on *batch* statistics, averaged over the BN layers: per layer
    MSE(batch mean, running mean) + MSE(batch moment, running moment), where the moment is the
    variance (``bns_moment=var``: the GDFQ code) or the std (``bns_moment=std``: the paper's
    σ). The variance difference is formed as std² − std_r², which equals var − running_var
    because both stds carry the same eps.
    """

    def __call__(self, out: GenStepOutputs) -> Tensor:
        moment = getattr(self.cfg, "bns_moment", "var")
        losses = [moment_mse(mean, std, t_mean, spread(t_std, moment), moment)
                  for (mean, std), t_mean, t_std in zip(out.bn_batch, out.targets.mean, out.targets.std)]
        return torch.stack(losses).mean()


__all__ = ["GenStepOutputs", "GenLossTerm", "GEN_TERMS", "gen_term", "available_gen_terms", "build_gen_terms",
           "BNS_MOMENTS", "spread", "moment_mse", "noisy_targets"]
