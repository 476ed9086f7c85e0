"""Fake-quant layers: QuantConv2d / QuantLinear (weights, optional input) and QuantAct (outputs).

QuantConv2d and QuantLinear subclass nn.Conv2d / nn.Linear and keep the original Parameter
objects, so code that looks for conv/linear layers (statistics hooks, optimizers) still finds
them. Weight qparams always describe the *current* weight: they are recomputed from the weight
whenever it changes (``weight._version`` or storage), as ZeroQ/GDFQ recompute per-channel min/max
every forward, but only when something changed.

Weight cache: in eval mode, when no gradient has to reach the weight, the fake-quantized weight is
computed once and reused until the weight, its qparams or the enabled flag change (or ``train()``
is called). In training mode (or whenever autograd needs the weight) the weight is re-quantized
every forward through the straight-through estimator, so a fine-tuning stage trains through it.

Learned rounding (``quant/adaround.py``): :meth:`set_weight_rounding` attaches an AdaRound object;
from then on the quantized weight is its (soft, then hard) rounding on the grid the weight
quantizer had when it was attached, instead of round-to-nearest. Disabling the weight quantizer
still gives the float weight.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calibbench.quant.adaround import AdaRound
from calibbench.quant.quantizer import UniformQuantizer

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; the package supports 3.10, so annotations only

log = logging.getLogger(__name__)


class _QuantWeightMixin(nn.Module):
    """Weight fake-quantization with a version-keyed cache (shared by conv and linear; a Module
    base so ``super().train`` is typed: it comes after nn.Conv2d / nn.Linear in the MRO anyway)."""

    weight: Tensor
    weight_quantizer: UniformQuantizer
    input_quantizer: Optional[UniformQuantizer]

    def _adopt(self, src: nn.Conv2d | nn.Linear, weight_quantizer: UniformQuantizer,
               input_quantizer: Optional[UniformQuantizer]) -> None:
        """Take over ``src``'s weight Parameter (shared, not copied) and training flag; the
        subclass takes its bias (typed differently by nn.Conv2d and nn.Linear)."""
        self.weight = src.weight
        self.train(src.training)
        self._init_quant(weight_quantizer, input_quantizer)

    def _init_quant(self, weight_quantizer: UniformQuantizer,
                    input_quantizer: Optional[UniformQuantizer]) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self._range_key: Optional[tuple] = None
        self._cache_key: Optional[tuple] = None
        self._cached_weight: Optional[Tensor] = None
        self.weight_rounding: Optional[AdaRound] = None  # learned rounding, when attached
        # quant/export.py's IntegerLayer/FloatLayer, set by exact_integer() for export: evaluation
        # (no grad) computes the layer in the exported graph's arithmetic (exact integer sums).
        self.integer: Optional[Any] = None
        self.sync_weight_range()

    def set_weight_rounding(self, rounding: Optional[AdaRound]) -> None:
        """Attach (or with ``None`` remove) learned rounding; the cached weight is dropped."""
        self.weight_rounding = rounding
        self.invalidate_cache()

    def _weight_key(self) -> tuple:
        w = self.weight
        return (w.data_ptr(), w._version, w.device, w.dtype)

    @torch.no_grad()
    def sync_weight_range(self) -> None:
        """Recompute the weight qparams if the weight changed since they were computed."""
        key = self._weight_key()
        if key == self._range_key:
            return
        wq = self.weight_quantizer
        with torch.inference_mode(False):
            if wq.observer is not None:
                wq.observer.reset()
                wq.observer(self.weight.detach())
                wq.load_observer_qparams()
        self._range_key = key

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight: cached when frozen, recomputed with STE when training."""
        self.sync_weight_range()
        wq = self.weight_quantizer
        if not wq.active:
            return self.weight
        rounding = self.weight_rounding
        soft = rounding is not None and not rounding.hard
        if self.training or soft or (torch.is_grad_enabled() and self.weight.requires_grad):
            return rounding() if rounding is not None else wq.fake_quantize(self.weight)
        key = (self._range_key, wq.version, None if rounding is None else (id(rounding), rounding.version))
        if key != self._cache_key or self._cached_weight is None:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable anywhere
                self._cached_weight = (rounding() if rounding is not None
                                       else wq.fake_quantize(self.weight.detach()))
            self._cache_key = key
        return self._cached_weight

    def invalidate_cache(self) -> None:
        self._cached_weight = None
        self._cache_key = None

    def train(self, mode: bool = True) -> Self:
        self.invalidate_cache()  # frees the copy; training re-quantizes every step anyway
        return super().train(mode)

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d size attribute (always two ints; typed as a tuple of any length)."""
    a, b = value
    return a, b


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """nn.Conv2d with a fake-quantized weight and an optional input-activation quantizer."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: UniformQuantizer,
                   input_quantizer: Optional[UniformQuantizer] = None) -> "QuantConv2d":
        """Wrap ``conv`` (its Parameters are shared, not copied)."""
        padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        q = cls(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), stride=_pair(conv.stride),
                padding=padding, dilation=_pair(conv.dilation), groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        q.bias = conv.bias
        q._adopt(conv, weight_quantizer, input_quantizer)
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.integer is not None and not torch.is_grad_enabled():
            return self.integer(self._quant_input(x))
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """nn.Linear with a fake-quantized weight and an optional input-activation quantizer."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: UniformQuantizer,
                   input_quantizer: Optional[UniformQuantizer] = None) -> "QuantLinear":
        """Wrap ``linear`` (its Parameters are shared, not copied)."""
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        q.bias = linear.bias
        q._adopt(linear, weight_quantizer, input_quantizer)
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.integer is not None and not torch.is_grad_enabled():
            return self.integer(self._quant_input(x))
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantAct(nn.Module):
    """Runs the wrapped activation module, then fake-quantizes its output.

    One QuantAct per activation *module object*: a module called at several places in forward
    (torchvision's BasicBlock reuses ``self.relu``) shares one quantizer, whose range covers all
    call sites. When no gradient is recorded the output is quantized in place: it is a tensor the
    activation produced (or overwrote in place), so every consumer must see the quantized value.
    """

    def __init__(self, act: nn.Module, quantizer: UniformQuantizer) -> None:
        super().__init__()
        self.act = act
        self.quantizer = quantizer
        # ReLU/ReLU6 whose quantizer clamps at exactly 0 (and, for ReLU6, tops out at <= 6): the
        # clamp of the quantizer *is* the activation, so evaluation skips one full pass over the
        # tensor. Outputs are identical; the STE path (training) always runs the real activation.
        self._relu_cap = {nn.ReLU: float("inf"), nn.ReLU6: 6.0}.get(type(act))
        # False: always activation then quantizer (diagnostics hooks the quantizer's forward).
        self.fuse = True

    def _fusable(self) -> bool:
        fast = self.quantizer._fast
        return (self.fuse and self._relu_cap is not None and fast is not None and fast[2] == 0.0
                and self.quantizer._top <= self._relu_cap)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        q = self.quantizer
        if (q.active and not q.observing and not torch.is_grad_enabled() and len(args) == 1
                and not kwargs and self._fusable()):
            return q.fake_quantize(args[0], inplace=bool(self.act.inplace))
        y = self.act(*args, **kwargs)
        if not q.active and not q.observing:
            return y
        owns = bool(args) and (y is not args[0] or bool(getattr(self.act, "inplace", False)))
        return q(y, inplace=owns and not torch.is_grad_enabled())
