"""Switches that take quantization out of a fake-quant model for a while, then put it back as it was.

:func:`quantization_off` (every weight and activation quantizer, also the reconstruction's
:class:`~calibbench.quant.unit_act.UnitActQuantizer` wrappers: the FP model inside the quantized
one) and :func:`activations_off` (activation quantizers only: BRECQ's weight stage).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from calibbench.quant.quantize import quantizers
from calibbench.quant.quantizer import UniformQuantizer
from calibbench.quant.unit_act import UnitActQuantizer


@contextmanager
def quantization_off(model: nn.Module) -> Iterator[None]:
    """The model in full precision (every weight/activation quantizer off), then as it was."""
    states: list[tuple[UnitActQuantizer | UniformQuantizer, bool]] = []
    for m in model.modules():
        if isinstance(m, UnitActQuantizer):
            states.append((m, m.enabled))
            m.enabled = False
        elif isinstance(m, UniformQuantizer):
            states.append((m, m.quant_enabled))
            m.enable_quant(False)
    try:
        yield
    finally:
        for m, flag in states:
            if isinstance(m, UnitActQuantizer):
                m.enabled = flag
            else:
                m.enable_quant(flag)


@contextmanager
def activations_off(model: nn.Module) -> Iterator[None]:
    """Every activation quantizer of ``model`` off (weights stay quantized): BRECQ's weight stage,
    where a unit's input comes from the weight-only quantized model; then as it was."""
    states = [(q, q.quant_enabled) for _, kind, q in quantizers(model) if kind != "weight"]
    for q, _ in states:
        q.enable_quant(False)
    try:
        yield
    finally:
        for q, flag in states:
            q.enable_quant(flag)


__all__ = ["quantization_off", "activations_off"]
