"""The conditional generator of generator-based data-free quantization, and its loss terms.

:class:`Generator` (GDFQ-style, METHODS.md "Generator") maps a latent code ``z`` (dim 100) and a
class label ``y`` to an image in the FP model's *normalized* input space:

- ``cifar`` variant (inputs up to 64 px, GDFQ's CIFAR generator): label embedding ⊙ z → Linear →
  128 × s/4 × s/4 → BN → [upsample ×2 → conv 3×3 → BN → LeakyReLU(0.2)] → [upsample ×2 → conv → 64
  → BN → LeakyReLU] → conv → 3 → Tanh → BN(affine=False);
- ``imagenet`` variant (larger inputs): the same head at s/16, four upsampling stages, and
  *conditional* BatchNorm (a per-class scale and shift) after every conv, as the GDFQ ImageNet
  generator does.

The final ``BatchNorm2d(affine=False)`` (GDFQ) standardizes every channel of a batch, so the output
lives where normalized real images live (channel mean 0, std 1) without knowing the dataset's
normalization.

Generator loss terms (``GEN_TERMS``, filled with ``@gen_term("name")``) map one generator step
(:class:`GenStepOutputs`: images, labels, the FP model's logits and its per-layer BN-input
statistics, the BN running statistics, the step, the strategy's state) to a scalar. A strategy
module adds its own terms (FDDA's D-BNS/C-BNS, ClusterQ's centroid alignment) by decorating a
:class:`GenLossTerm` subclass in its own file; the strategy config's ``losses`` dict weights them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calibbench.bnstats import BNTargets
from calibbench.config import ConfigError, check_choice
from calibbench.registry import Registry

LATENT_DIM = 100
VARIANTS = ("auto", "cifar", "imagenet")
CIFAR_MAX_SIZE = 64  # inputs up to this size get the cifar variant under variant=auto


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine; a per-class scale (init 1) and shift (init 0) instead."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        out = self.bn(x)
        return out * self.scale(y)[:, :, None, None] + self.shift(y)[:, :, None, None]


class Generator(nn.Module):
    """G(z, y) → images (N × channels × size × size) in the model's normalized input space."""

    def __init__(self, num_classes: int, img_size: int, channels: int = 3, latent_dim: int = LATENT_DIM,
                 variant: str = "auto", width: int = 128) -> None:
        super().__init__()
        check_choice("generator variant", variant, VARIANTS)
        if variant == "auto":
            variant = "cifar" if img_size <= CIFAR_MAX_SIZE else "imagenet"
        stages = 2 if variant == "cifar" else 4
        if img_size % (2 ** stages):
            raise ConfigError(f"generator variant {variant!r} upsamples {stages} times: the input size "
                              f"{img_size} must be a multiple of {2 ** stages}")
        self.variant, self.num_classes, self.img_size = variant, int(num_classes), int(img_size)
        self.latent_dim, self.channels = int(latent_dim), int(channels)
        self.conditional = variant == "imagenet"
        self.init_size = img_size // (2 ** stages)
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, width * self.init_size ** 2)
        self.width = width
        self.bn0 = nn.BatchNorm2d(width)
        widths = [width] * (stages - 1) + [width // 2]
        convs, norms = [], []
        c_in = width
        for c_out in widths:
            convs.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            norms.append(ConditionalBatchNorm2d(c_out, num_classes) if self.conditional
                         else nn.BatchNorm2d(c_out, eps=0.8))  # eps 0.8: the GDFQ code
            c_in = c_out
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.to_image = nn.Conv2d(c_in, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(self.embed(y) * z).view(z.shape[0], self.width, self.init_size, self.init_size)
        h = self.bn0(h)
        for conv, norm in zip(self.convs, self.norms):
            h = conv(F.interpolate(h, scale_factor=2))
            h = F.leaky_relu(norm(h, y) if self.conditional else norm(h), 0.2)
        return self.out_bn(torch.tanh(self.to_image(h)))


def build_generator(num_classes: int, model_num_classes: int, img_size: int, channels: int = 3,
                    latent_dim: int = LATENT_DIM, variant: str = "auto", strategy: str = "generator"
                    ) -> Generator:
    """A :class:`Generator` for a model with ``model_num_classes`` outputs; a ConfigError naming
    ``strategy`` when the generator's classes are not the model's (its labels would be wrong)."""
    if int(num_classes) != int(model_num_classes):
        raise ConfigError(f"strategy {strategy}: the generator has num_classes={num_classes} but the "
                          f"model predicts {model_num_classes} classes; they must be equal (the "
                          f"generator's labels are the model's classes)")
    return Generator(int(num_classes), int(img_size), channels, latent_dim, variant)


# -- generator loss terms --------------------------------------------------------------------------
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
        losses = []
        for (mean, std), t_mean, t_std in zip(out.bn_batch, out.targets.mean, out.targets.std):
            if moment == "var":
                spread = F.mse_loss(std.pow(2), t_std.pow(2))
            else:
                spread = F.mse_loss(std, t_std)
            losses.append(F.mse_loss(mean, t_mean) + spread)
        return torch.stack(losses).mean()


__all__ = ["Generator", "ConditionalBatchNorm2d", "build_generator", "GenStepOutputs", "GenLossTerm",
           "GEN_TERMS", "gen_term", "available_gen_terms", "build_gen_terms", "LATENT_DIM"]
