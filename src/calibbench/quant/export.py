"""Fake-quant model → QDQ ONNX model that onnxruntime runs with its integer kernels.

**Exact form (what ``export=onnx`` and ``python -m calibbench export`` use by default;
``export_exact=false`` / ``export --fused`` give the fused QDQ form below).** :func:`exact_integer`
first makes the fake-quant model compute in the arithmetic of the exported graph, and the graph is
then built from the same constants, so the two give bit-identical outputs (measured: max |logit
diff| 0 on resnet20/56 W8A8/W4A4 with both presets and on random-weight mobilenetv3/v2/resnet18):
activation quantizers divide by the scale as QuantizeLinear does; a layer reading a uint8 grid is
an :class:`IntegerLayer` (``ConvInteger``/``MatMulInteger``, exact int32 sums, then float32
``Mul``/``Add``); every other conv/linear a :class:`FloatLayer` (float64 sums rounded once).
Without it the QDQ graph below differed by float32 summation order and rounding ties (resnet20
academic W4A4: 99.6 % agreement; mobilenetv3: max |logit diff| 2.36). The QDQ form
(``DQ → Conv → Q`` fused into QLinearConv) is what :func:`to_qdq` emits for layers without an
exact form, i.e. when :func:`exact_integer` was not called: ~2x faster than the exact graph on the
resnets (docs/results.md), not bit-exact.

What the QDQ graph holds (``to_qdq`` builds a torch module that traces to it):

- **weights**: integer codes in a uint8 initializer, per output channel (axis 0) scale and zero
  point, a ``DequantizeLinear`` in front of the Conv/Gemm. The codes are exactly the ones the
  fake-quant model multiplies by its scale (round-to-nearest or the learned AdaRound/BRECQ/QDrop
  rounding), checked value by value against ``layer.quantized_weight()`` at export.
- **activations**: ``QuantizeLinear → DequantizeLinear`` (per tensor) exactly where the preset's
  quantizers sit (``dfq_legacy``: after every feature activation module; ``academic``: on the
  inputs of every conv/linear, the image included). Below 8 bits the codes live in a uint8
  (int8 for symmetric grids) container and an integer ``Clip`` between Q and DQ enforces the
  b-bit range: onnxruntime still fuses ``DQ → Conv → Q`` into QLinearConv (the Clip sits on the
  integer tensor, outside the fused unit), and ``clamp(round(x/s) + z, 0, 255)`` followed by
  ``clip(·, qmin, qmax)`` is exactly the b-bit ``clamp(round(x/s) + z, qmin, qmax)``.
- **BN** (``dfq_legacy`` keeps it unfolded in the fake-quant model): a BatchNorm that reads a
  quantized conv's output is folded into the *quantized* weights, not re-quantized from folded
  float weights: ``BN(conv(x, (q − z)·s)) = conv(x, (q − z)·s·f) + b'`` with ``f = γ/√(σ² + ε)``,
  so the folded weight keeps the same integer codes with scale ``s·|f|`` (codes mirrored,
  ``q → qmax + qmin − q``, where ``f < 0``). This is exact in real arithmetic, i.e. what the
  fake-quant model evaluated; only float32 rounding differs. Without folding the conv output would
  go to a float BatchNormalization and never reach an integer kernel.
- **bias**: float in the file. onnxruntime's QDQ optimizer quantizes it to int32 with scale
  ``s_x·s_w`` when it fuses a QLinearConv (the fake-quant model adds it in float): the one place
  where the kernel rounds something the fake-quant model does not (at most half of ``s_x·s_w``,
  a small fraction of an output step). Measured in docs/results.md.

A channel whose codes cannot sit in uint8 with a zero point in ``[0, 255]`` (a ``dfq_legacy``
weight grid without 0, e.g. a depthwise channel whose weights all have one sign, at 8 bits) makes
its layer's weights a float initializer holding exactly the dequantized values (a float Conv at
run time, counted in ``float_conv_nodes``). An int32 ``DequantizeLinear`` would be the standard
spelling, but onnxruntime 1.32's QDQ fusion then builds a QLinearConv with int32 weights and
rejects its own graph (INVALID_GRAPH), so the values are stored in float.

Why custom ``autograd.Function.symbolic`` instead of ``torch.fake_quantize_per_*_affine``: the
TorchScript exporter's symbolic for those ops only accepts the ranges (0, 255), (-128, 127) and
(0, 127), stores a weight as a float initializer followed by QuantizeLinear, and cannot express a
b-bit range or a weight stored as integers; the dynamo exporter needs onnxscript and a custom
translation table for the same thing. The symbolics below emit standard ONNX ops only (opset 17).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calibbench.quant.modules import QuantAct, QuantConv2d, QuantLinear
from calibbench.quant.quantize import _conv_bn_candidates, _paths_by_object, _replace, _verify_pairs
from calibbench.quant.quantizer import UniformQuantizer

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12+); onnxruntime 1.14+ loads it

# Layers that carry weights or state the exporter must understand; anything else with parameters
# (or a conv/linear type quantize() left in floating point) is refused by name.
_PASSIVE = (nn.BatchNorm2d, nn.Identity, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Dropout,
            nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)


class ExportError(ValueError):
    """The model (or run) cannot be exported: the message names the layer or file."""


@dataclass(frozen=True)
class _Const:
    """Tensors the symbolic writes as initializers (a non-tensor argument: not traced)."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor


def _const(g: Any, t: Tensor) -> Any:
    return g.op("Constant", value_t=t)


class _WeightDQ(torch.autograd.Function):
    """Forward: the dequantized float weight. ONNX: ``DequantizeLinear(codes, scale, zp, axis=0)``."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, const: _Const) -> Tensor:
        return weight

    @staticmethod
    def symbolic(g: Any, weight: Any, const: _Const) -> Any:
        return g.op("DequantizeLinear", _const(g, const.codes), _const(g, const.scale),
                    _const(g, const.zero_point), axis_i=0)


class _ActQDQ(torch.autograd.Function):
    """Forward: the quantizer's own fake-quant. ONNX: ``Q → [Clip to the b-bit range] → DQ``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, quantizer: UniformQuantizer, spec: tuple) -> Tensor:
        return quantizer.fake_quantize(x)

    @staticmethod
    def symbolic(g: Any, x: Any, quantizer: UniformQuantizer, spec: tuple) -> Any:
        scale, zp, qmin, qmax, dtype = spec
        s = _const(g, torch.tensor(scale, dtype=torch.float32))
        z = _const(g, torch.tensor(zp, dtype=dtype))
        q = g.op("QuantizeLinear", x, s, z)
        info = torch.iinfo(dtype)
        if (qmin, qmax) != (info.min, info.max):
            q = g.op("Clip", q, _const(g, torch.tensor(qmin, dtype=dtype)),
                     _const(g, torch.tensor(qmax, dtype=dtype)))
        return g.op("DequantizeLinear", q, s, z)


def act_spec(q: UniformQuantizer, where: str) -> Optional[tuple]:
    """``(scale, zero_point, qmin, qmax, container dtype)`` of an active per-tensor quantizer."""
    if not q.active:
        return None  # saw no calibration data: the identity in the fake-quant model too
    if q.ch_axis is not None:
        raise ExportError(f"{where}: per-channel activation quantizers are not supported")
    dtype = torch.int8 if q.qmin < 0 else torch.uint8
    info = torch.iinfo(dtype)
    zp = int(q.zero_point.reshape(-1)[0])
    if q.qmin < info.min or q.qmax > info.max:
        raise ExportError(f"{where}: {q.bits}-bit activations do not fit the 8-bit integer kernels "
                          f"(onnxruntime's QLinearConv reads int8/uint8); export needs a_bits <= 8")
    if not info.min <= zp <= info.max:
        raise ExportError(f"{where}: activation zero point {zp} is outside {dtype} (a grid without 0); "
                          f"not representable in QuantizeLinear")
    scale = float(q.scale.reshape(-1)[0])
    return (scale, zp, q.qmin, q.qmax, dtype)


class QDQAct(nn.Module):
    """A per-tensor activation quantizer, exported as Q → [Clip] → DQ."""

    def __init__(self, quantizer: UniformQuantizer, where: str) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.spec = act_spec(quantizer, where)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec is None:
            return x
        return _ActQDQ.apply(x, self.quantizer, self.spec)


class QDQActModule(nn.Module):
    """``QuantAct`` for export: the activation module, then its quantizer."""

    def __init__(self, qact: QuantAct, where: str) -> None:
        super().__init__()
        self.act = qact.act
        self.qdq = QDQAct(qact.quantizer, where)

    def forward(self, x: Tensor) -> Tensor:
        return self.qdq(self.act(x))


def weight_codes(layer: QuantConv2d | QuantLinear, where: str) -> tuple[Tensor, Tensor]:
    """``(v, scale)``: integer-valued ``v = q − z`` per weight (float tensor) and the per-channel
    scale (``C``), with ``v · scale`` equal, bit for bit, to the fake-quant model's weight."""
    layer.sync_weight_range()
    wq = layer.weight_quantizer
    n_out = layer.weight.shape[0]
    with torch.no_grad():
        ref = layer.quantized_weight().detach()
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        scale = wq.scale.detach().float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(n_out).clone()
        rounding = layer.weight_rounding
        if rounding is not None:
            if not rounding.hard:
                raise ExportError(f"{where}: learned rounding is still soft; harden it before export")
            v = rounding.codes().detach().float()
        else:
            zp = wq.zero_point.reshape(-1).float()
            if zp.numel() == 1:
                zp = zp.expand(n_out)
            inv = torch.reciprocal(scale).view(shape)
            v = torch.clamp(torch.round(layer.weight.detach().float() * inv),
                            (wq.qmin - zp).view(shape), (wq.qmax - zp).view(shape))
        if not torch.equal(v * scale.view(shape), ref):
            raise ExportError(f"{where}: could not reproduce the fake-quant weight from integer codes "
                              f"(max diff {(v * scale.view(shape) - ref).abs().max():.3g})")
    return v, scale


def encode_weight(v: Tensor, scale: Tensor) -> Optional[_Const]:
    """Per-channel uint8 codes with a zero point per channel in [0, 255]; None when a channel's
    values together with 0 span more than 256 levels (see the module docstring)."""
    flat = v.reshape(v.shape[0], -1)
    lo = flat.min(dim=1).values.clamp(max=0)
    hi = flat.max(dim=1).values.clamp(min=0)
    if bool(((hi - lo) <= 255).all()):
        zp = (-lo).round()
        # Prefer the zero point that puts the codes in [0, 2^b): among the valid ones, the smallest
        # is -lo; any valid one dequantizes to the same values.
        codes = (v + zp.view(-1, *[1] * (v.dim() - 1))).round().to(torch.uint8)
        return _Const(codes, scale.float().contiguous(), zp.to(torch.uint8))
    return None


class QDQLayer(nn.Module):
    """QuantConv2d / QuantLinear (optionally with the BatchNorm that follows it folded in)."""

    weight: Tensor
    bias: Optional[Tensor]

    def __init__(self, layer: QuantConv2d | QuantLinear, bn: Optional[nn.BatchNorm2d], where: str) -> None:
        super().__init__()
        self.is_conv = isinstance(layer, QuantConv2d)
        # (stride, padding, dilation, groups) of a conv; None for a linear layer
        self.conv_args: Optional[tuple[tuple[int, ...], str | tuple[int, ...], tuple[int, ...], int]] = None
        if isinstance(layer, QuantConv2d):
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
            if layer.padding_mode != "zeros":
                raise ExportError(f"{where}: padding_mode={layer.padding_mode!r} is not supported")
        self.const: Optional[_Const] = None
        self.input_qdq = QDQAct(layer.input_quantizer, f"{where}.input_quantizer") \
            if layer.input_quantizer is not None else None
        bias = layer.bias.detach().double() if layer.bias is not None else None
        if not layer.weight_quantizer.active:
            self.const = None
            weight = layer.weight.detach().double()
        else:
            v, scale = weight_codes(layer, where)
            v, scale = v.double(), scale.double()
            weight = None
        if bn is not None:
            f, shift = _bn_factor(bn)
            bias = (torch.zeros_like(f) if bias is None else bias) - _bn_stats(bn)[0].detach().double()
            bias = bias * f + shift
            shape = [-1] + [1] * (layer.weight.dim() - 1)
            if weight is not None:
                weight = weight * f.view(shape)
            else:
                sign = torch.where(f < 0, -1.0, 1.0).double()
                v = v * sign.view(shape)
                scale = scale * f.abs()
                dead = scale == 0  # gamma = 0: the channel is its shift alone
                v[dead] = 0.0
                scale = torch.where(dead, torch.ones_like(scale), scale)
        if weight is None:
            scale32 = scale.float()
            self.const = encode_weight(v.float(), scale32)
            shape = [-1] + [1] * (v.dim() - 1)
            weight = v.float() * scale32.view(shape)
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: Tensor) -> Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        w = self.weight if self.const is None else _WeightDQ.apply(self.weight, self.const)
        if self.conv_args is not None:
            stride, padding, dilation, groups = self.conv_args
            return F.conv2d(x, w, self.bias, stride, padding, dilation, groups)
        return F.linear(x, w, self.bias)


class _NotInteger(Exception):
    """The layer has no integer (or float64) form; the next form is tried (the reason is logged)."""


def _bypass(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """Forward hook: a BatchNorm already folded into the IntegerLayer before it passes its input on."""
    return inputs[0]


def _conv_geometry(layer: QuantConv2d | QuantLinear, where: str) -> tuple[bool, dict[str, Any], list[int]]:
    """(is a conv, F.conv2d's keyword arguments, kernel shape) of an exact-form layer; padding
    other than explicit zeros has no ConvInteger form."""
    if not isinstance(layer, QuantConv2d):
        return False, {}, []
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise _NotInteger(f"{where}: padding {layer.padding!r}/{layer.padding_mode}")
    return True, dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                      groups=layer.groups), list(layer.kernel_size)


class IntegerLayer:
    """A conv/linear layer with a quantized input computed as an exact integer accumulation.

    ``y = float32(Σ k_x·v_w) · M + b``: ``k_x = clamp(round(x / s_x))`` the input codes (minus their
    zero point), ``v_w`` the weight codes (minus theirs), ``M = float32(s_x) · float32(s_w)`` per
    output channel and ``b`` the bias, both float32 constants, with a BatchNorm that reads the
    layer's output folded into ``v_w`` (sign), ``s_w`` (``|γ/σ|``) and ``b``. The sum is exact on
    both sides: in PyTorch a float32 conv when every partial sum is provably below 2^24, else
    float64 (integers below 2^53), in onnxruntime int32 (ConvInteger / MatMulInteger); the cast
    to float32, the Mul and the Add are single float32 roundings in the same order, so the
    fake-quant model and the ONNX graph give bit-identical outputs. The float
    conv they replace (DequantizeLinear inputs, float32 products summed in an order each library
    picks) differs by an ulp, which at 4 bits moves codes at rounding ties (docs/results.md).
    """

    def __init__(self, layer: QuantConv2d | QuantLinear, quantizer: UniformQuantizer,
                 bn: Optional[nn.BatchNorm2d], where: str) -> None:
        spec = act_spec(quantizer, where)
        if spec is None or spec[4] != torch.uint8:
            raise _NotInteger(f"{where}: input grid is not uint8")
        self.is_conv, self.conv_args, self.kernel_shape = _conv_geometry(layer, where)
        v, scale = weight_codes(layer, where)
        v, s_w = v.double(), scale.double()
        bias = layer.bias.detach().double() if layer.bias is not None else None
        if bn is not None:
            f, shift = _bn_factor(bn)
            bias = ((torch.zeros_like(f) if bias is None else bias) - _bn_stats(bn)[0].detach().double()) * f + shift
            shape = [-1] + [1] * (v.dim() - 1)
            v = v * torch.where(f < 0, -1.0, 1.0).double().view(shape)
            s_w = s_w * f.abs()
            dead = s_w == 0
            v[dead] = 0.0
            s_w = torch.where(dead, torch.ones_like(s_w), s_w)
        if float(v.abs().max()) > 255:
            raise _NotInteger(f"{where}: weight codes beyond ±255 (a grid without 0)")
        self.scale_x, self.zp_x, self.qmin, self.qmax = spec[0], spec[1], spec[2], spec[3]
        self.s_x = torch.tensor(spec[0], dtype=torch.float32)
        self.v = v.cpu()
        self.multiplier = (self.s_x * s_w.float()).cpu()
        self.bias = None if bias is None else bias.float().cpu()
        self.parts = integer_weight_parts(self.v)
        # Every partial sum is an integer of at most max|k_x|·Σ|v_w| (per output channel): below
        # 2^24 a float32 conv is exact too, in any summation order, and ~4x faster than float64.
        max_k = max(abs(self.qmin - self.zp_x), abs(self.qmax - self.zp_x))
        bound = max_k * float(self.v.abs().reshape(self.v.shape[0], -1).sum(1).max())
        self.dtype = torch.float32 if bound < 2**24 else torch.float64
        self.v = self.v.to(self.dtype)

    def _shape(self, dim: int) -> list[int]:
        return [1, -1] + [1] * (dim - 2)

    def __call__(self, x: Tensor) -> Tensor:
        k = torch.clamp(torch.round(x / self.s_x.to(x.device)), self.qmin - self.zp_x, self.qmax - self.zp_x)
        v = self.v.to(x.device)
        k = k.to(self.dtype)
        acc = F.conv2d(k, v, None, **self.conv_args) if self.is_conv else F.linear(k, v)
        shape = self._shape(acc.dim())
        y = acc.float() * self.multiplier.to(x.device).view(shape)
        if self.bias is not None:
            y = y + self.bias.to(x.device).view(shape)
        return y

    def symbolic(self, g: Any, x: Any) -> Any:
        """``Q → [Clip] → ConvInteger/MatMulInteger (+ Add) → Cast → Mul → Add``."""
        s = _const(g, torch.tensor(self.scale_x, dtype=torch.float32))
        z = _const(g, torch.tensor(self.zp_x, dtype=torch.uint8))
        q = g.op("QuantizeLinear", x, s, z)
        if (self.qmin, self.qmax) != (0, 255):
            q = g.op("Clip", q, _const(g, torch.tensor(self.qmin, dtype=torch.uint8)),
                     _const(g, torch.tensor(self.qmax, dtype=torch.uint8)))
        acc = None
        for codes, zp in self.parts:
            zw = _const(g, torch.tensor(zp, dtype=torch.uint8))
            if self.is_conv:
                a = self.conv_args
                pads = list(a["padding"]) * 2
                part = g.op("ConvInteger", q, _const(g, codes), z, zw, kernel_shape_i=self.kernel_shape,
                            strides_i=list(a["stride"]), pads_i=pads, dilations_i=list(a["dilation"]),
                            group_i=a["groups"])
            else:
                part = g.op("MatMulInteger", q, _const(g, codes.t().contiguous()), z, zw)
            acc = part if acc is None else g.op("Add", acc, part)
        y = g.op("Cast", acc, to_i=1)  # TensorProto.FLOAT
        rank = 4 if self.is_conv else 2
        y = g.op("Mul", y, _const(g, self.multiplier.view(self._shape(rank))))
        if self.bias is not None:
            y = g.op("Add", y, _const(g, self.bias.view(self._shape(rank))))
        return y


def integer_weight_parts(v: Tensor) -> list[tuple[Tensor, int]]:
    """uint8 ``(codes, zero point)`` tensors whose ``Σ (codes − zp)`` is ``v``: one when the layer's
    values span at most 256 levels, else two (``v`` in ±255: an 8-bit asymmetric per-channel grid,
    whose channels' zero points differ; onnxruntime's ConvInteger takes one zero point per tensor)."""
    lo, hi = int(v.min()), int(v.max())
    if hi - lo <= 255:
        zp = max(0, -lo)
        return [((v + zp).round().to(torch.uint8), zp)]
    a = v.clamp(-128, 127)
    return [((a + 128).round().to(torch.uint8), 128), ((v - a + 127).round().to(torch.uint8), 127)]


class _IntegerOp(torch.autograd.Function):
    """Forward: an :class:`IntegerLayer` / :class:`FloatLayer`; ONNX: its ``symbolic``, with the
    constants the forward used."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, integer: Any) -> Tensor:  # noqa: D102
        return integer(x)

    @staticmethod
    def symbolic(g: Any, x: Any, integer: Any) -> Any:  # noqa: D102
        return integer.symbolic(g, x)


class FloatLayer:
    """A conv/linear layer without an integer form (a float input, e.g. ``dfq_legacy``'s first
    conv or an SE block's conv after average pooling; weight codes beyond ±255), computed in
    float64 and rounded to float32 once: ``y = float32(conv64(x, W) + b)`` with ``W`` the
    fake-quant weight (a BatchNorm that reads the output folded in, in float64) and ``b`` the bias.

    In float32 the two libraries' sums differ in the last bits (the order of the products) and a
    BN folded into float32 weights differs from one applied after the conv by ~1e-5 relative,
    which moves codes at rounding ties of the next quantizer (measured on mobilenetv3: 3 codes of
    the first activation). In float64 both sums are within ~1e-16 of the exact value, so their
    float32 roundings agree except at float32 ties. onnxruntime has no float64 Conv: the graph
    gathers the patches with a float32 Conv of one-hot kernels (each output is one input value
    times 1.0, exact), then multiplies in float64 (MatMul, batched over groups).
    """

    def __init__(self, layer: QuantConv2d | QuantLinear, bn: Optional[nn.BatchNorm2d], where: str) -> None:
        self.is_conv, self.conv_args, self.kernel_shape = _conv_geometry(layer, where)
        if layer.weight_quantizer.active:
            v, scale = weight_codes(layer, where)
            w = (v * scale.view([-1] + [1] * (v.dim() - 1))).double()  # == quantized_weight(), exact
        else:
            w = layer.weight.detach().double()
        bias = layer.bias.detach().double() if layer.bias is not None else None
        if bn is not None:
            f, shift = _bn_factor(bn)
            bias = ((torch.zeros_like(f) if bias is None else bias) - _bn_stats(bn)[0].detach().double()) * f + shift
            w = w * f.view([-1] + [1] * (w.dim() - 1))
        self.weight = w.cpu()
        self.bias = None if bias is None else bias.cpu()

    def __call__(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.device)
        b = None if self.bias is None else self.bias.to(x.device)
        y = F.conv2d(x.double(), w, b, **self.conv_args) if self.is_conv else F.linear(x.double(), w, b)
        return y.float()

    def symbolic(self, g: Any, x: Any) -> Any:
        if not self.is_conv:
            y = g.op("MatMul", g.op("Cast", x, to_i=11), _const(g, self.weight.t().contiguous()))
            if self.bias is not None:
                y = g.op("Add", y, _const(g, self.bias))
            return g.op("Cast", y, to_i=1)
        a = self.conv_args
        out_c, cg, kh, kw = self.weight.shape
        groups = a["groups"]
        k = cg * kh * kw
        onehot = torch.eye(k, dtype=torch.float32).reshape(k, cg, kh, kw).repeat(groups, 1, 1, 1)
        patches = g.op("Conv", x, _const(g, onehot), kernel_shape_i=[kh, kw], strides_i=list(a["stride"]),
                       pads_i=list(a["padding"]) * 2, dilations_i=list(a["dilation"]), group_i=groups)
        shape = g.op("Shape", patches)
        n = g.op("Slice", shape, _const(g, torch.tensor([0])), _const(g, torch.tensor([1])))
        hw = g.op("Slice", shape, _const(g, torch.tensor([2])), _const(g, torch.tensor([4])))
        cols = g.op("Reshape", patches, g.op("Concat", n, _const(g, torch.tensor([groups, k, -1])), axis_i=0))
        w = _const(g, self.weight.reshape(groups, out_c // groups, k).contiguous())
        y = g.op("MatMul", w, g.op("Cast", cols, to_i=11))  # (N, G, O/G, H·W), float64
        y = g.op("Reshape", y, g.op("Concat", n, _const(g, torch.tensor([out_c])), hw, axis_i=0))
        if self.bias is not None:
            y = g.op("Add", y, _const(g, self.bias.view(1, -1, 1, 1)))
        return g.op("Cast", y, to_i=1)


class IntegerQDQLayer(nn.Module):
    """Export form of a layer with an :class:`IntegerLayer` or :class:`FloatLayer` (its BatchNorm
    folded in it); a FloatLayer's own input quantizer stays a Q → DQ in front of it."""

    def __init__(self, layer: QuantConv2d | QuantLinear, where: str) -> None:
        super().__init__()
        self.integer = layer.integer
        self.input_qdq = QDQAct(layer.input_quantizer, f"{where}.input_quantizer") \
            if isinstance(self.integer, FloatLayer) and layer.input_quantizer is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        return _IntegerOp.apply(x, self.integer)


@torch.no_grad()
def exact_integer(qmodel: nn.Module, example: Tensor) -> int:
    """Make the fake-quant model compute what the exported graph computes, bit for bit; returns the
    number of integer layers. In place; call after :func:`snap_bias` and after any change to weights,
    BN statistics or quantizers (it reads them once).

    - every activation quantizer divides by its scale (``round(x / s)``, onnxruntime's
      QuantizeLinear) instead of multiplying by ``1/s``;
    - every conv/linear layer whose input lies on an 8-bit-or-less uint8 activation grid becomes an
      :class:`IntegerLayer` (exact integer accumulation; ConvInteger/MatMulInteger in the ONNX
      graph instead of a QLinearConv or a float Conv), with a BatchNorm that reads its output folded
      into it (the BN module then passes its input through).

    This changes the fake-quant model's outputs by float32 rounding (the float conv's summation
    order, the BN arithmetic): used when export is requested, so that the evaluated model is the
    exported one. Every other conv/linear layer (a float input: ``dfq_legacy``'s first conv, a
    layer after average pooling) becomes a :class:`FloatLayer` (float64 sums, one float32 rounding).
    """
    example = example.to(next(qmodel.parameters()).device)
    for m in qmodel.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.integer = None
        if isinstance(m, nn.BatchNorm2d):
            for key, hook in list(m._forward_hooks.items()):
                if hook is _bypass:
                    del m._forward_hooks[key]
    for m in qmodel.modules():
        if isinstance(m, QuantAct):
            m.quantizer.divide = True
        elif isinstance(m, (QuantConv2d, QuantLinear)) and m.input_quantizer is not None:
            m.input_quantizer.divide = True
    bns = _bn_pairs(qmodel, example)
    inputs = _input_quantizers(qmodel, example)
    paths = _paths_by_object(qmodel)
    count = 0
    for layer in list(qmodel.modules()):
        if not isinstance(layer, (QuantConv2d, QuantLinear)):
            continue
        bn, where = bns.get(id(layer)), paths[id(layer)][0]
        exact: Any = None
        if id(layer) in inputs and layer.weight_quantizer.active:
            try:
                exact = IntegerLayer(layer, inputs[id(layer)], bn, where)
                count += 1
            except _NotInteger as why:
                log.info("export: float64 path for %s", why)
        if exact is None:
            try:
                exact = FloatLayer(layer, bn, where)
            except _NotInteger as why:
                log.info("export: float32 path for %s", why)
                continue
        layer.integer = exact
        if bn is not None:
            bn.register_forward_hook(_bypass)
    return count


def _check_supported(model: nn.Module) -> None:
    from calibbench.quant.quantize import FEATURE_ACT_NAMES, FEATURE_ACT_TYPES

    inside = {id(sub) for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear, QuantAct))
              for sub in m.modules()}  # quantizers, observers, learned rounding: handled by their owner
    for path, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)):
            raise ExportError(f"unsupported layer {path or '<model>'} ({type(m).__name__}): a "
                              f"conv/linear layer the quantizer did not wrap cannot be exported as "
                              f"an integer layer")
        if isinstance(m, nn.BatchNorm2d) or isinstance(m, _PASSIVE) \
                or isinstance(m, FEATURE_ACT_TYPES) or type(m).__name__ in FEATURE_ACT_NAMES:
            continue
        own = list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False) if b is not None]
        if own and not any(isinstance(p, (QuantConv2d, QuantLinear, QuantAct)) for p in m.modules()):
            raise ExportError(f"unsupported layer {path or '<model>'} ({type(m).__name__}): it holds "
                              f"parameters the exporter does not know how to quantize")


def _bn_pairs(model: nn.Module, example: Tensor) -> dict[int, nn.BatchNorm2d]:
    """``id(conv) -> BatchNorm2d`` for every BN that reads exactly a QuantConv2d's output."""
    pairs = _conv_bn_candidates(model, conv_types=(QuantConv2d,))
    if pairs:
        confirmed = _verify_pairs(model, pairs, example)
        pairs = [p for p in pairs if id(p[3]) in confirmed]
    return {id(conv): bn for _, conv, _, bn in pairs}


def _input_quantizers(model: nn.Module, example: Tensor) -> dict[int, UniformQuantizer]:
    """``id(layer) -> quantizer`` whose output the layer reads (its own input quantizer, or the
    QuantAct that produced its input tensor), found in one forward pass."""
    from calibbench.quant.quantize import probe_forward

    # The outputs are kept alive: an id is unique only while its tensor lives (a freed QuantAct
    # output's id reused by another tensor attributed the grid to the wrong layer on mobilenetv3).
    produced: dict[int, tuple[UniformQuantizer, Tensor]] = {}
    found: dict[int, UniformQuantizer] = {}
    handles = []

    def act_hook(module: QuantAct, inputs: tuple, output: Tensor) -> None:
        if module.quantizer.active:
            produced[id(output)] = (module.quantizer, output)

    def layer_hook(module: QuantConv2d | QuantLinear, inputs: tuple) -> None:
        q = module.input_quantizer
        if q is not None and q.active:
            found[id(module)] = q
        elif id(inputs[0]) in produced:
            q, out = produced[id(inputs[0])]
            # still on the grid (not changed in place since, e.g. by a residual ``+=``)
            if out is inputs[0] and torch.equal(q.fake_quantize(out.detach().clone()), out):
                found[id(module)] = q

    for m in model.modules():
        if isinstance(m, QuantAct):
            handles.append(m.register_forward_hook(act_hook))
        elif isinstance(m, (QuantConv2d, QuantLinear)):
            handles.append(m.register_forward_pre_hook(layer_hook))
    probe_forward(model, example, handles)
    return found


def _bn_stats(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(running_mean, running_var); the BNs paired with a conv all keep them (_conv_bn_candidates)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"{bn}: a BatchNorm without running statistics cannot be folded")
    return bn.running_mean, bn.running_var


def _bn_factor(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    f = (bn.weight.detach().double() if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)) \
        / torch.sqrt(_bn_stats(bn)[1].detach().double() + bn.eps)
    shift = bn.bias.detach().double() if bn.affine else torch.zeros_like(f)
    return f, shift


@torch.no_grad()
def snap_bias(qmodel: nn.Module, example: Tensor) -> int:
    """Put every bias the integer kernel quantizes on the kernel's int32 grid; returns how many
    layers changed. In place, on the fake-quant model.

    onnxruntime fuses ``DQ(x) → Conv/Gemm → Q`` into QLinearConv only with an int32 bias of
    scale ``s_x·s_w`` (its ``WeightBiasQuantization`` pass rounds a float bias to it). The
    fake-quant model adds the bias in float, so without this step the kernel differs from what was
    evaluated by up to half a bias step per output: measured on resnet20 W4A4 ``dfq_legacy``, 0.5 %
    of the first fused layer's output codes move by one level, the differences grow layer by layer,
    and only 89.5 % of the top-1 predictions agree (100 % with the pass switched off, but then
    nothing runs on integer kernels). After snapping, the float bias *is* ``k·s_x·s_w`` (for a
    conv followed by a BatchNorm the BN's shift is moved so that the folded bias is), the kernel's
    rounding is the identity, and the fake-quant model and onnxruntime compute the same function.
    The change to the model is below half a bias step per channel (accuracy effect measured in
    docs/results.md). Layers whose input is not quantized (the image under ``dfq_legacy``) keep
    their float bias: the kernel is a float conv there too.
    """
    example = example.to(next(qmodel.parameters()).device)
    bns = _bn_pairs(qmodel, example)
    inputs = _input_quantizers(qmodel, example)
    changed = 0
    for layer in qmodel.modules():
        if not isinstance(layer, (QuantConv2d, QuantLinear)) or id(layer) not in inputs:
            continue
        if not layer.weight_quantizer.active:
            continue
        _, scale = weight_codes(layer, "snap_bias")
        scale = scale.double()
        sx = float(inputs[id(layer)].scale.reshape(-1)[0])
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
        bn = bns.get(id(layer))
        if bn is not None:
            f, shift = _bn_factor(bn)
            mean = _bn_stats(bn)[0].detach().double()
            folded = (bias - mean) * f + shift
            s_w = (scale * f.abs()).float()
        else:
            folded, s_w = bias, scale.float()
        grid = (torch.tensor(sx, dtype=torch.float32) * s_w).double()  # float32, as the kernel
        grid = torch.where(grid > 0, grid, torch.ones_like(grid))
        target = torch.round(folded / grid) * grid
        if bn is not None:
            live = f != 0
            new_shift = torch.where(live, target - (bias - mean) * f, shift)
            if bn.affine:
                bn.bias.copy_(new_shift.to(bn.bias.dtype))
            elif bool((new_shift != shift).any()):
                continue  # no shift to move: leave it (the kernel rounds this one)
        elif layer.bias is not None:
            layer.bias.copy_(target.to(layer.bias.dtype))
        else:
            continue  # no bias: 0 is on every grid
        changed += 1
    for m in qmodel.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.invalidate_cache()
    return changed


def to_qdq(qmodel: nn.Module, example: Tensor) -> nn.Module:
    """A copy of the fake-quant ``qmodel`` whose forward traces to the QDQ graph (module docstring)."""
    model = copy.deepcopy(qmodel).cpu().eval()
    _check_supported(model)
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.invalidate_cache()
    bn_of = _bn_pairs(model, example.cpu())
    paths = _paths_by_object(model)
    for bn in bn_of.values():
        for p in paths[id(bn)]:
            _replace(model, p, nn.Identity())
    for m in list(model.modules()):
        if isinstance(m, (QuantConv2d, QuantLinear)) and m.integer is not None:
            new: nn.Module = IntegerQDQLayer(m, paths[id(m)][0])
        elif isinstance(m, (QuantConv2d, QuantLinear)):
            new = QDQLayer(m, bn_of.get(id(m)), paths[id(m)][0])
        elif isinstance(m, QuantAct):
            new = QDQActModule(m, paths[id(m)][0])
        else:
            continue
        for p in paths[id(m)]:
            _replace(model, p, new)
    log.info("export: %d BatchNorm layers folded into quantized convs", len(bn_of))
    return model.eval()


def export_onnx(qmodel: nn.Module, example: Tensor, path: str) -> dict[str, Any]:
    """Write the QDQ ONNX model of ``qmodel`` to ``path`` (opset :data:`OPSET`, IR
    :data:`IR_VERSION`, dynamic batch); returns ``{opset, ir_version, folded_bn}``."""
    import warnings

    import onnx

    module = to_qdq(qmodel, example)
    folded = sum(1 for m in module.modules() if isinstance(m, nn.Identity))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (example.cpu(),), path, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)
    model = onnx.load(path)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return {"opset": OPSET, "ir_version": IR_VERSION, "folded_bn": folded}


# -- check under onnxruntime ---------------------------------------------------------------------
QLINEAR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat",
                         "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul"})
FLOAT_CONV_OPS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                            "ConvTranspose"})


def ort_session(path: str, threads: Optional[int] = None, optimized_path: Optional[str] = None,
                optimize: bool = True) -> Any:
    """An onnxruntime CPU session (all graph optimizations: the QDQ fusions into integer kernels)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # the "optimized model is hardware specific" notice is expected
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


# onnxruntime's fused QDQ kernels: one node per conv/linear layer
FUSED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm"})


def count_kernels(optimized_path: str) -> dict[str, Any]:
    """Integer vs float conv/matmul nodes in the graph onnxruntime actually runs (nodes, not
    layers: see :func:`export_form` for layers)."""
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(optimized_path).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"qlinear_nodes": sum(n for op, n in ops.items() if op in QLINEAR_OPS),
            "float_conv_nodes": sum(n for op, n in ops.items() if op in FLOAT_CONV_OPS),
            "ops": dict(sorted(ops.items()))}


def export_form(qmodel: nn.Module, ops: dict[str, int]) -> dict[str, Any]:
    """Which graph ``qmodel`` exports to and how its conv/linear layers run in it (layers, not
    nodes): ``form`` is ``"exact"`` after :func:`exact_integer`, else ``"fused"`` (the QDQ graph
    onnxruntime fuses into QLinearConv); ``integer_layers`` are the layers on integer kernels (an
    :class:`IntegerLayer`, one or two ConvInteger/MatMulInteger nodes, or a fused QLinearConv /
    QLinearMatMul / QGemm node, ``ops`` being the optimized graph's op counts) and
    ``float_layers`` the others (a :class:`FloatLayer` is two nodes, the one-hot patch Conv and
    the float64 MatMul; a QDQ layer onnxruntime did not fuse is one float Conv/Gemm)."""
    layers = [m for m in qmodel.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    exact = any(m.integer is not None for m in layers)
    integer = sum(isinstance(m.integer, IntegerLayer) for m in layers) \
        + sum(n for op, n in ops.items() if op in FUSED_OPS)
    return {"form": "exact" if exact else "fused", "integer_layers": integer,
            "float_layers": len(layers) - integer}


@torch.no_grad()
def compare(qmodel: nn.Module, session: Any, batches: Any) -> dict[str, Any]:
    """Run ``batches`` of ``(images, labels)`` through the fake-quant model and the ORT session:
    top-1 of both, agreement of their argmax (percent), largest logit difference."""
    qmodel.eval()
    device = next(qmodel.parameters()).device
    n = agree = hit_q = hit_o = 0
    max_diff = 0.0
    for images, labels in batches:
        ref = qmodel(images.to(device)).float().cpu()
        out = torch.from_numpy(session.run(None, {"input": images.cpu().numpy()})[0])
        n += len(labels)
        agree += int((ref.argmax(1) == out.argmax(1)).sum())
        hit_q += int((ref.argmax(1) == labels).sum())
        hit_o += int((out.argmax(1) == labels).sum())
        max_diff = max(max_diff, float((ref - out).abs().max()))
    if n == 0:
        raise ExportError("no evaluation images to check the export on")
    return {"n": n, "top1": 100.0 * hit_o / n, "top1_fake_quant": 100.0 * hit_q / n,
            "agreement": 100.0 * agree / n, "max_abs_logit_diff": max_diff}
