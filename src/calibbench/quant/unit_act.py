"""The activation-quantizer wrapper of reconstruction: one unit's activation quantizers, with QDrop's
dropping, learned grids and an off switch.

:func:`wrap_acts` puts a :class:`UnitActQuantizer` in every active activation-quantizer slot
(:func:`act_slots`: a ``QuantAct``'s quantizer, a quant layer's input quantizer) of a unit's
modules; :func:`unwrap_acts` puts the originals back. Per-tensor grids run through
:class:`~calibbench.quant.drop.FakeQuantDrop`.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn

from calibbench.quant.drop import FakeQuantDrop, bernoulli_mask
from calibbench.quant.learned import LearnedRangeQuantizer, LearnedStepQuantizer, _grad_scale, _round_ste
from calibbench.quant.modules import QuantAct, QuantConv2d, QuantLinear
from calibbench.quant.quantizer import MIN_RANGE, UniformQuantizer


class UnitActQuantizer(nn.Module):
    """Stands in for an activation quantizer inside the unit being reconstructed: the calibrated
    grid (or, with ``learn_act``, a ``LearnedRangeQuantizer``'s learned one), QDrop's element-wise
    dropping, an off switch; per-tensor grids run through :class:`FakeQuantDrop`."""

    def __init__(self, inner: UniformQuantizer, drop_prob: float) -> None:
        super().__init__()
        self.inner = inner
        self.drop_prob = float(drop_prob)
        self.enabled = True
        self.observing = False
        self._fast = None
        self._top = float("inf")

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.inner.active)

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, zero point) as 0-dim tensors; learned ones carry LSQ's gradient scale."""
        q = self.inner
        if isinstance(q, LearnedStepQuantizer):
            return q.grid(1.0 / math.sqrt(max(1, x[0].numel()) * q.qmax))
        if isinstance(q, LearnedRangeQuantizer):
            g = 1.0 / math.sqrt(max(1, x[0].numel()) * q.qmax)
            lo, hi = q.bounds()
            lo, hi = _grad_scale(lo, g), _grad_scale(hi, g)
            if q.symmetric:
                return (hi / q.qmax).clamp(min=MIN_RANGE), torch.zeros((), device=x.device)
            scale = ((hi - lo) / (q.qmax - q.qmin)).clamp(min=MIN_RANGE)
            return scale, _round_ste(-lo / scale)
        return q.scale.reshape(()), q.zero_point.reshape(()).float()

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        if not self.enabled:
            return x
        q = self.inner
        if q.ch_axis is not None:  # per-channel activation grids (not used by the presets)
            out = q(x)
            if self.drop_prob == 0:
                return out
            kept = bernoulli_mask(x, 1.0 - self.drop_prob)
            return out * kept + x * (1.0 - kept)  # out is in the graph: not in place
        quantized = bernoulli_mask(x, 1.0 - self.drop_prob) if self.drop_prob > 0 else None
        scale, zp = self._grid(x)
        return FakeQuantDrop.apply(x, scale, zp, float(q.qmin), float(q.qmax), quantized)


def act_slots(modules: list[nn.Module]) -> Iterator[tuple[nn.Module, str]]:
    for root in modules:
        for m in root.modules():
            if isinstance(m, QuantAct):
                yield m, "quantizer"
            elif isinstance(m, (QuantConv2d, QuantLinear)) and m.input_quantizer is not None:
                yield m, "input_quantizer"


def wrap_acts(modules: list[nn.Module], drop: float) -> list[tuple[nn.Module, str, UnitActQuantizer]]:
    """Put a :class:`UnitActQuantizer` in every active activation-quantizer slot of the unit."""
    wrapped: list[tuple[nn.Module, str, UnitActQuantizer]] = []
    seen: dict[int, UnitActQuantizer] = {}
    for owner, attr in list(act_slots(modules)):
        inner = getattr(owner, attr)
        if isinstance(inner, UnitActQuantizer) or not inner.active:
            continue
        wrapper = seen.get(id(inner))
        if wrapper is None:
            wrapper = seen[id(inner)] = UnitActQuantizer(inner, drop)
        setattr(owner, attr, wrapper)
        wrapped.append((owner, attr, wrapper))
    return wrapped


def unwrap_acts(wrapped: list[tuple[nn.Module, str, UnitActQuantizer]]) -> None:
    for owner, attr, wrapper in wrapped:
        setattr(owner, attr, wrapper.inner)


__all__ = ["UnitActQuantizer", "act_slots", "wrap_acts", "unwrap_acts"]
