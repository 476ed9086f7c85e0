"""QDrop's element-wise dropping, as fake-quantization kernels (Wei et al., ICLR 2022).

During reconstruction (``refine/recon.py``) each activation quantizer's output is replaced by its
float input with probability ``drop_prob``, element by element: :func:`bernoulli_mask` draws the
"stays quantized" mask, :func:`mix_` mixes two tensors by it in place, and :class:`FakeQuantDrop`
does per-tensor fake quantization, LSQ gradients and the mixing in one pass. The unit-level
wrapper that uses them is :class:`~calibbench.quant.unit_act.UnitActQuantizer`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


def bernoulli_mask(like: Tensor, p: float) -> Tensor:
    """A fresh 0/1 mask shaped and typed like ``like``, each element 1 independently with
    probability ``p`` (QDrop: the "stays quantized" mask is drawn with ``1 − drop_prob``).

    For ``p`` a multiple of 1/256 (QDrop's 0.5, and 0, 1) the draw is exact and cheap: one random
    byte per element, 8 per 64-bit draw, compared with ``256·p``; any other ``p`` draws a uniform
    float per element. Float, not bool, because its consumers multiply: on the CPU a bool-masked
    ``where``/``masked_fill`` over a random mask cost ~25× a multiply here (one thread, a
    32×16×32×32 tensor: 2.4 ms vs 0.08 ms; ``rand_like`` 1.95 ms vs 0.5 ms for the bytes).
    """
    levels = float(p) * 256.0
    if levels != int(levels):
        return torch.rand_like(like).lt_(p)
    n = like.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=like.device)
    out = torch.empty_like(like)
    if levels >= 256:  # 256 does not fit the bytes' dtype; the draw above keeps the stream aligned
        return out.fill_(1.0)
    return torch.lt(words.view(torch.uint8)[:n].view(like.shape), int(levels), out=out)


def mix_(a: Tensor, b: Tensor, quantized: Tensor) -> Tensor:
    """``a`` where ``quantized`` is 1 and ``b`` where it is 0, written into ``a``, exactly
    (products with 0 and 1); ``quantized`` is consumed. In place because each new full-size
    tensor costs more than the arithmetic on it (fresh pages; profiled in a resnet20 block step)."""
    a.mul_(quantized)
    return a.addcmul_(b, quantized.neg_().add_(1.0))


class FakeQuantDrop(torch.autograd.Function):
    """Per-tensor fake quantization with LSQ gradients for (scale, zero point) and QDrop's
    element-wise dropping, in one pass: ``s · (clamp(round(x / s) + z, qmin, qmax) − z)`` where
    ``quantized`` is 1, ``x`` (dropped to float) where it is 0; ``quantized`` is a fresh 0/1 float
    mask (:func:`bernoulli_mask`, consumed) or ``None`` (everything quantized).

    The gradients are LSQ's (Esser et al. 2020) for the expression with a straight-through round:
    for x, 1 inside the code range and where kept float, 0 where clamped; for s, ``round(x/s) − x/s``
    inside and ``bound − z`` where clamped; for z, ``−s`` where clamped; dropped elements give s and
    z nothing. "Inside" includes the end codes (a value that rounds *to* the last level is not
    clipped), as LSQ says; autograd through ``torch.clamp`` (``learned.py``'s version) gives those
    elements the clipped gradients instead. Written out because the autograd version of this one
    line costs ~20 full-size tensors per activation per step, which dominated a block's
    reconstruction step (benchmarks/recon_cost.py): here 3 new tensors in the forward (the rest in
    place), float masks and arithmetic instead of bool ``where``s.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zp: Tensor, qmin: float, qmax: float,
                quantized: Optional[Tensor]) -> Tensor:  # noqa: D102
        s, z = float(scale), float(zp)
        lo, hi = qmin - z, qmax - z  # code bounds relative to the zero point
        u = x * (1.0 / s)
        r = torch.round(u)
        codes = r.clamp(lo, hi)
        passed = r.eq_(codes)  # d out / d x: 1 inside the code range (0 where clamped) ...
        if quantized is not None:
            passed.ge_(quantized)  # ... and 1 where kept float
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # d out / d s: codes − u inside, the bound where clamped (codes − u·passed: the same
            # floats as round(u) − u, no rounding error at the bounds), 0 where kept float
            e = torch.addcmul(codes, u, passed, value=-1.0, out=u)
            if quantized is not None:
                e.mul_(quantized)
            ctx.save_for_backward(passed, e)
        else:
            ctx.save_for_backward(passed)
        ctx.s = s
        q = codes.mul_(s)
        return q if quantized is None else mix_(q, x, quantized)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:  # noqa: D102
        passed = ctx.saved_tensors[0]
        grad_x = grad * passed if ctx.needs_input_grad[0] else None
        grad_s = grad_z = None
        if len(ctx.saved_tensors) == 2:
            e = ctx.saved_tensors[1]
            flat = grad.reshape(-1)
            if ctx.needs_input_grad[1]:
                grad_s = torch.dot(flat, e.reshape(-1)).reshape(())
            if ctx.needs_input_grad[2]:  # a learned zero point (LSQ+); else the zero point is fixed
                # the clamped elements are the ones not passed: Σ grad·clipped = Σ grad − Σ grad·passed
                grad_z = (flat.sum() - torch.dot(flat, passed.reshape(-1))).mul_(-ctx.s).reshape(())
        return grad_x, grad_s, grad_z, None, None, None


__all__ = ["bernoulli_mask", "mix_", "FakeQuantDrop"]
