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

The loss terms that train it are in ``terms.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calibbench.config import ConfigError, check_choice

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


__all__ = ["Generator", "ConditionalBatchNorm2d", "build_generator", "LATENT_DIM", "VARIANTS"]
