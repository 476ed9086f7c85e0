"""``refine.act_ranges=learned``: per-tensor activation ranges as trainable parameters.

During refinement every per-tensor activation quantizer (QuantAct outputs, layer-input
quantizers) is swapped for a :class:`LearnedRangeQuantizer` that starts from the calibrated grid
and holds ``lo``/``hi`` as Parameters; gradients reach them LSQ-style (round with a straight-through
estimator, the scale and zero point computed from ``lo``/``hi`` inside autograd, the gradient
scaled by ``1/sqrt(values per sample · qmax)`` as LSQ does, so the step size does not grow with the
layer's size). On exit the learned range is written back into the original quantizer with
``set_range`` (the same grid the forward pass used) and the originals are put back, so evaluation
runs on the ordinary frozen fast path. With ``act_ranges=frozen`` nothing here is used: the
activation grid stays exactly the calibrated one (the STE passes no gradient to it).

Reconstruction (``refine/recon.py``, ``learn_act``) learns step sizes instead
(:class:`LearnedStepQuantizer`, :func:`learned_act_steps`). Quantizer pieces, so they live in
``quant/`` (was ``refine/ranges.py``); the refiners import them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from calibbench.quant import QuantAct, QuantConv2d, QuantLinear, UniformQuantizer
from calibbench.quant.quantizer import MIN_RANGE


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: Tensor, g: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``g`` (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


class LearnedRangeQuantizer(UniformQuantizer):
    """A per-tensor quantizer whose range ``[lo, hi]`` is learned (stands in for ``base``)."""

    def __init__(self, base: UniformQuantizer) -> None:
        if base.ch_axis is not None:
            raise ValueError("learned activation ranges are per-tensor; got a per-channel quantizer")
        super().__init__(base.bits, base.symmetric, None, base.include_zero, None)
        self.set_qparams(base.scale, base.zero_point)
        self._fast = None  # never the fused evaluation path: the range is a Parameter
        lo, hi = base.range()
        self.lo = nn.Parameter(lo.detach().float().reshape(()).clone())
        self.hi = nn.Parameter(hi.detach().float().reshape(()).clone())
        self.base = [base]  # a list: not a submodule, so its buffers stay out of this state dict

    def _refresh(self) -> None:
        super()._refresh()
        self._fast = None

    def bounds(self) -> tuple[Tensor, Tensor]:
        lo: Tensor = self.lo
        hi: Tensor = self.hi
        if self.symmetric:
            top = torch.maximum(lo.abs(), hi.abs())
            return -top, top
        if self.include_zero:
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        return lo, hi

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        return self.fake_quantize(x)

    def fake_quantize(self, x: Tensor, inplace: bool = False) -> Tensor:
        g = 1.0 / math.sqrt(max(1, x[0].numel()) * self.qmax)
        lo, hi = self.bounds()
        lo, hi = _grad_scale(lo, g), _grad_scale(hi, g)
        if self.symmetric:
            scale = (hi / self.qmax).clamp(min=MIN_RANGE)
            zp = torch.zeros((), device=x.device)
        else:
            scale = ((hi - lo) / (self.qmax - self.qmin)).clamp(min=MIN_RANGE)
            zp = _round_ste(-lo / scale)
        codes = torch.clamp(_round_ste(x / scale) + zp, self.qmin, self.qmax)
        return (codes - zp) * scale

    @torch.no_grad()
    def write_back(self) -> None:
        """Install the learned grid in the original quantizer."""
        lo, hi = self.bounds()
        self.base[0].set_range(lo.detach().clone(), hi.detach().clone())


def _slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, UniformQuantizer]]:
    """``(owner, attribute, quantizer)`` for every activation quantizer (not weights)."""
    for module in model.modules():
        if isinstance(module, QuantAct):
            yield module, "quantizer", module.quantizer
        elif isinstance(module, (QuantConv2d, QuantLinear)) and module.input_quantizer is not None:
            yield module, "input_quantizer", module.input_quantizer


@contextmanager
def _swapped_act_quantizers(model: nn.Module, make: Callable[[UniformQuantizer], Any]) -> Iterator[list]:
    """Swap every calibrated per-tensor activation quantizer for ``make(q)`` (one learner per
    quantizer object, shared where two layers read one); on exit (also on an error) write the
    learned values back and restore the original quantizer objects."""
    swapped: list[tuple[nn.Module, str, UniformQuantizer, Any]] = []
    seen: dict[int, Any] = {}
    for owner, attr, q in list(_slots(model)):
        if not q.active or q.ch_axis is not None:
            continue  # uncalibrated (stays full precision) or per-channel: left as it is
        learned = seen.get(id(q))
        if learned is None:
            learned = seen[id(q)] = make(q).to(q.scale.device)
        setattr(owner, attr, learned)
        swapped.append((owner, attr, q, learned))
    try:
        yield list(seen.values())
    finally:
        for owner, attr, q, learned in swapped:
            learned.write_back()
            setattr(owner, attr, q)


def learned_act_ranges(model: nn.Module) -> Any:
    """Swap the calibrated per-tensor activation quantizers for learnable ranges (a context)."""
    return _swapped_act_quantizers(model, LearnedRangeQuantizer)


class LearnedStepQuantizer(UniformQuantizer):
    """A per-tensor quantizer whose *step size* is learned, as BRECQ (``delta``) and QDrop/MQBench
    (LSQ's ``scale``) parameterize it; with ``learn_zero_point`` the zero point of an asymmetric
    grid is a parameter too (QDrop's LSQ+), rounded with a straight-through estimator. Starts from
    the grid of ``base`` (calibrated or MSE-initialised); :meth:`write_back` installs the learned
    grid there. The forward of the reconstruction units is ``recon._FakeQuantDrop`` (LSQ's
    gradients, scaled by ``1/sqrt(values per sample · qmax)``); :meth:`fake_quantize` is the same
    grid through autograd, for use outside a unit."""

    def __init__(self, base: UniformQuantizer, learn_zero_point: bool = False) -> None:
        if base.ch_axis is not None:
            raise ValueError("learned activation steps are per-tensor; got a per-channel quantizer")
        super().__init__(base.bits, base.symmetric, None, base.include_zero, None)
        self.set_qparams(base.scale, base.zero_point)
        self._fast = None
        self.step = nn.Parameter(base.scale.detach().float().reshape(()).clone())
        zp = base.zero_point.detach().float().reshape(()).clone()
        self.learn_zero_point = bool(learn_zero_point) and not base.symmetric
        self.zp = nn.Parameter(zp, requires_grad=self.learn_zero_point)
        self.base = [base]

    def _refresh(self) -> None:
        super()._refresh()
        self._fast = None

    def parameters_to_learn(self) -> list[nn.Parameter]:
        return [self.step] + ([self.zp] if self.learn_zero_point else [])

    def grid(self, g: float) -> tuple[Tensor, Tensor]:
        """(scale, zero point) as 0-dim tensors, LSQ's gradient scale ``g`` applied."""
        scale = _grad_scale(self.step, g).clamp(min=MIN_RANGE)
        if not self.learn_zero_point:
            return scale, self.zp.detach()
        zp = _round_ste(_grad_scale(self.zp, g)).clamp(float(self.qmin), float(self.qmax))
        return scale, zp

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        return self.fake_quantize(x)

    def fake_quantize(self, x: Tensor, inplace: bool = False) -> Tensor:
        scale, zp = self.grid(1.0 / math.sqrt(max(1, x[0].numel()) * self.qmax))
        codes = torch.clamp(_round_ste(x / scale) + zp, self.qmin, self.qmax)
        return (codes - zp) * scale

    @torch.no_grad()
    def write_back(self) -> None:
        """Install the learned grid in the original quantizer."""
        zp = torch.round(self.zp.detach()).clamp(self.qmin, self.qmax)
        self.base[0].set_qparams(self.step.detach().clamp(min=MIN_RANGE).clone(), zp.to(torch.int32))


def learned_act_steps(model: nn.Module, learn_zero_point: bool = False) -> Any:
    """As :func:`learned_act_ranges`, with the step size (and zero point) as the parameters."""
    return _swapped_act_quantizers(model, lambda q: LearnedStepQuantizer(q, learn_zero_point))
