"""Fake-quant model → QDQ ONNX model that onnxruntime runs with its integer kernels.

What the ONNX graph holds (``to_qdq`` builds a torch module that traces to it):

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

    produced: dict[int, UniformQuantizer] = {}
    found: dict[int, UniformQuantizer] = {}
    handles = []

    def act_hook(module: QuantAct, inputs: tuple, output: Tensor) -> None:
        if module.quantizer.active:
            produced[id(output)] = module.quantizer

    def layer_hook(module: QuantConv2d | QuantLinear, inputs: tuple) -> None:
        q = module.input_quantizer
        if q is not None and q.active:
            found[id(module)] = q
        elif id(inputs[0]) in produced:
            found[id(module)] = produced[id(inputs[0])]

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
        if isinstance(m, (QuantConv2d, QuantLinear)):
            new: nn.Module = QDQLayer(m, bn_of.get(id(m)), paths[id(m)][0])
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


def count_kernels(optimized_path: str) -> dict[str, Any]:
    """Integer vs float conv/matmul nodes in the graph onnxruntime actually runs."""
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(optimized_path).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"qlinear_nodes": sum(n for op, n in ops.items() if op in QLINEAR_OPS),
            "float_conv_nodes": sum(n for op, n in ops.items() if op in FLOAT_CONV_OPS),
            "ops": dict(sorted(ops.items()))}


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
