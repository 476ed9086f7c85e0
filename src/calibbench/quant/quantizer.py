"""Uniform affine fake-quantizer: the one grid every preset and observer shares.

Grid (asymmetric, the ZeroQ/GDFQ convention of ``quant=dfq_legacy``): for a range ``[lo, hi]`` and
``b`` bits, ``scale = (hi - lo) / (2^b - 1)`` (ZeroQ writes the multiplier ``(2^b - 1)/(hi - lo)``),
``zero_point = round(-lo / scale)``, integer levels ``0 .. 2^b - 1``. Symmetric: ``scale =
max(|lo|, |hi|) / (2^(b-1) - 1)``, ``zero_point = 0``, levels ``-(2^(b-1) - 1) .. 2^(b-1) - 1``
(the most negative code is left unused so the grid is centred on 0).

Rounding is round-half-even applied to ``x / scale`` before the integer zero point is added, and
then clamped: ``q(x) = scale * clamp(round(x / scale), qmin - zp, qmax - zp)``. This is exactly
what torch's ``fake_quantize_per_*_affine`` kernels compute. ZeroQ rounds after subtracting its zero
point; the two differ only for inputs exactly half-way between two levels when the zero point is
odd (a measure-zero set for real data).

Zero in the range (``include_zero``): ZeroQ's weight quantizer uses the raw per-channel min/max, so
a channel whose weights are all positive gets a grid that does not contain 0; ``dfq_legacy``
follows that for weights (``include_zero=False``). ZeroQ's activation ranges start from
zero-initialised buffers, so they always contain 0; both presets keep ``include_zero=True`` for
activations, and ``academic`` (BRECQ/MQBench, like torch.ao's MinMaxObserver) for weights too.
A degenerate (constant) channel always gets its range widened to include 0, so the constant is an
exact grid end point.

The torch fused kernels are not used in the forward pass: on CPU they run ~5-10x slower than four
vectorised in-place tensor ops (measured: 51 ms vs 4.6 ms on a 256x16x32x32 tensor, 1 thread), and
evaluation throughput of the fake-quant model is a requirement (benchmarks/eval_overhead.py).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Protocol

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# ZeroQ clamps (max - min) to at least 1e-8 before dividing; same floor here.
MIN_RANGE = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` of the grid."""
    if bits < 2:
        raise ValueError(f"bits={bits}: a uniform grid needs at least 2 bits")
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def range_to_qparams(lo: Tensor, hi: Tensor, bits: int, symmetric: bool = False,
                     include_zero: bool = True) -> tuple[Tensor, Tensor]:
    """Map a range (per tensor or per channel) to ``(scale float32, zero_point int32)``."""
    lo = lo.detach().float()
    hi = hi.detach().float()
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    # A constant channel has no width: widen it to include 0 so the constant is exactly representable.
    degenerate = (hi - lo) < MIN_RANGE
    if include_zero or symmetric:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    else:
        lo = torch.where(degenerate, lo.clamp(max=0.0), lo)
        hi = torch.where(degenerate, hi.clamp(min=0.0), hi)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()).clamp(min=MIN_RANGE) / qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo).clamp(min=MIN_RANGE) / (qmax - qmin)
        zero_point = torch.round(-lo / scale).clamp(-(2**31) + 1, 2**31 - 1)
    return scale, zero_point.to(torch.int32)


def _broadcast_shape(x: Tensor, ch_axis: int) -> list[int]:
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return shape


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with the clipped straight-through estimator.

    The gradient is 1 where ``round(x / scale)`` falls inside the code range and 0 where the value
    was clamped (the same mask torch's fake-quant kernels use), so training can move values back
    into range but gets no signal from saturated ones.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, inv_scale: Any, scale: Any, lo: Any, hi: Any) -> Tensor:
        r = torch.round(x * inv_scale)
        mask = (r >= lo) & (r <= hi)
        ctx.save_for_backward(mask)
        return torch.clamp(r, lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


class RangeObserver(Protocol):
    """What a quantizer needs of its observer (``observers.Observer``, which imports this module)."""

    @property
    def has_data(self) -> bool: ...

    def __call__(self, x: Tensor) -> Tensor: ...

    def reset(self) -> None: ...

    def calculate_qparams(self) -> tuple[Tensor, Tensor]: ...


class UniformQuantizer(nn.Module):
    """Holds the qparams of one tensor (weight or activation) and fake-quantizes it.

    State, and when it changes:
    - ``scale`` / ``zero_point`` buffers: set by :meth:`set_qparams` (directly, from a range, or
      from the attached observer); saved in the state dict together with ``initialized``.
    - ``observing``: the attached observer sees every input (calibration).
    - ``quant_enabled``: inputs are fake-quantized once qparams exist; before that the quantizer
      is the identity, so an uncalibrated model still runs.
    ``version`` increments whenever the qparams or the enabled flag change; modules that cache a
    quantized weight compare it to decide whether the cache is stale.
    """

    scale: Tensor
    zero_point: Tensor
    initialized: Tensor
    observer: Optional[RangeObserver]

    def __init__(self, bits: int, symmetric: bool = False, ch_axis: Optional[int] = None,
                 include_zero: bool = True, observer: Optional[RangeObserver] = None,
                 num_channels: int = 1) -> None:
        super().__init__()
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.ch_axis = ch_axis
        self.include_zero = bool(include_zero)
        self.qmin, self.qmax = qrange(self.bits, self.symmetric)
        n = num_channels if ch_axis is not None else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.observer = observer
        self.observing = False
        self.quant_enabled = True
        self.version = 0
        self._ready = False  # python mirror of `initialized`: no device sync in forward
        self._top = float("inf")  # per-tensor: the largest representable value
        # per-tensor: (scale, 1/scale) as 0-dim float32 tensors (a python float costs mul_ an extra
        # dtype conversion per call) and the clamp bounds in code units as python floats
        self._fast: Optional[tuple[Tensor, Tensor, float, float]] = None
        # True: ``round(x / scale)`` (a division, as onnxruntime's QuantizeLinear computes it)
        # instead of ``round(x * (1 / scale))``; the two differ next to rounding ties (~1e-4 of
        # values). Set for export (quant/export.py: exact_integer), off otherwise.
        self.divide = False

    # -- qparams -------------------------------------------------------------------------------
    @torch.no_grad()
    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Install qparams (copied into the existing buffers, so they stay autograd-safe)."""
        with torch.inference_mode(False):
            scale = scale.detach().reshape(-1).to(self.scale)
            zero_point = zero_point.detach().reshape(-1).to(self.zero_point)
            if scale.shape != self.scale.shape:
                self.scale = torch.empty_like(scale, device=self.scale.device)
                self.zero_point = torch.empty_like(zero_point, device=self.zero_point.device)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
            self.initialized.fill_(True)
        self._refresh()

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Install the grid that covers ``[lo, hi]`` (per channel when ``ch_axis`` is set)."""
        self.set_qparams(*range_to_qparams(lo, hi, self.bits, self.symmetric, self.include_zero))

    def load_observer_qparams(self) -> bool:
        """Compute qparams from the observer; False (and unchanged) when it has seen no data."""
        if self.observer is None or not self.observer.has_data:
            return False
        self.set_qparams(*self.observer.calculate_qparams())
        return True

    def range(self) -> tuple[Tensor, Tensor]:
        """The representable ``[lo, hi]`` of the current grid (per channel or a single value)."""
        zp = self.zero_point.float()
        return (self.qmin - zp) * self.scale, (self.qmax - zp) * self.scale

    def _refresh(self) -> None:
        """Re-derive the python-side mirrors of the buffers and invalidate dependent caches."""
        self._ready = bool(self.initialized)
        self._fast = None
        self._top = float("inf")
        if self._ready and self.ch_axis is None:
            with torch.inference_mode(False):
                s = self.scale.detach().float().cpu().reshape(-1)[0].clone()
                inv = torch.reciprocal(s)  # float32 reciprocal, as the torch kernels compute it
            z = int(self.zero_point.reshape(-1)[0])
            self._fast = (s, inv, float(self.qmin - z), float(self.qmax - z))
            self._top = float(s) * (self.qmax - z)
        self.version += 1

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("scale", "zero_point"):  # per-channel buffers may differ in size before loading
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    # -- modes ---------------------------------------------------------------------------------
    def enable_observer(self, enabled: bool = True) -> None:
        self.observing = bool(enabled) and self.observer is not None

    def enable_quant(self, enabled: bool = True) -> None:
        if self.quant_enabled != bool(enabled):
            self.quant_enabled = bool(enabled)
            self.version += 1

    @property
    def active(self) -> bool:
        """True when forward changes its input (qparams exist and quantization is on)."""
        return self.quant_enabled and self._ready

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """Observe (calibration) and/or fake-quantize ``x``.

        ``inplace=True`` lets a caller that owns ``x`` (an activation output) skip an allocation;
        it is honoured only when no gradient is being recorded.
        """
        if self.observing and self.observer is not None:  # observing implies an observer
            self.observer(x.detach())
            if self.quant_enabled:  # "observe quantized" calibration: use the running range
                self.load_observer_qparams()
        if not (self.quant_enabled and self._ready):
            return x
        return self.fake_quantize(x, inplace=inplace)

    def fake_quantize(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``scale * clamp(round(x / scale), qmin - zp, qmax - zp)`` with a clipped STE."""
        if self._fast is not None:  # per-tensor: clamp bounds as python floats
            scale, inv, flo, fhi = self._fast
            return self._round_clamp(x, inplace, scale, inv, flo, fhi)
        shape = _broadcast_shape(x, self.ch_axis if self.ch_axis is not None else 0)
        s = self.scale.to(x.dtype)
        zp = self.zero_point.to(x.dtype)
        return self._round_clamp(x, inplace, s.view(shape), torch.reciprocal(s).view(shape),
                                 (self.qmin - zp).view(shape), (self.qmax - zp).view(shape))

    def _round_clamp(self, x: Tensor, inplace: bool, scale: Any, inv: Any, lo: Any, hi: Any) -> Tensor:
        """The grid for either form of the qparams (``lo``/``hi`` floats per tensor, tensors per
        channel: torch's stubs type ``clamp_`` for one or the other, hence ``Any``)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _FakeQuantSTE.apply(x, inv, scale, lo, hi)
        if self.divide:  # onnxruntime's QuantizeLinear divides (quant/export.py: exact form)
            out = x.div_(scale) if inplace else x.div(scale)
        else:
            out = x.mul_(inv) if inplace else x.mul(inv)
        return out.round_().clamp_(lo, hi).mul_(scale)

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.ch_axis is None else f"per-channel(axis={self.ch_axis})"
        grid = "symmetric" if self.symmetric else "asymmetric"
        return (f"bits={self.bits}, {grid}, {axis}, include_zero={self.include_zero}, "
                f"ready={self._ready}, quant={self.quant_enabled}, observing={self.observing}")
