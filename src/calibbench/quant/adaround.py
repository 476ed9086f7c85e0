"""Adaptive rounding (AdaRound, Nagel et al. 2020): a weight-quantizer mode whose rounding is learned.

Round-to-nearest picks, for every weight, the grid point closest to it. AdaRound instead learns
whether each weight goes *down* (``floor(w / s)``) or *up* (``floor(w / s) + 1``) so that the
layer's (or block's) output on calibration data stays close to the full-precision output. The
choice is relaxed to a continuous variable ``V`` per weight:

    h(V) = clip(sigmoid(V) · (ζ − γ) + γ, 0, 1),   ζ = 1.1, γ = −0.1   (the "rectified sigmoid")
    soft weight = s · (clamp(floor(w / s) + h(V), qmin − z, qmax − z))

and pushed to 0 or 1 by the regulariser ``Σ (1 − |2h − 1|^β)`` (:meth:`AdaRound.regularizer`;
β is annealed by the caller). :meth:`AdaRound.harden` ends it: ``up = h(V) ≥ 0.5``
(equivalently ``V ≥ 0``) and ``V`` is dropped.

The grid (scale ``s`` and zero point ``z``, per channel or per tensor) is the weight quantizer's as
it stands when rounding starts, for either preset (``dfq_legacy``'s raw min/max, ``academic``'s
range with 0); it stays fixed while ``V`` trains (the float weight does not change, so the
quantizer has no reason to recompute its range).

Initialisation (AdaRound's): ``V`` such that ``h(V) = w/s − floor(w/s)`` (the rest), so the
soft-rounded weight equals the float weight wherever the float weight lies inside the grid's range:
``V = −log((ζ − γ) / (rest − γ) − 1)``. Weights outside it (``dfq_legacy``'s grid ends can sit up to
half a step inside the channel's min/max because the zero point is an integer) are clamped, as they
are by round-to-nearest.

Division: ``w · (1/s)`` with the float32 reciprocal, as the quantizer's own kernel computes it, so
"nearest" below is exactly the code round-to-nearest would have produced.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor, nn

from calibbench.quant.quantizer import UniformQuantizer, _broadcast_shape

ZETA, GAMMA = 1.1, -0.1


class RoundableLayer(Protocol):
    """What :func:`attach` needs of a layer (``modules.QuantConv2d`` / ``QuantLinear``, which
    import this module)."""

    weight: Tensor
    weight_quantizer: UniformQuantizer

    def sync_weight_range(self) -> None: ...

    def set_weight_rounding(self, rounding: Optional[AdaRound]) -> None: ...


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clip(sigmoid(V)·(ζ − γ) + γ, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(rest: Tensor) -> Tensor:
    """``V`` with ``h(V) = rest`` for ``rest`` in ``[0, 1)`` (no clipping is active there)."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


class AdaRound(nn.Module):
    """Learned up/down rounding of one weight tensor on the fixed grid of ``quantizer``.

    Soft mode (``V`` a Parameter, training) → hard mode (:meth:`harden`: a boolean ``up`` per
    weight). ``weight`` is read at every call, so the Parameter object is not copied; its *value*
    must not change while rounding is attached (the floor and the grid were taken from it).
    """

    scale: Tensor
    lo: Tensor
    hi: Tensor
    floor: Tensor
    nearest: Tensor
    up: Optional[Tensor]

    def __init__(self, weight: Tensor, quantizer: UniformQuantizer) -> None:
        super().__init__()
        if not quantizer.active:
            raise ValueError("AdaRound needs a weight quantizer with a grid (calibrated and enabled)")
        axis = quantizer.ch_axis
        shape = _broadcast_shape(weight, axis) if axis is not None else [1] * weight.dim()
        w = weight.detach().float()
        scale = quantizer.scale.detach().float().view(shape)
        zp = quantizer.zero_point.detach().float().view(shape)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("lo", (quantizer.qmin - zp).clone())  # code bounds relative to z
        self.register_buffer("hi", (quantizer.qmax - zp).clone())
        x = w * torch.reciprocal(scale)
        floor = torch.floor(x)
        self.register_buffer("floor", floor)
        self.register_buffer("nearest", torch.clamp(torch.round(x), self.lo, self.hi))
        rest = (x - floor).clamp(0.0, 1.0 - 1e-6)  # float error can give exactly 1.0
        self.V: Optional[nn.Parameter] = nn.Parameter(inverse_rectified_sigmoid(rest))
        self.register_buffer("up", None)
        self.version = 0

    @property
    def hard(self) -> bool:
        return self.up is not None

    def h(self) -> Tensor:
        """The soft rounding offsets in ``[0, 1]`` (soft mode only)."""
        if self.V is None:
            raise RuntimeError("AdaRound.h(): rounding is already hard")
        return rectified_sigmoid(self.V)

    def codes(self) -> Tensor:
        """Integer-grid positions relative to the zero point (soft: fractional), clamped."""
        offset = self.up.to(self.floor.dtype) if self.up is not None else self.h()  # hard: up is set
        return torch.maximum(torch.minimum(self.floor + offset, self.hi), self.lo)

    def forward(self) -> Tensor:
        """The (soft or hard) rounded weight."""
        return self.codes() * self.scale

    def regularizer(self, beta: float) -> Tensor:
        """``Σ (1 − |2h − 1|^β)``: 0 when every h is 0 or 1, largest at h = 0.5."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self) -> None:
        """Fix every rounding direction: up where ``h(V) >= 0.5``; ``V`` is dropped."""
        if self.hard:
            return
        self.up = self.h() >= 0.5
        self.V = None
        self.version += 1

    @torch.no_grad()
    def changed(self) -> tuple[int, int]:
        """(weights whose hard code differs from round-to-nearest, weights)."""
        hard = self.floor + (self.up.to(self.floor.dtype) if self.up is not None else (self.h() >= 0.5).float())
        hard = torch.maximum(torch.minimum(hard, self.hi), self.lo)
        return int((hard != self.nearest).sum()), int(hard.numel())

    def extra_repr(self) -> str:
        return f"{'hard' if self.hard else 'soft'}, weights={self.floor.numel()}"


def attach(layer: RoundableLayer) -> AdaRound:
    """Switch ``layer`` (QuantConv2d / QuantLinear) to learned rounding, starting at the float weight."""
    layer.sync_weight_range()
    rounding = AdaRound(layer.weight, layer.weight_quantizer).to(layer.weight.device)
    layer.set_weight_rounding(rounding)
    return rounding

