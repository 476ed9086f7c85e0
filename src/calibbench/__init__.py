"""calibbench: calibration-data strategies for PTQ/DFQ, compared on one shared pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

__version__ = "0.1.0"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment from a composed config and return its result record (a dict); a thin
    re-export so ``calibbench.run(cfg)`` works."""
    from calibbench.pipeline import run as _run

    return _run(cfg)
