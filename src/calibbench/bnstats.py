"""BatchNorm statistics: what a network's BN layers expect, and what a batch actually feeds them.

Every BN-statistics method (ZeroQ, DSG, and later FDDA, ClusterQ, PLF) compares the channel
mean/std of a BN layer's *input* with that layer's running statistics. Hooking the BN modules
themselves (a forward pre-hook reading ``input[0]``) finds exactly those tensors in any
architecture; the reference code's positional pairing of the k-th conv with the k-th BN breaks as
soon as a network has a conv without a BN or a BN that does not follow a conv.

The recorder reduces each BN input inside the hook to its per-(image, channel) sum and L2 norm as
soon as it is produced; the statistics of all layers are then formed together, in one autograd
node (:class:`_Moments`), when first asked for. With ``detach=False`` they stay on the autograd
graph and a loss built from them reaches the input pixels (or a generator), bit-identical to one
node per layer but without ~15 small tensor ops per layer and step.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from calibbench.config import ConfigError

log = logging.getLogger(__name__)

BN_TYPES: tuple[type[_BatchNorm], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def find_bn_layers(model: nn.Module,
                   layer_types: Sequence[type[_BatchNorm]] = (nn.BatchNorm2d,),
                   names: Optional[Sequence[str]] = None) -> list[tuple[str, _BatchNorm]]:
    """The BN layers (in ``named_modules`` order, which is forward order for the usual zoo models)
    of the given types that carry running statistics, optionally restricted to ``names``.

    Raises ConfigError naming the model class when none is found, because every BN-statistics
    strategy is meaningless on such a network.
    """
    types = tuple(layer_types)
    found: list[tuple[str, _BatchNorm]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, types):
            if module.running_mean is None or module.running_var is None:
                skipped.append(name)  # track_running_stats=False: nothing to match
                continue
            found.append((name, module))
    if names is not None:
        wanted = list(names)
        by_name = dict(found)
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ConfigError(f"{type(model).__name__} has no BatchNorm layer(s) with running statistics "
                              f"named {missing[:5]}; available: {[n for n, _ in found][:10]}")
        found = [(n, by_name[n]) for n in wanted]
    if skipped:
        log.warning("%d BatchNorm layer(s) without running statistics ignored: %s", len(skipped),
                    ", ".join(skipped[:5]))
    if not found:
        kinds = ", ".join(t.__name__ for t in types)
        raise ConfigError(
            f"model {type(model).__name__} has no BatchNorm layers with running statistics (looked for "
            f"{kinds}); BN-statistics strategies (zeroq, dsg, fdda, clusterq, plf) need a network with "
            f"BatchNorm. Use a real-data strategy such as random for this model")
    return found


@dataclass(frozen=True)
class BNTargets:
    """Per-layer BN running statistics: ``running_mean`` and ``sqrt(running_var + eps)``."""

    names: list[str]
    mean: list[Tensor]
    std: list[Tensor]

    @property
    def channels(self) -> list[int]:
        return [int(m.numel()) for m in self.mean]

    def flat(self) -> tuple[Tensor, Tensor]:
        """All layers' targets concatenated (ΣC,): losses over every layer become one tensor op."""
        return torch.cat(self.mean), torch.cat(self.std)

    def layer_index(self) -> Tensor:
        """For each concatenated channel, the index of its layer (ΣC,) — for per-layer sums."""
        return torch.repeat_interleave(torch.arange(len(self.names)), torch.tensor(self.channels))


def bn_targets(layers: Sequence[tuple[str, _BatchNorm]], device: Optional[torch.device] = None,
               eps: Optional[float] = None) -> BNTargets:
    """Detached copies of the running statistics (the model is never modified through them)."""
    means, stds = [], []
    for name, bn in layers:
        e = bn.eps if eps is None else eps
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"BatchNorm layer {name!r} keeps no running statistics (track_running_stats=False)")
        means.append(bn.running_mean.detach().clone().float().to(device))
        stds.append(torch.sqrt(bn.running_var.detach().float() + e).to(device))
    return BNTargets([n for n, _ in layers], means, stds)


class GradBuffer:
    """A gradient buffer one BN layer's moments reuse across synthesis steps.

    Allocating a fresh activation-sized tensor for every backward costs page faults on CPU (a
    2 MB tensor took ~1 ms to write fresh against ~0.08 ms reused); writing into the same buffer
    each step avoids that. Autograd never modifies the buffer in place (we hold a reference),
    and it is consumed within the backward pass that produced it. A layer that runs twice in one
    forward pass would need two buffers at once: :attr:`shared` then turns the reuse off.
    """

    def __init__(self) -> None:
        self.tensor: Optional[Tensor] = None
        self.shared = False

    def get(self, like: Tensor) -> Optional[Tensor]:
        if self.shared:
            return None
        t = self.tensor
        if t is None or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            t = self.tensor = torch.empty_like(like, memory_format=torch.contiguous_format)
        return t


@dataclass(frozen=True)
class _Layout:
    """Where each tensor's channels sit in the concatenated (N, ΣC) moments, and per channel the
    divisors the formulas use: tensors holding the numbers a one-tensor formula would use as
    Python scalars (count and 2/(count − correction) in the tensors' dtype, count − correction in
    float64), so the moments of several layers computed together are bit-identical to those
    computed layer by layer."""

    maps: tuple[tuple[int, int], ...]  # (channels, positions per channel map) of each tensor
    bounds: tuple[tuple[int, int], ...]
    count: Tensor  # positions per channel map
    dof: Tensor  # float64: count − correction
    var_grad: Tensor  # 2/(count − correction), the variance's gradient scale; 0 where count is 1
    eps: Optional[Tensor]  # each tensor's eps (a BN layer's), when given


@functools.lru_cache(maxsize=64)
def _layout(maps: tuple[tuple[int, int], ...], correction: int, device: torch.device, dtype: torch.dtype,
            eps: Optional[tuple[float, ...]] = None) -> _Layout:
    """``maps``: (channels, positions per channel) of each tensor. ``correction`` falls back to 0
    where a map has a single value; there the variance is identically 0, and so is its gradient."""
    bounds, start = [], 0
    for channels, _ in maps:
        bounds.append((start, start + channels))
        start += channels

    def per_channel(values: list[float], dtype: torch.dtype) -> Tensor:
        return torch.tensor([v for v, (c, _) in zip(values, maps) for _ in range(c)], dtype=dtype, device=device)

    counts = [count for _, count in maps]
    corr = [correction if count > correction else 0 for count in counts]
    return _Layout(maps, tuple(bounds), per_channel([float(n) for n in counts], dtype),
                   per_channel([float(n - k) for n, k in zip(counts, corr)], torch.float64),
                   per_channel([2.0 / (n - k) if n > 1 else 0.0 for n, k in zip(counts, corr)], dtype),
                   None if eps is None else per_channel(list(eps), dtype))


class _Recorded(NamedTuple):
    """What one BN layer was fed in the last forward pass, reduced as soon as it was produced."""

    total: Tensor  # N×C sums over the positions
    norm: Tensor  # N×C L2 norms over the positions
    x: Optional[Tensor]  # the input itself, kept only when the statistics need a gradient
    positions: int  # per channel map


def _sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(image, channel) sum and L2 norm over the spatial positions: two vectorized
    reductions, without autograd (:class:`_Moments` supplies the gradient)."""
    flat = x.detach().flatten(2)
    return flat.sum(-1), torch.linalg.vector_norm(flat, dim=-1)


class _Moments(torch.autograd.Function):
    """Per-(image, channel) mean and variance over the spatial positions of one or several
    tensors (a network's BN inputs), from their sums and norms (:func:`_sums`): one autograd node
    for all of them.

    ``torch.var_mean`` over (H, W) is a slow Welford reduction on CPU and its backward takes
    several passes; here the forward is two vectorized reductions per tensor, the arithmetic on
    the (N, ΣC) statistics is done once for all layers (not ~15 small ops per layer: ~4 % of a
    resnet20 synthesis step, docs/results.md), and the backward is one multiply-add per
    tensor, written into a reused :class:`GradBuffer` when one is given — what keeps a synthesis
    step close to the cost of the forward/backward pass itself (benchmarks/synthesis_cost.py).
    The variance is E[x²] − mean², formed in float64 from the float32 reductions; it is exact
    enough unless |mean| exceeds std by several orders of magnitude, and clamped at 0.
    """

    @staticmethod
    def forward(ctx: Any, layout: _Layout, buffers: Sequence[Optional[GradBuffer]], total: Tensor, norm: Tensor,
                *xs: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        mean = total / layout.count
        var = (norm.double().pow(2) - total.double() * mean.double()) / layout.dof
        ctx.save_for_backward(mean, *xs)
        ctx.layout, ctx.buffers = layout, buffers
        return mean, var.to(total.dtype).clamp_min(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_mean: Tensor, grad_var: Tensor) -> tuple[Optional[Tensor], ...]:
        mean, *xs = ctx.saved_tensors
        layout: _Layout = ctx.layout
        scale = grad_var * layout.var_grad
        shift = grad_mean / layout.count - scale * mean
        grads: list[Optional[Tensor]] = []
        for (a, b), x, buffer in zip(layout.bounds, xs, ctx.buffers):
            if x is None:
                grads.append(None)
                continue
            shape = (x.shape[0], b - a, *([1] * (x.dim() - 2)))
            s, t = scale[:, a:b].reshape(shape), shift[:, a:b].reshape(shape)
            out = buffer.get(x) if buffer is not None else None
            if out is None:
                grads.append((x * s).add_(t))
            else:
                torch.mul(x, s, out=out)
                grads.append(out.add_(t))
        return (None, None, None, None, *grads)


def spatial_moments(x: Tensor, correction: int = 1, buffer: Optional[GradBuffer] = None
                    ) -> tuple[Tensor, Tensor]:
    """(mean, var), each N×C, of an (N, C, *spatial) tensor over its spatial positions.

    ``correction`` as in ``torch.var`` (1 = unbiased); it falls back to 0 where a channel has a
    single value (1×1 maps), and an (N, C) input has one value per image and channel (var 0).
    ``buffer``: see :class:`GradBuffer` (repeated optimization steps on same-shaped inputs).
    """
    if x.dim() == 2:
        return x, torch.zeros_like(x)
    layout = _layout(((x.shape[1], math.prod(x.shape[2:])),), correction, x.device, x.dtype)
    return _Moments.apply(layout, (buffer,), *_sums(x), x)


def channel_stats(x: Tensor, per_image: bool = True, correction: int = 1, eps: float = 1e-5
                  ) -> tuple[Tensor, Tensor]:
    """Channel mean and ``sqrt(var + eps)`` of an (N, C, *spatial) tensor.

    ``per_image``: statistics over the spatial positions of each image (N×C), as ZeroQ and DSG
    compare them; otherwise over batch and positions (C,), as a BN layer in training mode sees
    them. ``correction=1`` is the unbiased variance (``torch.var``'s default, which the ZeroQ code
    uses); it falls back to 0 where a channel has a single value.
    """
    if x.dim() < 2:
        raise ValueError(f"channel_stats needs (N, C, ...) input, got shape {tuple(x.shape)}")
    count = math.prod(x.shape[2:])
    corr = correction if count > correction else 0
    mean, var = spatial_moments(x, corr)
    if per_image:
        return mean, torch.sqrt(var + eps)
    var_b = var * ((count - corr) / count) if corr else var
    return _pooled(mean, var_b, count, correction, eps)


def _pooled(mean: Tensor, var_biased: Tensor, count: int, correction: int, eps: float
            ) -> tuple[Tensor, Tensor]:
    """Batch channel mean and std from per-image ones (law of total variance): the batch
    statistics come from the same single read of the activations as the per-image ones."""
    bmean = mean.mean(0)
    bvar = var_biased.mean(0) + (mean - bmean).pow(2).mean(0)
    total = count * mean.shape[0]
    if correction and total > correction:
        bvar = bvar * (total / (total - correction))
    return bmean, torch.sqrt(bvar + eps)


class BNStatsRecorder:
    """Forward pre-hooks on BN layers that record the channel statistics of each layer's input.

    Use as a context manager: hooks are installed on enter and removed on exit, also when the
    body raises. After each forward pass, :meth:`image_stats` / :meth:`batch_stats` hold one
    entry per layer, in the order of :attr:`names`; :meth:`clear` forgets them.

    - ``layer_types`` / ``names`` / ``layers``: which BN layers (``layers`` wins, e.g. a slice of
      :func:`find_bn_layers` for "the deep layers only").
    - ``per_image`` (N×C) and/or ``per_batch`` (C,): when both are asked for, the batch statistics
      are derived from the per-image ones (law of total variance), so each input is read once.
    - ``detach``: statistics without autograd history (selection, margins, monitoring); the
      default keeps the graph so a loss on them has a gradient.
    - ``eps``: added to the variance before the square root; ``None`` uses each BN layer's own
      ``eps``, the value the layer itself normalizes with, and the one :meth:`targets` uses.
    """

    def __init__(self, model: nn.Module, *, layer_types: Sequence[type[_BatchNorm]] = (nn.BatchNorm2d,),
                 names: Optional[Sequence[str]] = None,
                 layers: Optional[Sequence[tuple[str, _BatchNorm]]] = None,
                 per_image: bool = True, per_batch: bool = False, detach: bool = False,
                 correction: int = 1, eps: Optional[float] = None) -> None:
        if not (per_image or per_batch):
            raise ValueError("BNStatsRecorder: ask for per_image and/or per_batch statistics")
        self.model = model
        self.layers = list(layers) if layers is not None else find_bn_layers(model, layer_types, names)
        if not self.layers:
            raise ConfigError(f"model {type(model).__name__}: no BatchNorm layers selected")
        self.names = [n for n, _ in self.layers]
        self.per_image, self.per_batch, self.detach = per_image, per_batch, detach
        self.correction, self.eps = correction, eps
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._raw: list[Optional[_Recorded]] = [None] * len(self.layers)
        self._moments_cache: Optional[tuple[Tensor, Tensor, _Layout]] = None
        self._layer_cache: Optional[list[tuple[Optional[tuple[Tensor, Tensor]],
                                               Optional[tuple[Tensor, Tensor]]]]] = None
        self._eps = tuple(float(bn.eps if eps is None else eps) for _, bn in self.layers)
        self._calls = [0] * len(self.layers)
        self._buffers = [GradBuffer() for _ in self.layers]
        self._warned_reuse = False

    # -- hooks ------------------------------------------------------------------------------
    def __enter__(self) -> "BNStatsRecorder":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> None:
        if self._handles:
            return
        for i, (_, bn) in enumerate(self.layers):
            self._handles.append(bn.register_forward_pre_hook(self._make_hook(i)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _make_hook(self, index: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if self._calls[index]:
                self._buffers[index].shared = True  # two live gradients: no buffer reuse
            if self._calls[index] and not self._warned_reuse:
                log.warning("BatchNorm layer %r ran more than once in one forward pass; its "
                            "statistics are those of the last call", self.names[index])
                self._warned_reuse = True
            self._calls[index] += 1
            self._record(index, inputs[0])

        return hook

    def _record(self, index: int, x: Tensor) -> None:
        """Reduce the input to its sums now (the activation itself is kept only as the gradient's
        operand); the statistics of all layers are formed together when first asked for."""
        x = x.float()
        if x.dim() == 2:
            x = x.unsqueeze(-1)  # (N, C): one value per image and channel
        grad = not self.detach and x.requires_grad and torch.is_grad_enabled()
        self._raw[index] = _Recorded(*_sums(x), x if grad else None, math.prod(x.shape[2:]))
        self._moments_cache = self._layer_cache = None

    # -- results ----------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget the last forward pass (call before each one, so a skipped layer is caught)."""
        self._raw = [None] * len(self.layers)
        self._moments_cache = self._layer_cache = None
        self._calls = [0] * len(self.layers)

    def _check(self, what: str, asked: bool) -> None:
        """The statistics asked for were asked for at construction and every layer ran."""
        if not asked:
            raise RuntimeError(f"no {what} statistics: this BNStatsRecorder was built with "
                               f"per_{what.removeprefix('per-')}=False")
        missing = [name for name, raw in zip(self.names, self._raw) if raw is None]
        if missing:
            if len(missing) == len(self._raw) and not self._handles:
                raise RuntimeError("BNStatsRecorder: hooks are not installed (use it as a context manager)")
            raise RuntimeError(f"no {what} statistics recorded for BatchNorm layer(s) {missing[:5]}: they did "
                               f"not run in the last forward pass")

    def _moments(self) -> tuple[Tensor, Tensor, _Layout]:
        """(mean, var), N×ΣC, of every layer's input in the last forward pass (checked by
        :meth:`_check`): one autograd node for all layers, formed once per pass (a second node
        would share the gradient buffers)."""
        if self._moments_cache is None:
            raws = [raw for raw in self._raw if raw is not None]  # every layer, checked before
            total, norm = torch.cat([r.total for r in raws], 1), torch.cat([r.norm for r in raws], 1)
            layout = _layout(tuple((int(r.total.shape[1]), r.positions) for r in raws), self.correction,
                             total.device, total.dtype, self._eps)
            mean, var = _Moments.apply(layout, self._buffers, total, norm, *(r.x for r in raws))
            self._moments_cache = (mean, var, layout)
        return self._moments_cache

    def flat_image_stats(self) -> tuple[Tensor, Tensor]:
        """Per-image statistics of every layer side by side (N×ΣC), aligned with
        :meth:`BNTargets.flat`: one tensor op then covers all layers."""
        self._check("per-image", self.per_image)
        mean, var, layout = self._moments()
        assert layout.eps is not None  # the recorder's layout always carries its layers' eps
        return mean, torch.sqrt(var + layout.eps)

    def _layer_stats(self) -> list[tuple[Optional[tuple[Tensor, Tensor]], Optional[tuple[Tensor, Tensor]]]]:
        """Per layer, (per-image, per-batch) statistics as each was asked for, formed once per pass
        from contiguous copies of the layer's moments, layer after layer: the same operations in
        the same order as when every layer had its own moments node, so a loss on both kinds
        accumulates its gradients in the same order (bit-identical results)."""
        if self._layer_cache is None:
            mean, var, layout = self._moments()
            out: list[tuple[Optional[tuple[Tensor, Tensor]], Optional[tuple[Tensor, Tensor]]]] = []
            for (a, b), (_, count), eps in zip(layout.bounds, layout.maps, self._eps):
                m, v = mean[:, a:b].contiguous(), var[:, a:b].contiguous()
                image = (m, torch.sqrt(v + eps)) if self.per_image else None
                batch = None
                if self.per_batch:
                    corr = self.correction if count > self.correction else 0
                    v_b = v * ((count - corr) / count) if corr else v  # biased per-image variance
                    batch = _pooled(m, v_b, count, self.correction, eps)
                out.append((image, batch))
            self._layer_cache = out
        return self._layer_cache

    def image_stats(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer: (mean, std), each N×C, of the BN input of every image."""
        self._check("per-image", self.per_image)
        return [image for image, _ in self._layer_stats() if image is not None]

    def batch_stats(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer: (mean, std), each (C,), of the BN input over the whole batch, derived from
        the per-image moments (law of total variance)."""
        self._check("per-batch", self.per_batch)
        return [batch for _, batch in self._layer_stats() if batch is not None]

    def flat_batch_stats(self) -> tuple[Tensor, Tensor]:
        stats = self.batch_stats()
        return torch.cat([m for m, _ in stats]), torch.cat([s for _, s in stats])

    def targets(self, device: Optional[torch.device] = None) -> BNTargets:
        """The running statistics of the recorded layers, with the same ``eps`` as the recorder."""
        return bn_targets(self.layers, device, self.eps)
