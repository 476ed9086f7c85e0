"""What reconstruction reads from the models: a module's input or output on given images, the Fisher
gradient at a unit's output, and one unit's data over the calibration images.

:func:`capture_input` / :func:`capture_output` run the model up to a module (the forward stops
there); :func:`fisher_grad` is the gradient of the FP model's cross-entropy to its own prediction
w.r.t. a module's output. :class:`UnitData` holds a unit's quantized inputs, FP targets and
(QDrop) float inputs / (Fisher) weights: :class:`CachedUnitData` computes them once,
:class:`StreamedUnitData` at every step (``refine/recon.py`` picks by ``refine.cache_mb``).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calibbench.quant.switches import quantization_off
from calibbench.refine.units import Unit


class _Stop(Exception):
    pass


def _capture(model: nn.Module, module: nn.Module, x: Tensor, output: bool) -> Tensor:
    """What ``module`` receives (``output=False``) or returns when ``model`` runs on ``x``; the
    forward stops there."""
    box: list[Tensor] = []

    def grab(value: Tensor) -> None:
        box.append(value.detach().clone())
        raise _Stop

    handle = (module.register_forward_hook(lambda mod, args, out: grab(out)) if output
              else module.register_forward_pre_hook(lambda mod, args: grab(args[0])))
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"refine: unit module {type(module).__name__} was not reached by the forward pass")
    return box[0]


def capture_input(model: nn.Module, module: nn.Module, x: Tensor) -> Tensor:
    return _capture(model, module, x, output=False)


def capture_output(model: nn.Module, module: nn.Module, x: Tensor) -> Tensor:
    return _capture(model, module, x, output=True)


def fisher_grad(model: nn.Module, module: nn.Module, x: Tensor) -> Tensor:
    """d CE(FP logits, FP argmax) / d (unit output), per image (the loss is summed)."""
    box: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        leaf = out.detach().requires_grad_(True)
        box.append(leaf)
        return leaf + 0.0  # later in-place ops (ReLU(inplace)) must not touch the leaf

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            logits = logits.reshape(logits.shape[0], -1)
            loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, box[0])
    finally:
        handle.remove()
    return grad.detach()


class UnitData:
    """A unit's quantized inputs, targets, and (QDrop) float inputs / (Fisher) weights, cached."""

    def __init__(self, model: nn.Module, first: nn.Module, last: nn.Module, images: Tensor,
                 device: torch.device, batch: int, float_inputs: bool, fisher: bool,
                 input_float: bool = False, sampler: Any = None) -> None:
        self.model, self.first, self.last = model, first, last
        self.images, self.device, self.batch = images, device, batch
        self.float_inputs, self.fisher = float_inputs, fisher
        self.input_float = input_float  # the unit's input from the FP model (BRECQ's act stage)
        self.sampler = sampler  # n -> fresh images (refine.source=generator); None: the images
        self.fisher_scale = 1.0
        if fisher:  # the mean squared gradient over the unit's data: weights average 1
            total, count = 0.0, 0
            for start in range(0, len(images), batch):
                g = self._grad(images[start:start + batch].to(device))
                total += float(g.pow(2).sum())
                count += g.numel()
            self.fisher_scale = count / max(total, 1e-30)

    def _grad(self, x: Tensor) -> Tensor:
        with quantization_off(self.model):
            return fisher_grad(self.model, self.last, x)

    def compute(self, x: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        with torch.no_grad():
            if self.input_float:
                with quantization_off(self.model):
                    q_in = capture_input(self.model, self.first, x)
            else:
                q_in = capture_input(self.model, self.first, x)
            with quantization_off(self.model):
                fp_in = capture_input(self.model, self.first, x) if self.float_inputs else None
                target = capture_output(self.model, self.last, x)
        weight = self._grad(x).pow(2) * self.fisher_scale if self.fisher else None
        return q_in, fp_in, target, weight

    def get(self, idx: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        """A training batch: the images ``idx`` (or, with a sampler, as many fresh images); new
        tensors, which the caller may write into."""
        if self.sampler is not None:
            return self.compute(self.sampler(len(idx)).to(self.device))
        return self.compute(self.images[idx].to(self.device))

    def fixed(self, idx: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        return self.compute(self.images[idx].to(self.device))

    def batches(self) -> Iterator[tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]]:
        """The unit's whole image set in order (the losses recorded before and after)."""
        for start in range(0, len(self.images), self.batch):
            yield self.fixed(torch.arange(start, min(start + self.batch, len(self.images))))


class CachedUnitData(UnitData):
    """Everything computed once on the calibration images and indexed per step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        parts = [self.compute(self.images[s:s + self.batch].to(self.device))
                 for s in range(0, len(self.images), self.batch)]
        self.tensors: list[Optional[Tensor]] = [  # the same parts are None in every batch
            None if parts[0][k] is None else torch.cat([t for p in parts if (t := p[k]) is not None])
            for k in range(4)]
        self.tensors_device = parts[0][0].device  # where the cache lives (the inputs are always there)

    def get(self, idx: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        """Fresh copies of the rows ``idx`` (callers may write into them). ``index_select``, not
        ``t[idx]``: the same copy at ~1/6 of advanced indexing's cost on the CPU."""
        idx = idx.to(self.tensors_device)
        # inputs and targets (positions 0, 2) are never None: the tuple has compute()'s types
        return tuple(None if t is None else t.index_select(0, idx)  # type: ignore[return-value]
                     for t in self.tensors)

    fixed = get


class StreamedUnitData(UnitData):
    """Recomputed from the images at every step (units whose data would not fit in ``cache_mb``)."""


def unit_data_bytes(model: nn.Module, unit: Unit, modules: list[nn.Module], example: Tensor,
                    n_images: int, float_inputs: bool, fisher: bool) -> int:
    """Bytes the cached tensors of ``unit`` would take for ``n_images`` images."""
    with torch.no_grad(), quantization_off(model):
        x_in = capture_input(model, modules[0], example)
        out = capture_output(model, modules[-1], example)
    per_image = x_in[0].numel() * (2 if float_inputs else 1) + out[0].numel() * (2 if fisher else 1)
    return per_image * n_images * x_in.element_size()


__all__ = ["capture_input", "capture_output", "fisher_grad", "UnitData", "CachedUnitData", "StreamedUnitData",
           "unit_data_bytes"]
