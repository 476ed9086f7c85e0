"""Build a fake-quant copy of a model by preset, calibrate its activation ranges, describe it.

Presets (``conf/quant/*.yaml``; METHODS.md "Shared quantizer"):

``dfq_legacy`` (ZeroQ/GDFQ code family): BN kept; every nn.Conv2d and nn.Linear (first and last
included) gets a per-output-channel asymmetric min/max weight quantizer; every activation module
gets a per-tensor quantizer on its output (``act_placement=after_relu``); the image is not
quantized. Weight grids use the raw per-channel min/max (0 not forced in, as ZeroQ's code);
activation ranges contain 0 (ZeroQ's running min/max starts from zero-initialised buffers).

``academic`` (BRECQ/MQBench): BN folded into the preceding conv; a quantizer on the *input* of
every conv/linear (``act_placement=layer_input``), the image included when ``quantize_input``;
first and last layer weights and input activations at ``first_last_bits``; all ranges contain 0.

``reference`` (BRECQ's ``set_first_last_layer_to_8bit`` + ``disable_network_output_quantization``,
QDrop's configs): ``academic`` with the first layer's input (the image) unquantized: first and
last layer weights at 8 bits, the last layer's input at 8 bits, everything else at the run's bits.
A tensor read by two layers (a ResNet unit's input feeds the body and the 1x1 shortcut) gets one
quantizer per reading layer; with the same observer both learn the same range.

Which activation modules count (``after_relu``): ``act_modules="all"`` (default) treats every
element-wise feature activation module the same way: ReLU, ReLU6, LeakyReLU, PReLU, ELU, SELU,
CELU, GELU, SiLU, Mish, Hardswish, Hardtanh, Softplus and pytorchcv's HSwish/Swish, so a
MobileNetV3 at "A4" really has 4-bit activations. ``act_modules="relu"`` is ZeroQ's literal rule
(nn.ReLU and nn.ReLU6 only). Gates (Sigmoid, Hardsigmoid, Tanh, pytorchcv HSigmoid) scale
features inside SE blocks and are never quantized; activations applied functionally (``F.relu`` in
a forward) are invisible to module replacement. For ResNets both settings are identical.
Only exact nn.Conv2d / nn.Linear are replaced (a subclass may override forward; it is skipped
with a warning). "First" and "last" layer are the first and last in registration order.

Calibration observes with activation quantization OFF (every observer sees the activations of
the weight-quantized network with full-precision activations upstream): ranges do not depend on
the order in which layers were calibrated. Note: ZeroQ's published code actually quantizes
activations with the running range while it calibrates (``QuantAct`` with
``full_precision_flag=False``); ``calibrate(..., observe_quantized=True)`` reproduces that.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from calibbench.config import MAX_BITS, MIN_BITS, ConfigError, check_choice
from calibbench.modes import eval_mode
from calibbench.quant.modules import QuantAct, QuantConv2d, QuantLinear
from calibbench.quant.observers import ACT_OBSERVERS, POOL_MAX_VALUES, WEIGHT_OBSERVERS, build_observer
from calibbench.quant.quantizer import UniformQuantizer

log = logging.getLogger(__name__)

PRESETS = ("dfq_legacy", "academic", "reference")
PLACEMENTS = ("after_relu", "layer_input")
ACT_MODULE_CHOICES = ("all", "relu")

# Options that QuantConfig does not (yet) carry: per-preset defaults, overridable by a cfg field
# of the same name if one is added later.
PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "dfq_legacy": {"weight_include_zero": False, "act_include_zero": True, "act_modules": "all"},
    "academic": {"weight_include_zero": True, "act_include_zero": True, "act_modules": "all"},
    # BRECQ's / QDrop's precision setting: academic with the image unquantized (conf/quant/reference.yaml)
    "reference": {"weight_include_zero": True, "act_include_zero": True, "act_modules": "all"},
}

RELU_TYPES: tuple[type, ...] = (nn.ReLU, nn.ReLU6)
FEATURE_ACT_TYPES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softplus)
FEATURE_ACT_NAMES = frozenset({"HSwish", "Swish"})  # pytorchcv.models.common.activ

INFO_ATTR = "quant_info"  # dict stored on the quantized model: what describe() reports
QModule = Union[QuantConv2d, QuantLinear]


def _opt(cfg: Any, key: str, default: Any) -> Any:
    """``cfg.key`` if the config has it (DictConfig or dataclass), else ``default``."""
    value = getattr(cfg, key, None)
    return default if value is None else value


def _is_activation(module: nn.Module, which: str) -> bool:
    if which == "relu":
        return isinstance(module, RELU_TYPES)
    return isinstance(module, FEATURE_ACT_TYPES) or type(module).__name__ in FEATURE_ACT_NAMES


def _paths_by_object(model: nn.Module) -> dict[int, list[str]]:
    """Every path under which each module object is registered (shared modules have several)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _example_input(model: nn.Module) -> Optional[Tensor]:
    """A 1-image input when the model says its input size (pytorchcv models carry ``in_size``)."""
    size = getattr(model, "in_size", None)
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        return None
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else int(getattr(model, "in_channels", 3))
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return torch.zeros(1, channels, int(size[0]), int(size[1]), device=device)


# -- BN folding ----------------------------------------------------------------------------------
def _conv_bn_candidates(model: nn.Module, conv_types: tuple[type, ...] = (nn.Conv2d,)
                        ) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    """A conv (exactly one of ``conv_types``) immediately followed by a matching BatchNorm2d among
    the same parent's children (quant/export.py passes QuantConv2d).

    pytorchcv's ConvBlock registers ``conv`` then ``bn``; torchvision registers ``conv1, bn1``
    and ``Sequential(conv, bn, act)``. Registration order is only a hint; fold_bn verifies it.
    """
    pairs = []
    for parent_path, parent in model.named_modules():
        children = list(parent.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if (type(conv) in conv_types and isinstance(bn, nn.BatchNorm2d)
                    and bn.num_features == conv.out_channels and bn.track_running_stats
                    and bn.running_mean is not None):
                prefix = f"{parent_path}." if parent_path else ""
                pairs.append((prefix + cname, conv, prefix + bname, bn))
    return pairs


def _verify_pairs(model: nn.Module, pairs: list, example: Tensor) -> set[int]:
    """Ids of BN modules whose every input, in one forward pass, was their conv's output."""
    bn_to_conv = {id(bn): conv for _, conv, _, bn in pairs}
    last_out: dict[int, Tensor] = {}
    ok: dict[int, bool] = {}
    handles = []

    def conv_hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        last_out[id(module)] = output

    def bn_hook(module: nn.Module, inputs: tuple) -> None:
        produced = last_out.get(id(bn_to_conv[id(module)]))
        ok[id(module)] = ok.get(id(module), True) and produced is inputs[0]

    for _, conv, _, bn in pairs:
        handles.append(conv.register_forward_hook(conv_hook))
        handles.append(bn.register_forward_pre_hook(bn_hook))
    probe_forward(model, example, handles)
    return {key for key, good in ok.items() if good}


def probe_forward(model: nn.Module, example: Tensor, handles: list) -> None:
    """One eval-mode, no-grad forward pass of ``example`` for the given hooks to observe; the
    hooks are removed and the model's train/eval mode restored afterwards, also on error."""
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold_bn(model: nn.Module, example_input: Optional[Tensor] = None) -> list[tuple[str, str]]:
    """Fold eval-mode BatchNorm2d into the preceding Conv2d, in place; returns folded path pairs.

    ``W' = W * g / s``, ``b' = (b - mean) * g / s + beta`` with ``s = sqrt(running_var + eps)``;
    the BN becomes nn.Identity. Candidate pairs come from registration order and, when an example
    input is available (argument, or pytorchcv's ``in_size``), are confirmed by one forward pass
    in which the BN must read exactly the tensor the conv produced; unconfirmed pairs are left.
    """
    pairs = _conv_bn_candidates(model)
    example = example_input if example_input is not None else _example_input(model)
    if example is not None and pairs:
        confirmed = _verify_pairs(model, pairs, example)
        skipped = [(c, b) for c, _, b, bn in pairs if id(bn) not in confirmed]
        if skipped:
            log.warning("fold_bn: %d conv/BN pairs not confirmed by a forward pass, left unfolded: %s",
                        len(skipped), skipped[:5])
        pairs = [p for p in pairs if id(p[3]) in confirmed]
    elif pairs:
        log.info("fold_bn: no example input; folding %d pairs by registration order", len(pairs))
    paths = _paths_by_object(model)
    folded = []
    for conv_path, conv, bn_path, bn in pairs:
        mean, var = bn.running_mean, bn.running_var
        if mean is None or var is None:  # _conv_bn_candidates keeps BNs with running statistics only
            raise RuntimeError(f"fold_bn: {bn_path} has no running statistics")
        factor = (bn.weight if bn.affine else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        w_grad = conv.weight.requires_grad
        conv.weight = nn.Parameter((conv.weight * factor.view(-1, 1, 1, 1)).detach(),
                                   requires_grad=w_grad)
        conv.bias = nn.Parameter(((bias - mean) * factor + shift).detach(),
                                 requires_grad=w_grad)
        for path in paths[id(bn)]:
            _replace(model, path, nn.Identity())
        folded.append((conv_path, bn_path))
    log.info("fold_bn: folded %d BatchNorm layers", len(folded))
    return folded


# -- quantize ------------------------------------------------------------------------------------
def _validate(cfg: Any, w_bits: int, a_bits: int) -> None:
    check_choice("quant preset", cfg.name, PRESETS)
    check_choice("quant.act_observer", cfg.act_observer, ACT_OBSERVERS)
    check_choice("quant.weight_observer", cfg.weight_observer, WEIGHT_OBSERVERS)
    check_choice("quant.act_placement", cfg.act_placement, PLACEMENTS)
    for key, value in (("w_bits", w_bits), ("a_bits", a_bits),
                       ("quant.first_last_bits", cfg.first_last_bits)):
        if value is not None and not (MIN_BITS <= int(value) <= MAX_BITS):
            raise ConfigError(f"{key}={value} is out of range; valid: integers {MIN_BITS}..{MAX_BITS}")


def quantize(model: nn.Module, cfg: Any, w_bits: int, a_bits: int, *,
             act_modules: Optional[str] = None, example_input: Optional[Tensor] = None) -> nn.Module:
    """A fake-quant deep copy of ``model`` laid out by ``cfg`` (a QuantConfig); ``model`` is untouched.

    Weight ranges are set immediately (from the weights); activation quantizers stay the identity
    until :func:`calibrate` (or :func:`calibration_mode`) gives them a range. ``act_modules``
    overrides the preset's choice of activation modules (``all`` | ``relu``); ``example_input``
    is used to confirm conv/BN pairs when folding.
    """
    _validate(cfg, w_bits, a_bits)
    preset = str(cfg.name)
    opts = {k: _opt(cfg, k, v) for k, v in PRESET_OPTIONS[preset].items()}
    if act_modules is not None:
        opts["act_modules"] = act_modules
    check_choice("act_modules", opts["act_modules"], ACT_MODULE_CHOICES)
    if any(isinstance(m, (QuantConv2d, QuantLinear, QuantAct, UniformQuantizer)) for m in model.modules()):
        raise ValueError("quantize() got a model that already contains fake-quant modules")

    qmodel = copy.deepcopy(model)
    folded = fold_bn(qmodel, example_input) if cfg.fold_bn else []
    flb = cfg.first_last_bits

    def act_quantizer(bits: int) -> UniformQuantizer:
        obs = build_observer(str(cfg.act_observer), bits, bool(cfg.act_symmetric), None,
                             bool(opts["act_include_zero"]), ema_decay=float(cfg.ema_decay),
                             percentile=float(cfg.percentile), mse_steps=int(cfg.mse_steps),
                             mse_p=float(_opt(cfg, "mse_p", 2.0)),
                             reduce=str(_opt(cfg, "observer_reduce", "batch_mean")),
                             pool_values=int(_opt(cfg, "pool_values", POOL_MAX_VALUES)))
        return UniformQuantizer(bits, bool(cfg.act_symmetric), None, bool(opts["act_include_zero"]), obs)

    layers = [m for m in qmodel.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and type(m) in (nn.Conv2d, nn.Linear)]
    skipped = sorted({type(m).__name__ for m in qmodel.modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear)) and type(m) not in (nn.Conv2d, nn.Linear)})
    if skipped:
        log.warning("quantize: subclasses of Conv2d/Linear are not quantized: %s", skipped)
    if not layers:
        raise ValueError("quantize(): the model has no nn.Conv2d or nn.Linear layer")
    ends = {id(layers[0]), id(layers[-1])}
    paths = _paths_by_object(qmodel)

    for layer in layers:
        edge = id(layer) in ends and flb is not None
        wb = int(flb) if edge else int(w_bits)
        per_channel = bool(cfg.weight_per_channel)
        n_out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        w_obs = build_observer(str(cfg.weight_observer), wb, bool(cfg.weight_symmetric),
                               0 if per_channel else None, bool(opts["weight_include_zero"]),
                               mse_steps=int(cfg.mse_steps), mse_p=float(_opt(cfg, "mse_p", 2.0)),
                               valid=WEIGHT_OBSERVERS,
                               what="quant.weight_observer")
        w_q = UniformQuantizer(wb, bool(cfg.weight_symmetric), 0 if per_channel else None,
                               bool(opts["weight_include_zero"]), w_obs, num_channels=n_out)
        is_first = layer is layers[0]
        wants_input = (cfg.act_placement == "layer_input" and not is_first) or \
            (is_first and bool(cfg.quantize_input))
        in_q = act_quantizer(int(flb) if edge else int(a_bits)) if wants_input else None
        new: nn.Module = QuantConv2d.from_float(layer, w_q, in_q) if isinstance(layer, nn.Conv2d) \
            else QuantLinear.from_float(layer, w_q, in_q)
        for path in paths[id(layer)]:
            _replace(qmodel, path, new)

    if cfg.act_placement == "after_relu":
        for module in [m for m in qmodel.modules() if _is_activation(m, opts["act_modules"])]:
            wrapper = QuantAct(module, act_quantizer(int(a_bits)))
            for path in paths[id(module)]:
                _replace(qmodel, path, wrapper)

    setattr(qmodel, INFO_ATTR, {
        "preset": preset, "w_bits": int(w_bits), "a_bits": int(a_bits),
        "first_last_bits": None if flb is None else int(flb),
        "act_placement": str(cfg.act_placement), "act_observer": str(cfg.act_observer),
        "weight_observer": str(cfg.weight_observer), "act_modules": opts["act_modules"],
        "observer_reduce": str(_opt(cfg, "observer_reduce", "batch_mean")),
        "mse_p": float(_opt(cfg, "mse_p", 2.0)), "mse_steps": int(cfg.mse_steps),
        "pool_values": int(_opt(cfg, "pool_values", POOL_MAX_VALUES)),
        "weight_include_zero": bool(opts["weight_include_zero"]),
        "act_include_zero": bool(opts["act_include_zero"]),
        "quantize_input": bool(cfg.quantize_input), "fold_bn": bool(cfg.fold_bn),
        "folded_bn": len(folded)})
    info = describe(qmodel)
    log.info("quantize: preset %s W%dA%d, %d weight and %d activation quantizers",
             preset, w_bits, a_bits, info["num_weight_quantizers"], info["num_act_quantizers"])
    return qmodel


# -- calibration ---------------------------------------------------------------------------------
def quantizers(model: nn.Module) -> Iterator[tuple[str, str, UniformQuantizer]]:
    """``(path, kind, quantizer)`` for every quantizer; kind is weight | input | activation."""
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, (QuantConv2d, QuantLinear)):
            if module.input_quantizer is not None:
                yield prefix + "input_quantizer", "input", module.input_quantizer
            yield prefix + "weight_quantizer", "weight", module.weight_quantizer
        elif isinstance(module, QuantAct):
            yield prefix + "quantizer", "activation", module.quantizer


def enable_calibration(model: nn.Module, observe_quantized: bool = False) -> None:
    """Reset activation observers and switch them on; activations pass through unquantized
    (or, with ``observe_quantized``, are quantized with the running range as ZeroQ's code does)."""
    for _, kind, q in quantizers(model):
        if kind != "weight" and q.observer is not None:
            q.observer.reset()
            q.enable_observer(True)
            q.enable_quant(observe_quantized)


def freeze(model: nn.Module) -> None:
    """Turn observed statistics into activation qparams, stop observing, quantize from now on."""
    unseen = []
    for path, kind, q in quantizers(model):
        if kind == "weight":
            continue
        if q.observing and not q.load_observer_qparams():
            unseen.append(path)
        q.enable_observer(False)
        q.enable_quant(True)
    if unseen:
        log.warning("freeze: %d activation quantizers saw no data and stay full precision: %s",
                    len(unseen), unseen[:5])


@contextmanager
def calibration_mode(model: nn.Module, observe_quantized: bool = False) -> Iterator[nn.Module]:
    """``with calibration_mode(qmodel): qmodel(x)...`` observes, then freezes on a clean exit."""
    enable_calibration(model, observe_quantized)
    yield model
    freeze(model)


def calibrate(qmodel: nn.Module, batches: Iterable[Any], device: Optional[Union[str, torch.device]] = None,
              *, observe_quantized: bool = False) -> None:
    """Run calibration images through ``qmodel`` in eval mode, then freeze activation ranges.

    ``batches`` yields image tensors (or ``(images, labels)`` pairs). Runs under ``no_grad`` and
    explicitly outside ``inference_mode``: every buffer written here must remain usable by autograd
    in a later fine-tuning stage.
    """
    if device is None:
        device = next((p.device for p in qmodel.parameters()), torch.device("cpu"))
    start, images = time.perf_counter(), 0
    with eval_mode(qmodel), torch.inference_mode(False), torch.no_grad():
        enable_calibration(qmodel, observe_quantized)
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            qmodel(x.to(device))
            images += int(x.shape[0])
        if images == 0:
            raise ValueError("calibrate(): no calibration images")
        freeze(qmodel)
    log.info("calibrate: %d images in %.2f s", images, time.perf_counter() - start)


def mse_init(qmodel: nn.Module, batches: Iterable[Any], device: Optional[Union[str, torch.device]] = None
             ) -> dict[str, Any]:
    """Re-initialise the grids by the references' MSE search (reconstruction's ``refine.init=mse``):
    every weight quantizer per output channel (per tensor when the preset says so), every
    calibrated activation quantizer per tensor over the images of ``batches`` (one pooled search,
    as QDrop/BRECQ calibrate). The estimator is :class:`~calibbench.quant.observers.MSEObserver`
    with the preset's ``mse_p``, ``mse_steps`` and ``pool_values`` (recorded in the model's
    quant info). Activation observers see the weight-quantized network with float activations
    upstream, as :func:`calibrate`; they are put back afterwards. Returns what was done."""
    info = getattr(qmodel, INFO_ATTR, {})
    p = float(info.get("mse_p", 2.4))
    steps = int(info.get("mse_steps", 100))
    pool = int(info.get("pool_values", POOL_MAX_VALUES))
    n_w = 0
    for module in qmodel.modules():
        if not isinstance(module, (QuantConv2d, QuantLinear)):
            continue
        wq = module.weight_quantizer
        wq.observer = build_observer("mse", wq.bits, wq.symmetric, wq.ch_axis, wq.include_zero,
                                     mse_steps=steps, mse_p=p, valid=WEIGHT_OBSERVERS,
                                     what="quant.weight_observer")
        module._range_key = None  # recompute from the (unchanged) weight with the new observer
        module.sync_weight_range()
        module.invalidate_cache()
        n_w += 1
    originals = []
    for _, kind, q in quantizers(qmodel):
        if kind == "weight" or not q.active or q.ch_axis is not None:
            continue
        originals.append((q, q.observer))
        q.observer = build_observer("mse", q.bits, q.symmetric, None, q.include_zero, mse_steps=steps,
                                    mse_p=p, reduce="pooled", pool_values=pool)
    try:
        if originals:  # quantizers that saw no data in calibration see none here either
            calibrate(qmodel, batches, device)
    finally:
        for q, obs in originals:
            q.observer = obs
    return {"estimator": "mse", "p": p, "steps": steps, "weights": n_w, "activations": len(originals)}


def describe(qmodel: nn.Module) -> dict[str, Any]:
    """JSON-serialisable summary: preset, bits, counts, ``[path, kind, bits]`` per quantizer."""
    info = dict(getattr(qmodel, INFO_ATTR, {}))
    rows = [[path, kind, q.bits] for path, kind, q in quantizers(qmodel)]
    acts = [q for _, kind, q in quantizers(qmodel) if kind != "weight"]
    info.update({
        "num_weight_quantizers": sum(1 for r in rows if r[1] == "weight"),
        "num_act_quantizers": len(acts),
        "calibrated": bool(acts) and all(q._ready for q in acts),
        "quantizers": rows,
    })
    return info
