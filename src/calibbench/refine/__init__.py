"""Refinement stage after calibration: ``none`` (pure PTQ) for now.

Training-based strategies (FDDA, ClusterQ, PLF) plug in here as Lightning modules that fine-tune
the fake-quant model from ``strategy.batches(ctx)`` with the FP model as teacher; the pipeline
already passes both, so adding one is a new module here plus ``conf/refine/<name>.yaml``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from calibbench.config import RefineConfig, check_choice

REFINERS = ("none",)


def run(qmodel: nn.Module, teacher: nn.Module, strategy: Any, ctx: Any, cfg: RefineConfig) -> dict:
    """Fine-tune ``qmodel`` in place per ``cfg``; return what to record (steps, losses, images seen)."""
    check_choice("refine", cfg.name, REFINERS)
    return {"steps": 0, "images_seen": 0}
