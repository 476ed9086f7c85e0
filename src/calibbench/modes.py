"""Train/eval mode (and gradient flag) save-and-restore for code that reads a model without changing it.

:func:`eval_mode` puts models in eval mode for a block (BatchNorm normalizes with, and never
updates, its running statistics; dropout off) and restores every module's own mode afterwards,
also on error; :func:`frozen` also switches the parameters' gradients off (a synthesis loop's
backward then computes only the input gradient). A leaf module: quant, the stages and the
pipeline use it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode for the body; afterwards each module gets its own
    train/eval flag back through ``train(flag)`` (modules whose ``train`` does more, such as the
    quant layers dropping their cached weight, see it as they did with ``model.train(was)``)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in modes:  # parents before children: each module ends with its own flag
            m.train(flag)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the body; both restored afterwards.

    Eval mode keeps BN layers normalizing with (and not updating) their running statistics, so a
    synthesis loop reads the model without changing it; frozen parameters mean a backward pass
    computes only the input gradient.
    """
    grads = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


__all__ = ["eval_mode", "frozen"]
